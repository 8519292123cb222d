#pragma once
// A k-nearest-neighbour search over the memory bank: what NearestNeighbourScorer needs of its nn_method.
// FaissNN (FAISS's flat and IVF-PQ indexes, as the reference) and ExactPrunedNN (brute force's neighbours with
// most distances skipped) are the two families.
//
// Distances are SQUARED L2, as FAISS returns them. Index files use FAISS's own write_index format, so a bank
// saved by any of them loads in the Python reference (faiss.read_index) and the reverse.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

namespace patchcore {

class NearestNeighbourSearch {
 public:
  virtual ~NearestNeighbourSearch() = default;

  // Builds the search over features [N, D] (floating point, N, D >= 1), replacing any earlier one.
  virtual void fit(const at::Tensor& features) = 0;
  // The k nearest bank rows of each query [Q, D] → (squared distances [Q, k] float32, indices [Q, k] int64),
  // nearest first. With index_features, searches a throw-away bank built from them instead. Thread-safe for
  // concurrent calls once fitted.
  virtual std::pair<at::Tensor, at::Tensor> run(int64_t n_nearest_neighbours, const at::Tensor& query_features,
                                                const at::Tensor& index_features = {}) const = 0;
  // FAISS's index file; written whole or not at all.
  virtual void save(const std::string& filename) const = 0;
  // Throws naming the file when it is missing, truncated, not a FAISS index, or of a kind this search cannot use.
  virtual void load(const std::string& filename) = 0;
  // Frees the bank.
  virtual void reset_index() = 0;

  // The bank's rows, [size(), dimension()] float32. Throws std::logic_error for indexes that keep no rows (IVF-PQ).
  virtual at::Tensor rows() const = 0;

  virtual bool is_fitted() const = 0;
  virtual int64_t size() const = 0;       // rows in the bank
  virtual int64_t dimension() const = 0;  // feature length
  // The class name, as patchcore_params.json records the nn_method.
  virtual const char* kind() const = 0;

 protected:
  // run()'s argument checks against a bank of `rows` x `dimension`; → the queries as contiguous float32 on the CPU.
  at::Tensor checked_queries(int64_t n_nearest_neighbours, const at::Tensor& query_features, int64_t rows,
                             int64_t dimension) const;
};

// A CPU search by its class name (NearestNeighbourSearch::kind()): "FaissNN", "ExactPrunedNN" or
// "ApproximateFaissNN", with num_workers threads at most. Throws std::invalid_argument for any other name.
std::shared_ptr<NearestNeighbourSearch> make_nn_method(const std::string& kind, int num_workers);

}  // namespace patchcore

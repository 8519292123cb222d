#pragma once
// Exact k-nearest-neighbour search over the memory bank that skips most of the brute-force distances: the
// neighbours are those of FaissNN's brute force, and most rows are excluded by lower bounds in the bank's
// principal axes before their distance is computed (docs/exact_search.md).
//
// The bank is an IndexFlatL2 as FaissNN stores it, so the .faiss file stays readable by FaissNN and the Python
// reference; the pruning structure is derived from it after fit() and load().
#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <utility>

#include "patchcore/nn/nearest_neighbour_search.h"

namespace patchcore {

class ExactPrunedNN : public NearestNeighbourSearch {
 public:
  // Searches on the CPU, on at most num_workers threads of the thread setting (core/parallel.h). With
  // quantized_products, the dense search's first tier runs on 8-bit coordinates where the CPU has 8-bit dot products
  // (AVX512_VNNI), with the quantization in the bounds: the same neighbours, faster (docs/exact_search.md).
  explicit ExactPrunedNN(int num_workers = 4, bool quantized_products = true);
  ~ExactPrunedNN() override;

  void fit(const at::Tensor& features) override;
  // Squared distances computed directly as sum((q - r)^2). Same neighbours as brute force except among rows at
  // equal distance, where the lower row index comes first. With index_features the throw-away bank is searched by
  // brute force (FaissNN), as a pruning structure for one call would cost more than it saves.
  std::pair<at::Tensor, at::Tensor> run(int64_t n_nearest_neighbours, const at::Tensor& query_features,
                                        const at::Tensor& index_features = {}) const override;
  // The FAISS index, and beside it the pruning structure (pruning_filename), so that load need not derive it.
  void save(const std::string& filename) const override;
  // Accepts flat FAISS indexes only. Reads the pruning structure beside the index when there is one (checked
  // against the index), and derives it otherwise.
  void load(const std::string& filename) override;
  // The pruning structure's file for an index file: its name with .pruning for .faiss.
  static std::string pruning_filename(const std::string& index_filename);
  void reset_index() override;

  at::Tensor rows() const override;
  bool is_fitted() const override { return bank_ != nullptr; }
  int64_t size() const override;
  int64_t dimension() const override;
  const char* kind() const override { return "ExactPrunedNN"; }
  int num_workers() const { return num_workers_; }
  bool quantized_products() const { return quantized_products_; }
  // Whether this CPU has 8-bit dot products, so that quantized_products takes effect.
  static bool quantized_products_native();

  // How much work searches did, for benchmarks.
  struct Stats {
    int64_t queries = 0;
    int64_t refined = 0;  // rows whose first-tier bound did not exclude them
    int64_t exact = 0;    // rows whose exact distance was computed
    int64_t dense = 0;    // queries searched by the dense search rather than the cell walk (docs/exact_search.md)
  };
  // run() without index_features, also adding its work to `stats`.
  std::pair<at::Tensor, at::Tensor> search(int64_t n_nearest_neighbours, const at::Tensor& query_features,
                                           Stats* stats) const;

 private:
  struct Bank;  // the flat index and the pruning structure derived from it
  // Makes `bank` the searched one, with its pruning structure read from `pruning_file`, or derived when that is
  // empty or of an earlier layout. `source`, the file the bank came from (empty after fit), names the bank in the
  // error when the structure cannot be derived.
  void install(std::unique_ptr<Bank> bank, const std::string& source, const std::string& pruning_file);

  int num_workers_;
  bool quantized_products_;
  std::shared_ptr<const Bank> bank_;
};

}  // namespace patchcore

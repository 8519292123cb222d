#pragma once
// Exact k-nearest-neighbour search over the memory bank that skips most of the brute-force distances.
//
// The bank is stored as FaissNN stores it (a flat IndexFlatL2, so the .faiss file stays readable by FaissNN
// and the Python reference); after fit() and load() a pruning structure is derived from it. Bank and queries
// are rotated into the bank's principal axes, which preserves distances. For each (query, row) pair,
//   |q_1:j - r_1:j|^2 + (|q_j+1:D| - |r_j+1:D|)^2  <=  |q - r|^2
// (the second term by the reverse triangle inequality), so a row whose bound exceeds the k-th best distance
// found so far cannot be a neighbour. Rows are grouped into k-means cells of about 64 over the leading 32
// axes; a cell whose bound (from its centre and radius) exceeds the threshold is skipped whole. Queries are
// searched two patch-grid rows (56) at a time: each first searches the cell with its nearest centre, then the
// cells are walked in one order for all 56, so a cell's data is read from memory once for all the queries that
// need it. Within a cell, rows are ordered by a k-d split into blocks of 8 that lie close together, and each
// block's bounding box over the leading 16 axes (and the tails beyond them) bounds all its rows at once; only the
// blocks that pass get the bound over 32 axes for each row, and rows that pass are refined with 128 and 256 axes. Rows
// that pass those too get their exact distance over all D features lowest bound first, so each distance found spares
// the cell's rows whose bound it then exceeds. Every bound carries a margin for float rounding, so the k neighbours are
// those of brute force.
#include <torch/torch.h>

#include <memory>
#include <utility>

#include "patchcore/nn/faiss_nn.h"

namespace patchcore {

class ExactPrunedNN : public FaissNN {
 public:
  // Searches on the CPU only: on_gpu must be false (the parameter keeps FaissNN's constructor shape).
  explicit ExactPrunedNN(bool on_gpu = false, int num_workers = 4);
  ~ExactPrunedNN() override;

  // As FaissNN::run, with squared distances computed directly as sum((q - r)^2). Same neighbours as brute force
  // except among rows at equal distance, where the lower row index comes first. With index_features the
  // throw-away index is searched by brute force (FaissNN::run), as a pruning structure for one call would
  // cost more than it saves.
  std::pair<torch::Tensor, torch::Tensor> run(int64_t n_nearest_neighbours, const torch::Tensor& query_features,
                                              const torch::Tensor& index_features = {}) const override;

  // How much work a search did, for benchmarks.
  struct Stats {
    int64_t queries = 0;
    int64_t refined = 0;  // rows whose 32-axis bound did not exclude them
    int64_t exact = 0;    // rows whose exact distance was computed
  };
  // run() without index_features, also reporting its work.
  std::pair<torch::Tensor, torch::Tensor> search(int64_t n_nearest_neighbours, const torch::Tensor& query_features,
                                                 Stats* stats) const;

  const char* kind() const override { return "ExactPrunedNN"; }

 protected:
  void index_changed() override;

 private:
  struct Pruning;
  std::shared_ptr<const Pruning> pruning_;
};

}  // namespace patchcore

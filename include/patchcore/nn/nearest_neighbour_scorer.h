#pragma once
// common.NearestNeighbourScorer: anomaly score of a feature = mean squared L2 distance to its k nearest
// rows of the memory bank.
#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "patchcore/nn/nearest_neighbour_search.h"

namespace patchcore {

// common.ConcatMerger: each [N, ...] array flattened to [N, -1], then concatenated along features.
at::Tensor concat_merge(const std::vector<at::Tensor>& features);

class NearestNeighbourScorer {
 public:
  NearestNeighbourScorer(int64_t n_nearest_neighbours, std::shared_ptr<NearestNeighbourSearch> nn_method);

  // detection_features: one [N, ...] array per layer (all with the same N).
  void fit(const std::vector<at::Tensor>& detection_features);
  // → (anomaly_scores [N], query_distances [N, k], query_nns [N, k]). Thread-safe once fitted.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> predict(const std::vector<at::Tensor>& query_features) const;

  // Writes {prepend}nnscorer_search_index.faiss (FAISS's format, readable by the Python reference) and,
  // with save_features_separately, the fitted bank as {prepend}nnscorer_features.npy.
  void save(const std::string& save_folder, bool save_features_separately = false,
            const std::string& prepend = "") const;
  void load(const std::string& load_folder, const std::string& prepend = "");

  static std::string index_filename(const std::string& folder, const std::string& prepend);
  static std::string features_filename(const std::string& folder, const std::string& prepend);

  int64_t n_nearest_neighbours() const { return n_nearest_neighbours_; }
  const NearestNeighbourSearch& nn_method() const { return *nn_method_; }

 private:
  int64_t n_nearest_neighbours_;
  std::shared_ptr<NearestNeighbourSearch> nn_method_;
  at::Tensor detection_features_;  // kept only so save_features_separately can write it
};

}  // namespace patchcore

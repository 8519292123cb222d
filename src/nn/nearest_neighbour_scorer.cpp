#include "patchcore/nn/nearest_neighbour_scorer.h"

#include <ATen/ATen.h>

#include <filesystem>
#include <stdexcept>

#include "patchcore/io/npy.h"

namespace patchcore {

at::Tensor concat_merge(const std::vector<at::Tensor>& features) {
  if (features.empty()) throw std::invalid_argument("no feature arrays given");
  std::vector<at::Tensor> flat;
  for (const auto& f : features) {
    if (!f.defined() || f.dim() < 1) throw std::invalid_argument("feature arrays must be [N, ...] tensors");
    if (f.size(0) != features[0].size(0))
      throw std::invalid_argument("feature arrays have different row counts: " + std::to_string(features[0].size(0)) +
                                  " and " + std::to_string(f.size(0)));
    flat.push_back(f.reshape({f.size(0), -1}));
  }
  return flat.size() == 1 ? flat[0] : at::cat(flat, 1);
}

NearestNeighbourScorer::NearestNeighbourScorer(int64_t n_nearest_neighbours,
                                               std::shared_ptr<NearestNeighbourSearch> nn_method)
    : n_nearest_neighbours_(n_nearest_neighbours), nn_method_(std::move(nn_method)) {
  if (n_nearest_neighbours < 1)
    throw std::invalid_argument("NearestNeighbourScorer: n_nearest_neighbours must be at least 1");
  if (!nn_method_) throw std::invalid_argument("NearestNeighbourScorer: nn_method is null");
}

void NearestNeighbourScorer::fit(const std::vector<at::Tensor>& detection_features) {
  at::Tensor bank = concat_merge(detection_features);
  if (bank.size(0) < n_nearest_neighbours_)
    throw std::invalid_argument("NearestNeighbourScorer: memory bank of " + std::to_string(bank.size(0)) +
                                " rows is smaller than n_nearest_neighbours " + std::to_string(n_nearest_neighbours_));
  nn_method_->fit(bank);
  detection_features_ = bank;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> NearestNeighbourScorer::predict(
    const std::vector<at::Tensor>& query_features) const {
  auto [distances, nns] = nn_method_->run(n_nearest_neighbours_, concat_merge(query_features));
  return {distances.mean(1), distances, nns};
}

std::string NearestNeighbourScorer::index_filename(const std::string& folder, const std::string& prepend) {
  return (std::filesystem::path(folder) / (prepend + "nnscorer_search_index.faiss")).string();
}

std::string NearestNeighbourScorer::features_filename(const std::string& folder, const std::string& prepend) {
  return (std::filesystem::path(folder) / (prepend + "nnscorer_features.npy")).string();
}

void NearestNeighbourScorer::save(const std::string& save_folder, bool save_features_separately,
                                  const std::string& prepend) const {
  std::filesystem::create_directories(save_folder);
  nn_method_->save(index_filename(save_folder, prepend));
  if (save_features_separately) {
    if (!detection_features_.defined())
      throw std::logic_error("NearestNeighbourScorer: no fitted features to save (the scorer was loaded, not fitted)");
    const at::Tensor bank = detection_features_.to(at::kFloat).contiguous();
    write_npy(features_filename(save_folder, prepend), bank.data_ptr<float>(), {bank.size(0), bank.size(1)});
  }
}

void NearestNeighbourScorer::load(const std::string& load_folder, const std::string& prepend) {
  nn_method_->load(index_filename(load_folder, prepend));
  if (nn_method_->size() < n_nearest_neighbours_)
    throw std::runtime_error(index_filename(load_folder, prepend) + ": memory bank of " +
                             std::to_string(nn_method_->size()) + " rows is smaller than n_nearest_neighbours " +
                             std::to_string(n_nearest_neighbours_));
  const std::string features = features_filename(load_folder, prepend);
  detection_features_ = at::Tensor();
  if (std::filesystem::exists(features)) {
    NpyArray a = read_npy(features);
    if (a.dtype != "f4" || a.shape.size() != 2 || a.shape[1] != nn_method_->dimension())
      throw std::runtime_error(features + ": expected float32 [N, " + std::to_string(nn_method_->dimension()) + "]");
    detection_features_ = at::from_blob(a.data.data(), {a.shape[0], a.shape[1]}, at::kFloat).clone();
  }
}

}  // namespace patchcore

#include "patchcore/embedding/preprocessing.h"

#include <ATen/ATen.h>

#include <stdexcept>

namespace patchcore {

MeanMapper::MeanMapper(int64_t preprocessing_dim) : preprocessing_dim_(preprocessing_dim) {
  if (preprocessing_dim <= 0)
    throw std::invalid_argument("pooled dimension must be positive, got " + std::to_string(preprocessing_dim));
}

at::Tensor MeanMapper::forward(const at::Tensor& features) const {
  if (features.dim() < 1 || features.size(0) == 0 || features.numel() == 0)
    throw std::invalid_argument("features to pool must be a non-empty [N, ...] tensor");
  return at::adaptive_avg_pool1d(features.reshape({features.size(0), 1, -1}), {preprocessing_dim_}).squeeze(1);
}

Preprocessing::Preprocessing(std::vector<int64_t> input_dims, int64_t output_dim)
    : input_dims_(std::move(input_dims)), output_dim_(output_dim) {
  if (input_dims_.empty()) throw std::invalid_argument("Preprocessing: no input dimensions");
  for (size_t i = 0; i < input_dims_.size(); ++i) preprocessing_modules_.emplace_back(output_dim_);
}

at::Tensor Preprocessing::forward(const std::vector<at::Tensor>& features) const {
  if (features.size() != preprocessing_modules_.size())
    throw std::invalid_argument("Preprocessing: got " + std::to_string(features.size()) + " layers, built for " +
                                std::to_string(preprocessing_modules_.size()));
  std::vector<at::Tensor> mapped;
  for (size_t i = 0; i < features.size(); ++i) {
    if (features[i].dim() < 2 || features[i].size(1) != input_dims_[i])
      throw std::invalid_argument(
          "Preprocessing: layer " + std::to_string(i) + " has " +
          (features[i].dim() < 2 ? std::string("no channel axis") : std::to_string(features[i].size(1)) + " channels") +
          ", expected " + std::to_string(input_dims_[i]));
    mapped.push_back(preprocessing_modules_[i].forward(features[i]));
  }
  return at::stack(mapped, 1);
}

}  // namespace patchcore

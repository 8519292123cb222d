#pragma once
// common.NetworkFeatureAggregator: intermediate features of a backbone, by layer name.

#include <memory>
#include <string>
#include <vector>

#include "patchcore/backbone/backbone.h"

namespace patchcore {

class NetworkFeatureAggregator {
 public:
  // `device` is "cpu", "cuda", "cuda:1", ...; an unavailable device is an error, never a silent fallback.
  NetworkFeatureAggregator(std::shared_ptr<Backbone> backbone, std::vector<std::string> layers_to_extract_from,
                           const std::string& device = "cpu");

  // images [B, 3, H, W] → layer name → [B, C, h, w], in layers_to_extract_from order. The backbone
  // stops after the last requested layer. Thread-safe: the backbone is only read.
  torch::OrderedDict<std::string, at::Tensor> forward(const at::Tensor& images) const;
  torch::OrderedDict<std::string, at::Tensor> operator()(const at::Tensor& images) const { return forward(images); }

  // Channel count of each requested layer for images of `input_shape` (channels, height, width).
  std::vector<int64_t> feature_dimensions(const std::vector<int64_t>& input_shape) const;
  // The published PatchCore.load's BatchNorm update (Backbone::apply_reference_batchnorm_update) with its input,
  // one all-ones image of `input_shape` on this aggregator's device, as far as the last requested layer.
  bool update_batchnorm_statistics(const std::vector<int64_t>& input_shape, std::string* why_not);

  const std::vector<std::string>& layers_to_extract_from() const { return layers_; }
  const c10::Device& device() const { return device_; }
  const std::shared_ptr<Backbone>& backbone() const { return backbone_; }

 private:
  std::shared_ptr<Backbone> backbone_;
  std::vector<std::string> layers_;
  c10::Device device_;
};

}  // namespace patchcore

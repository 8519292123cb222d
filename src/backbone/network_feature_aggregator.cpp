#include "patchcore/backbone/network_feature_aggregator.h"

#include <ATen/ATen.h>

#include <stdexcept>

#include "patchcore/core/device.h"

namespace patchcore {

NetworkFeatureAggregator::NetworkFeatureAggregator(std::shared_ptr<Backbone> backbone,
                                                   std::vector<std::string> layers_to_extract_from,
                                                   const std::string& device)
    : backbone_(std::move(backbone)), layers_(std::move(layers_to_extract_from)), device_(parse_device(device)) {
  if (!backbone_) throw std::invalid_argument("NetworkFeatureAggregator: backbone is null");
  backbone_->check_layers(layers_);
  backbone_->to(device_);
}

torch::OrderedDict<std::string, at::Tensor> NetworkFeatureAggregator::forward(const at::Tensor& images) const {
  return backbone_->extract(images.to(device_), layers_);
}

std::vector<int64_t> NetworkFeatureAggregator::feature_dimensions(const std::vector<int64_t>& input_shape) const {
  if (input_shape.size() != 3)
    throw std::invalid_argument("feature_dimensions: input_shape must be (channels, height, width)");
  std::vector<int64_t> batch_shape{1};
  batch_shape.insert(batch_shape.end(), input_shape.begin(), input_shape.end());
  auto features = forward(at::ones(batch_shape));
  std::vector<int64_t> dims;
  for (const auto& layer : layers_) dims.push_back(features[layer].size(1));
  return dims;
}

}  // namespace patchcore

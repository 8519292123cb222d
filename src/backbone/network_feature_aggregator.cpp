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

namespace {

// One all-ones image of `input_shape` (channels, height, width), as the reference probes its backbone with.
at::Tensor ones_image(const std::vector<int64_t>& input_shape, const char* who) {
  if (input_shape.size() != 3)
    throw std::invalid_argument(std::string(who) + ": input_shape must be (channels, height, width)");
  std::vector<int64_t> batch_shape{1};
  batch_shape.insert(batch_shape.end(), input_shape.begin(), input_shape.end());
  return at::ones(batch_shape);
}

}  // namespace

std::vector<int64_t> NetworkFeatureAggregator::feature_dimensions(const std::vector<int64_t>& input_shape) const {
  auto features = forward(ones_image(input_shape, "feature_dimensions"));
  std::vector<int64_t> dims;
  for (const auto& layer : layers_) dims.push_back(features[layer].size(1));
  return dims;
}

bool NetworkFeatureAggregator::update_batchnorm_statistics(const std::vector<int64_t>& input_shape,
                                                           std::string* why_not) {
  return backbone_->apply_reference_batchnorm_update(ones_image(input_shape, "update_batchnorm_statistics").to(device_),
                                                     layers_, why_not);
}

}  // namespace patchcore

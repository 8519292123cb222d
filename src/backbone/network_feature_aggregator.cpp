#include "patchcore/backbone/network_feature_aggregator.h"

#include <stdexcept>

namespace patchcore {

torch::Device parse_device(const std::string& device) {
  torch::Device parsed(torch::kCPU);
  try {
    parsed = torch::Device(device);
  } catch (const c10::Error&) {
    throw std::invalid_argument("unknown device '" + device + "'; use cpu or cuda[:N]");
  }
  if (parsed.is_cuda()) {
    if (!torch::cuda::is_available())
      throw std::invalid_argument("device '" + device + "' requested but this libtorch has no usable CUDA device");
    if (parsed.has_index() && parsed.index() >= static_cast<int64_t>(torch::cuda::device_count()))
      throw std::invalid_argument("device '" + device + "' does not exist");
  } else if (!parsed.is_cpu()) {
    throw std::invalid_argument("unsupported device '" + device + "'; use cpu or cuda[:N]");
  }
  return parsed;
}

NetworkFeatureAggregator::NetworkFeatureAggregator(std::shared_ptr<Backbone> backbone,
                                                   std::vector<std::string> layers_to_extract_from,
                                                   const std::string& device)
    : backbone_(std::move(backbone)), layers_(std::move(layers_to_extract_from)), device_(parse_device(device)) {
  if (!backbone_) throw std::invalid_argument("NetworkFeatureAggregator: backbone is null");
  backbone_->check_layers(layers_);
  backbone_->to(device_);
}

torch::OrderedDict<std::string, torch::Tensor> NetworkFeatureAggregator::forward(const torch::Tensor& images) const {
  return backbone_->extract(images.to(device_), layers_);
}

std::vector<int64_t> NetworkFeatureAggregator::feature_dimensions(const std::vector<int64_t>& input_shape) const {
  if (input_shape.size() != 3)
    throw std::invalid_argument("feature_dimensions: input_shape must be (channels, height, width)");
  std::vector<int64_t> batch_shape{1};
  batch_shape.insert(batch_shape.end(), input_shape.begin(), input_shape.end());
  auto features = forward(torch::ones(batch_shape));
  std::vector<int64_t> dims;
  for (const auto& layer : layers_) dims.push_back(features[layer].size(1));
  return dims;
}

}  // namespace patchcore

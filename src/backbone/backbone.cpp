#include "patchcore/backbone/backbone.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <filesystem>
#include <stdexcept>

#include "layer_names.h"
#include "patchcore/backbone/resnet.h"
#include "patchcore/backbone/torchscript_backbone.h"

namespace patchcore {

const char* to_string(BatchNormStatistics statistics) {
  return statistics == BatchNormStatistics::kReferenceUpdate ? "reference_update" : "checkpoint";
}

BatchNormStatistics parse_batchnorm_statistics(const std::string& name) {
  if (name == "reference_update") return BatchNormStatistics::kReferenceUpdate;
  if (name == "checkpoint") return BatchNormStatistics::kCheckpoint;
  throw std::invalid_argument("unknown BatchNorm statistics '" + name + "' (reference_update or checkpoint)");
}

bool Backbone::apply_reference_batchnorm_update(const at::Tensor& images, const std::vector<std::string>& layers,
                                                std::string* why_not) {
  if (batchnorm_statistics_ == BatchNormStatistics::kReferenceUpdate) return true;
  if (!has_batchnorm()) {
    if (why_not) *why_not = name() + " has no BatchNorm layers";
    return false;
  }
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> saved;
  for (const at::Tensor& buffer : buffers()) saved.push_back(buffer.clone());
  set_training(true);
  try {
    extract(images, layers);
  } catch (const std::exception& e) {
    const std::vector<at::Tensor> current = buffers();
    for (size_t i = 0; i < current.size() && i < saved.size(); ++i) current[i].copy_(saved[i]);
    set_training(false);
    if (why_not) *why_not = name() + " cannot run in training mode: " + e.what();
    return false;
  }
  set_training(false);
  batchnorm_statistics_ = BatchNormStatistics::kReferenceUpdate;
  return true;
}

void Backbone::write_weights(const std::string& path) const {
  if (weights_path_.empty())
    throw std::logic_error("Backbone: the weights of " + name() + " were not loaded from a file and cannot be saved");
  std::filesystem::copy_file(weights_path_, path);
}

void Backbone::check_layers(const std::vector<std::string>& layers) const {
  if (layers.empty()) throw std::invalid_argument(name() + ": no layers to extract from");
  const auto known = layer_names();
  for (const auto& layer : layers) {
    if (std::find(known.begin(), known.end(), layer) == known.end())
      throw std::invalid_argument(name() + ": unknown layer '" + layer + "'; known layers: " + join_names(known));
  }
}

std::shared_ptr<Backbone> load_backbone(const std::string& name, const std::string& weights_path,
                                        const std::vector<std::string>& layers) {
  if (name == "torchscript") return std::make_shared<TorchScriptBackbone>(weights_path);
  auto backbone = std::make_shared<ResNetBackbone>(name, layers);
  backbone->check_layers(layers);
  backbone->load_checkpoint(weights_path);
  return backbone;
}

}  // namespace patchcore

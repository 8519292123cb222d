#include "patchcore/backbone/torchscript_backbone.h"

#include <torch/script.h>

#include <map>
#include <sstream>
#include <stdexcept>

#include "patchcore/core/file.h"

#include "layer_names.h"

namespace patchcore {

TorchScriptBackbone::TorchScriptBackbone(const std::string& path) : path_(path) {
  weights_path_ = path;
  try {
    module_ = std::make_shared<torch::jit::Module>(torch::jit::load(path));
  } catch (const c10::Error& e) {
    throw std::runtime_error(path + ": not a loadable TorchScript module: " + e.what_without_backtrace());
  }
  module_->eval();
}

TorchScriptBackbone::TorchScriptBackbone(std::string serialized, const std::string& name)
    : path_(name), serialized_(std::move(serialized)) {
  try {
    std::istringstream in(serialized_);
    module_ = std::make_shared<torch::jit::Module>(torch::jit::load(in));
  } catch (const c10::Error& e) {
    throw std::runtime_error(name + ": not a loadable TorchScript module: " + e.what_without_backtrace());
  }
  module_->eval();
}

TorchScriptBackbone::~TorchScriptBackbone() = default;

void TorchScriptBackbone::write_weights(const std::string& path) const {
  if (serialized_.empty()) return Backbone::write_weights(path);
  write_file_atomically(path, serialized_);
}

void TorchScriptBackbone::to(const c10::Device& device) { module_->to(device); }

void TorchScriptBackbone::set_training(bool training) { module_->train(training); }

std::vector<at::Tensor> TorchScriptBackbone::buffers() const {
  std::vector<at::Tensor> out;
  for (const auto& buffer : module_->buffers(/*recurse=*/true)) out.push_back(buffer);
  return out;
}

bool TorchScriptBackbone::has_batchnorm() const {
  for (const auto& buffer : module_->named_buffers(/*recurse=*/true)) {
    const std::string& name = buffer.name;
    if (name == "running_mean" || (name.size() > 13 && name.compare(name.size() - 13, 13, ".running_mean") == 0))
      return true;
  }
  return false;
}

std::vector<std::string> TorchScriptBackbone::layer_names() const {
  const std::lock_guard<std::mutex> lock(names_mutex_);
  return output_names_;
}

torch::OrderedDict<std::string, at::Tensor> TorchScriptBackbone::extract(const at::Tensor& images,
                                                                         const std::vector<std::string>& layers) const {
  if (layers.empty()) throw std::invalid_argument(name() + ": no layers to extract from");
  torch::NoGradGuard no_grad;
  c10::IValue result;
  try {
    result = module_->forward({images});
  } catch (const c10::Error& e) {
    throw std::runtime_error(path_ + ": forward failed: " + e.what_without_backtrace());
  }
  std::map<std::string, at::Tensor> found;
  std::vector<std::string> names;
  if (result.isGenericDict()) {
    for (const auto& item : result.toGenericDict()) {
      if (!item.key().isString() || !item.value().isTensor())
        throw std::runtime_error(path_ + ": forward must return Dict[str, Tensor]");
      names.push_back(item.key().toStringRef());
      found[names.back()] = item.value().toTensor();
    }
  } else if (result.isTensor() && layers.size() == 1) {
    names = {layers[0]};
    found[layers[0]] = result.toTensor();
  } else {
    throw std::runtime_error(path_ + ": forward must return Dict[str, Tensor] (or one Tensor for one layer), got " +
                             result.tagKind());
  }
  {
    const std::lock_guard<std::mutex> lock(names_mutex_);
    output_names_ = names;
  }
  for (const auto& l : layers)
    if (!found.count(l))
      throw std::invalid_argument(path_ + ": unknown layer '" + l + "'; module outputs: " + join_names(names));
  return in_request_order(found, layers);
}

}  // namespace patchcore

#pragma once
// Backbones that NetworkFeatureAggregator reads intermediate features from: a torchvision ResNet built natively
// (resnet.h) or any network as TorchScript (torchscript_backbone.h).
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <torch/ordered_dict.h>

#include <memory>
#include <string>
#include <vector>

namespace patchcore {

class Backbone {
 public:
  virtual ~Backbone() = default;
  // The architecture as load_backbone() takes it: "resnet18", ..., or "torchscript".
  virtual std::string architecture() const = 0;
  // For messages: the architecture, and for TorchScript the file.
  virtual std::string name() const = 0;
  // Layer names this backbone can return, in execution order.
  virtual std::vector<std::string> layer_names() const = 0;
  // Runs the network on `images` [B, 3, H, W] only as far as the deepest of `layers` and returns the
  // output of each requested layer, in the order requested. Throws on unknown layer names. Thread-safe: a
  // loaded backbone serves concurrent calls.
  virtual torch::OrderedDict<std::string, at::Tensor> extract(const at::Tensor& images,
                                                              const std::vector<std::string>& layers) const = 0;
  virtual void to(const c10::Device& device) = 0;
  // Throws std::invalid_argument naming the layer and listing the valid names.
  virtual void check_layers(const std::vector<std::string>& layers) const;
  // The checkpoint or TorchScript file the weights came from; empty when set in memory.
  const std::string& weights_path() const { return weights_path_; }

 protected:
  std::string weights_path_;
};

// "resnet18" etc. with a torchvision checkpoint, or "torchscript" with a TorchScript file.
std::shared_ptr<Backbone> load_backbone(const std::string& architecture, const std::string& weights_path,
                                        const std::vector<std::string>& layers);

}  // namespace patchcore

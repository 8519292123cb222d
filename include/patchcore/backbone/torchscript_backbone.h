#pragma once
// Any network as a Backbone, given as a TorchScript file.
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "patchcore/backbone/backbone.h"

namespace torch::jit {
struct Module;
}

namespace patchcore {

// A TorchScript module whose forward(images) returns either a Dict[str, Tensor] of named outputs (as
// torchvision's create_feature_extractor does, scripted) or a single Tensor (then exactly one layer name
// is expected). The whole module runs; it cannot be stopped early.
class TorchScriptBackbone : public Backbone {
 public:
  explicit TorchScriptBackbone(const std::string& path);
  // A module serialised in memory (torch.jit.save to a buffer); `name` stands for it in messages. The bytes are
  // kept, so that a model saved with this backbone carries them as its TorchScript file.
  TorchScriptBackbone(std::string serialized, const std::string& name);
  ~TorchScriptBackbone() override;
  std::string architecture() const override { return "torchscript"; }
  std::string name() const override { return "torchscript:" + path_; }
  void write_weights(const std::string& path) const override;
  // The module's output names, known once it has run (empty before).
  std::vector<std::string> layer_names() const override;
  // Output names are only known once the module has run; extract() checks them then.
  void check_layers(const std::vector<std::string>&) const override {}
  torch::OrderedDict<std::string, at::Tensor> extract(const at::Tensor& images,
                                                      const std::vector<std::string>& layers) const override;
  void to(const c10::Device& device) override;
  const torch::jit::Module& module() const { return *module_; }

 protected:
  void set_training(bool training) override;
  std::vector<at::Tensor> buffers() const override;
  // Whether any submodule has a buffer named running_mean.
  bool has_batchnorm() const override;

 private:
  std::string path_;
  std::string serialized_;  // for a module given in memory
  std::shared_ptr<torch::jit::Module> module_;
  mutable std::mutex names_mutex_;  // extract() runs concurrently
  mutable std::vector<std::string> output_names_;
};

}  // namespace patchcore

#pragma once
// Backbones that NetworkFeatureAggregator can read intermediate features from.
//
// The torchvision ResNet family is defined natively with torchvision's module names, so the keys of
// torchvision's published checkpoints ("layer2.0.downsample.1.running_mean", ...) map one to one onto
// named_parameters()/named_buffers(). Any other network can be given as a TorchScript module.
#include <torch/torch.h>

#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace patchcore {

class Backbone {
 public:
  virtual ~Backbone() = default;
  virtual std::string name() const = 0;
  // Layer names this backbone can return, in execution order.
  virtual std::vector<std::string> layer_names() const = 0;
  // Runs the network on `images` [B, 3, H, W] only as far as the deepest of `layers` and returns the
  // output of each requested layer, in the order requested. Throws on unknown layer names.
  virtual torch::OrderedDict<std::string, torch::Tensor> extract(const torch::Tensor& images,
                                                                 const std::vector<std::string>& layers) = 0;
  virtual void to(const torch::Device& device) = 0;
  // Throws std::invalid_argument naming the layer and listing the valid names.
  virtual void check_layers(const std::vector<std::string>& layers) const;
  // The checkpoint or TorchScript file the weights came from; empty when set in memory.
  const std::string& weights_path() const { return weights_path_; }

 protected:
  std::string weights_path_;
};

// torchvision.models.resnet.BasicBlock / Bottleneck, with torchvision's attribute names.
struct BasicBlockImpl : torch::nn::Module {
  BasicBlockImpl(int64_t inplanes, int64_t planes, int64_t stride, bool downsample);
  torch::Tensor forward(torch::Tensor x);
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr}, bn2{nullptr};
  torch::nn::Sequential downsample{nullptr};
};
TORCH_MODULE(BasicBlock);

struct BottleneckImpl : torch::nn::Module {
  BottleneckImpl(int64_t inplanes, int64_t planes, int64_t stride, bool downsample, int64_t groups, int64_t base_width);
  torch::Tensor forward(torch::Tensor x);
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr}, conv3{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr}, bn2{nullptr}, bn3{nullptr};
  torch::nn::Sequential downsample{nullptr};
};
TORCH_MODULE(Bottleneck);

struct ResNetConfig {
  std::string name;
  bool bottleneck = false;
  std::vector<int64_t> blocks;  // per stage, layer1..layer4
  int64_t groups = 1;
  int64_t width_per_group = 64;
};

// Known architectures: resnet18/34/50/101/152, wide_resnet50_2, wide_resnet101_2, resnext50_32x4d,
// resnext101_32x8d. Throws std::invalid_argument for anything else, listing the known names.
ResNetConfig resnet_config(const std::string& name);
std::vector<std::string> resnet_names();

// torchvision.models.ResNet up to `num_stages` of layer1..layer4, the last of them cut after
// `last_stage_blocks` blocks (all when -1). The pooling head and fc are never needed for patch features,
// so they and everything past the deepest requested layer are not even constructed: their weights need
// not be in the checkpoint.
struct ResNetImpl : torch::nn::Module {
  ResNetImpl(const ResNetConfig& config, int num_stages = 4, int64_t last_stage_blocks = -1);
  torch::nn::Conv2d conv1{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr};
  torch::nn::Functional relu{nullptr};
  torch::nn::MaxPool2d maxpool{nullptr};
  std::vector<torch::nn::Sequential> layers;  // registered as "layer1", "layer2", ...
  ResNetConfig config;
};
TORCH_MODULE(ResNet);

// A torchvision ResNet as a Backbone. Layer names: conv1, bn1, relu, maxpool, layer1..layer4 and single
// blocks inside them such as "layer2.3" or "layer3.0".
class ResNetBackbone : public Backbone {
 public:
  // Builds the architecture up to the deepest layer in `layers` (all four stages if empty).
  ResNetBackbone(const std::string& architecture, const std::vector<std::string>& layers = {});
  std::string name() const override { return resnet_->config.name; }
  std::vector<std::string> layer_names() const override;
  torch::OrderedDict<std::string, torch::Tensor> extract(const torch::Tensor& images,
                                                         const std::vector<std::string>& layers) override;
  void to(const torch::Device& device) override { resnet_->to(device); }
  // Copies tensors from a torchvision state dict (see checkpoint.h). Every parameter and buffer of the
  // constructed stages must be present with the right shape; keys of stages that were not constructed
  // (layer4, fc) are ignored. Errors name the checkpoint and the tensor.
  void load_checkpoint(const std::string& path);
  void load_state_dict(const std::vector<std::pair<std::string, torch::Tensor>>& state, const std::string& source);
  ResNet module() const { return resnet_; }

 private:
  // The network for inference on the CPU: each convolution with its BatchNorm folded in and its weights
  // reordered once into oneDNN's blocked layout, activations kept in that layout between layers. It halves
  // the backbone's time against running the modules (which reorder every weight on every call). Derived from
  // the modules' current tensors, and derived again when any of them has changed since.
  struct Folded;
  std::shared_ptr<const Folded> folded();
  // Whether extract() can run the folded network for these images and layers (eval mode, float32 on the
  // CPU, oneDNN present, and no layer inside the stem's conv1 -> bn1 -> relu, which folding merges).
  bool can_fold(const torch::Tensor& images, const std::vector<std::string>& layers) const;

  ResNet resnet_{nullptr};
  std::mutex folded_mutex_;
  std::shared_ptr<const Folded> folded_;
};

// A TorchScript module whose forward(images) returns either a Dict[str, Tensor] of named outputs (as
// torchvision's create_feature_extractor does, scripted) or a single Tensor (then exactly one layer name
// is expected). The whole module runs; it cannot be stopped early.
class TorchScriptBackbone : public Backbone {
 public:
  explicit TorchScriptBackbone(const std::string& path);
  std::string name() const override { return "torchscript:" + path_; }
  std::vector<std::string> layer_names() const override { return output_names_; }
  // Output names are only known once the module has run; extract() checks them then.
  void check_layers(const std::vector<std::string>&) const override {}
  torch::OrderedDict<std::string, torch::Tensor> extract(const torch::Tensor& images,
                                                         const std::vector<std::string>& layers) override;
  void to(const torch::Device& device) override;

 private:
  std::string path_;
  std::shared_ptr<torch::jit::Module> module_;
  std::vector<std::string> output_names_;  // from the latest run
};

// "resnet18" etc. with a torchvision checkpoint, or "torchscript" with a TorchScript file.
std::shared_ptr<Backbone> load_backbone(const std::string& name, const std::string& weights_path,
                                        const std::vector<std::string>& layers);

}  // namespace patchcore

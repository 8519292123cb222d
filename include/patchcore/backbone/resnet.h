#pragma once
// The torchvision ResNet family, defined natively with torchvision's module names, so that the keys of
// torchvision's published checkpoints ("layer2.0.downsample.1.running_mean", ...) map one to one onto
// named_parameters()/named_buffers().
#include <torch/nn/module.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/functional.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/pooling.h>

#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "patchcore/backbone/backbone.h"

namespace patchcore {

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
  std::string architecture() const override { return resnet_->config.name; }
  std::string name() const override { return resnet_->config.name; }
  std::vector<std::string> layer_names() const override;
  torch::OrderedDict<std::string, at::Tensor> extract(const at::Tensor& images,
                                                      const std::vector<std::string>& layers) const override;
  void to(const c10::Device& device) override { resnet_->to(device); }
  // Copies tensors from a torchvision state dict (see checkpoint.h). Every parameter and buffer of the
  // constructed stages must be present with the right shape; keys of stages that were not constructed
  // (layer4, fc) are ignored. Errors name the checkpoint and the tensor.
  void load_checkpoint(const std::string& path);
  void load_state_dict(const std::vector<std::pair<std::string, at::Tensor>>& state, const std::string& source);
  ResNet module() const { return resnet_; }

 protected:
  void set_training(bool training) override { resnet_->train(training); }
  std::vector<at::Tensor> buffers() const override { return resnet_->buffers(); }
  bool has_batchnorm() const override { return true; }

 private:
  // The network for inference on the CPU: each convolution with its BatchNorm folded in and its weights
  // reordered once into oneDNN's blocked layout, activations kept in that layout between layers. It halves
  // the backbone's time against running the modules (which reorder every weight on every call). Derived from
  // the modules' current tensors, and derived again when any of them has changed since.
  struct Folded;
  std::shared_ptr<const Folded> folded() const;
  // Whether extract() can run the folded network for these images and layers (eval mode, float32 on the
  // CPU, oneDNN present, and no layer inside the stem's conv1 -> bn1 -> relu, which folding merges).
  bool can_fold(const at::Tensor& images, const std::vector<std::string>& layers) const;

  ResNet resnet_{nullptr};
  mutable std::mutex folded_mutex_;
  mutable std::shared_ptr<const Folded> folded_;
};

}  // namespace patchcore

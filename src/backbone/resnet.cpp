#include "patchcore/backbone/resnet.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/nn/functional/pooling.h>
#include <torch/utils.h>

#include <algorithm>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <stdexcept>

#include "layer_names.h"
#include "patchcore/core/tensor_checks.h"
#include "patchcore/io/checkpoint.h"

namespace patchcore {
namespace nn = torch::nn;

namespace {

nn::Conv2d conv(int64_t in, int64_t out, int64_t kernel, int64_t stride, int64_t groups = 1) {
  return nn::Conv2d(nn::Conv2dOptions(in, out, kernel).stride(stride).padding(kernel / 2).groups(groups).bias(false));
}

nn::Sequential downsample_path(int64_t in, int64_t out, int64_t stride) {
  return nn::Sequential(conv(in, out, 1, stride), nn::BatchNorm2d(out));
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Stage index (1..4) a layer name lives in, 0 for the stem.
int stage_of(const std::string& layer) {
  if (layer.rfind("layer", 0) == 0 && layer.size() > 5 && layer[5] >= '1' && layer[5] <= '4') return layer[5] - '0';
  return 0;
}

// A convolution with the BatchNorm that follows it folded in (eval mode: y = (conv(x) - mean) * scale + beta
// with scale = gamma / sqrt(var + eps)), weights in oneDNN's blocked layout for the convolution's geometry.
struct FoldedConv {
  torch::Tensor weight, bias;  // oneDNN tensors
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups = 1;

  FoldedConv(const nn::Conv2dImpl& conv, const nn::BatchNorm2dImpl& bn) {
    const auto& o = conv.options;
    stride = at::IntArrayRef(o.stride()).vec();
    padding = at::IntArrayRef(c10::get<torch::ExpandingArray<2>>(o.padding())).vec();
    dilation = at::IntArrayRef(o.dilation()).vec();
    groups = o.groups();
    // In double, so that folding adds no more than the final rounding to float.
    const torch::Tensor scale =
        bn.weight.to(torch::kFloat64) / (bn.running_var.to(torch::kFloat64) + bn.options.eps()).sqrt();
    torch::Tensor shift = bn.bias.to(torch::kFloat64) - bn.running_mean.to(torch::kFloat64) * scale;
    if (conv.bias.defined()) shift += conv.bias.to(torch::kFloat64) * scale;
    const torch::Tensor folded = (conv.weight.to(torch::kFloat64) * scale.view({-1, 1, 1, 1})).to(torch::kFloat32);
    weight = at::mkldnn_reorder_conv2d_weight(folded.contiguous().to_mkldnn(), padding, stride, dilation, groups);
    bias = shift.to(torch::kFloat32).to_mkldnn();
  }

  torch::Tensor operator()(const torch::Tensor& x) const {
    return at::mkldnn_convolution(x, weight, bias, padding, stride, dilation, groups);
  }
};

// A BasicBlock (two convolutions) or Bottleneck (three), each convolution but the last followed by ReLU.
struct FoldedBlock {
  std::vector<FoldedConv> convs;
  std::optional<FoldedConv> downsample;

  explicit FoldedBlock(nn::Module& block) {
    nn::Sequential down{nullptr};
    if (auto* basic = block.as<BasicBlockImpl>()) {
      convs = {FoldedConv(*basic->conv1, *basic->bn1), FoldedConv(*basic->conv2, *basic->bn2)};
      down = basic->downsample;
    } else {
      auto& b = *block.as<BottleneckImpl>();
      convs = {FoldedConv(*b.conv1, *b.bn1), FoldedConv(*b.conv2, *b.bn2), FoldedConv(*b.conv3, *b.bn3)};
      down = b.downsample;
    }
    if (down) downsample.emplace(*down->ptr(0)->as<nn::Conv2dImpl>(), *down->ptr(1)->as<nn::BatchNorm2dImpl>());
  }

  torch::Tensor operator()(const torch::Tensor& x) const {
    torch::Tensor out = x;
    for (size_t i = 0; i < convs.size(); ++i) {
      out = convs[i](out);
      if (i + 1 < convs.size()) out.relu_();
    }
    out.add_(downsample ? (*downsample)(x) : x);
    return out.relu_();
  }
};

// Identifies the tensors a folded network was derived from: their storage and in-place version.
std::vector<std::pair<const void*, int64_t>> tensor_versions(const nn::Module& module) {
  std::vector<std::pair<const void*, int64_t>> versions;
  for (const auto& t : module.parameters()) versions.emplace_back(t.data_ptr(), t._version());
  for (const auto& t : module.buffers()) versions.emplace_back(t.data_ptr(), t._version());
  return versions;
}

}  // namespace

struct ResNetBackbone::Folded {
  std::vector<std::pair<const void*, int64_t>> versions;
  FoldedConv stem;  // conv1 with bn1
  nn::MaxPool2dOptions maxpool;
  std::vector<std::vector<FoldedBlock>> stages;

  explicit Folded(ResNetImpl& resnet)
      : versions(tensor_versions(resnet)), stem(*resnet.conv1, *resnet.bn1), maxpool(resnet.maxpool->options) {
    for (auto& layer : resnet.layers) {
      stages.emplace_back();
      for (const auto& block : layer->children()) stages.back().emplace_back(*block);
    }
  }
};

BasicBlockImpl::BasicBlockImpl(int64_t inplanes, int64_t planes, int64_t stride, bool with_downsample) {
  conv1 = register_module("conv1", conv(inplanes, planes, 3, stride));
  bn1 = register_module("bn1", nn::BatchNorm2d(planes));
  conv2 = register_module("conv2", conv(planes, planes, 3, 1));
  bn2 = register_module("bn2", nn::BatchNorm2d(planes));
  if (with_downsample) downsample = register_module("downsample", downsample_path(inplanes, planes, stride));
}

torch::Tensor BasicBlockImpl::forward(torch::Tensor x) {
  auto out = torch::relu(bn1(conv1(x)));
  out = bn2(conv2(out));
  out += downsample ? downsample->forward(x) : x;
  return torch::relu(out);
}

BottleneckImpl::BottleneckImpl(int64_t inplanes, int64_t planes, int64_t stride, bool with_downsample, int64_t groups,
                               int64_t base_width) {
  const int64_t width = planes * base_width / 64 * groups;
  conv1 = register_module("conv1", conv(inplanes, width, 1, 1));
  bn1 = register_module("bn1", nn::BatchNorm2d(width));
  conv2 = register_module("conv2", conv(width, width, 3, stride, groups));
  bn2 = register_module("bn2", nn::BatchNorm2d(width));
  conv3 = register_module("conv3", conv(width, planes * 4, 1, 1));
  bn3 = register_module("bn3", nn::BatchNorm2d(planes * 4));
  if (with_downsample) downsample = register_module("downsample", downsample_path(inplanes, planes * 4, stride));
}

torch::Tensor BottleneckImpl::forward(torch::Tensor x) {
  auto out = torch::relu(bn1(conv1(x)));
  out = torch::relu(bn2(conv2(out)));
  out = bn3(conv3(out));
  out += downsample ? downsample->forward(x) : x;
  return torch::relu(out);
}

std::vector<std::string> resnet_names() {
  return {"resnet18",        "resnet34",         "resnet50",        "resnet101",       "resnet152",
          "wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d"};
}

ResNetConfig resnet_config(const std::string& name) {
  static const std::map<std::string, ResNetConfig> configs = {
      {"resnet18", {"resnet18", false, {2, 2, 2, 2}, 1, 64}},
      {"resnet34", {"resnet34", false, {3, 4, 6, 3}, 1, 64}},
      {"resnet50", {"resnet50", true, {3, 4, 6, 3}, 1, 64}},
      {"resnet101", {"resnet101", true, {3, 4, 23, 3}, 1, 64}},
      {"resnet152", {"resnet152", true, {3, 8, 36, 3}, 1, 64}},
      {"wide_resnet50_2", {"wide_resnet50_2", true, {3, 4, 6, 3}, 1, 128}},
      {"wide_resnet101_2", {"wide_resnet101_2", true, {3, 4, 23, 3}, 1, 128}},
      {"resnext50_32x4d", {"resnext50_32x4d", true, {3, 4, 6, 3}, 32, 4}},
      {"resnext101_32x8d", {"resnext101_32x8d", true, {3, 4, 23, 3}, 32, 8}},
  };
  auto it = configs.find(name);
  if (it == configs.end())
    throw std::invalid_argument("unknown backbone '" + name + "'; known: " + join_names(resnet_names()) +
                                ", torchscript");
  return it->second;
}

ResNetImpl::ResNetImpl(const ResNetConfig& cfg, int num_stages, int64_t last_stage_blocks) : config(cfg) {
  conv1 = register_module("conv1", nn::Conv2d(nn::Conv2dOptions(3, 64, 7).stride(2).padding(3).bias(false)));
  bn1 = register_module("bn1", nn::BatchNorm2d(64));
  relu = register_module("relu", nn::Functional(torch::relu));
  maxpool = register_module("maxpool", nn::MaxPool2d(nn::MaxPool2dOptions(3).stride(2).padding(1)));
  const int64_t expansion = cfg.bottleneck ? 4 : 1;
  int64_t inplanes = 64;
  for (int stage = 0; stage < num_stages; ++stage) {
    const int64_t planes = 64 << stage;
    const int64_t stride = stage == 0 ? 1 : 2;
    nn::Sequential blocks;
    int64_t num_blocks = cfg.blocks[static_cast<size_t>(stage)];
    if (stage == num_stages - 1 && last_stage_blocks >= 0) num_blocks = std::min(num_blocks, last_stage_blocks);
    for (int64_t b = 0; b < num_blocks; ++b) {
      const int64_t s = b == 0 ? stride : 1;
      const bool down = b == 0 && (s != 1 || inplanes != planes * expansion);
      if (cfg.bottleneck)
        blocks->push_back(Bottleneck(inplanes, planes, s, down, cfg.groups, cfg.width_per_group));
      else
        blocks->push_back(BasicBlock(inplanes, planes, s, down));
      inplanes = planes * expansion;
    }
    layers.push_back(register_module("layer" + std::to_string(stage + 1), blocks));
  }
}

ResNetBackbone::ResNetBackbone(const std::string& architecture, const std::vector<std::string>& layers) {
  int num_stages = layers.empty() ? 4 : 0;
  for (const auto& l : layers) num_stages = std::max(num_stages, stage_of(l));
  // Within the deepest stage, "layerK.i" needs blocks 0..i only; a plain "layerK" needs them all.
  int64_t last_stage_blocks = num_stages == 0 || layers.empty() ? -1 : 0;
  for (const auto& l : layers) {
    if (stage_of(l) != num_stages || num_stages == 0) continue;
    const auto dot = l.find('.');
    int64_t blocks = -1;
    if (dot == 6 && l.size() > 7 && l.find_first_not_of("0123456789", 7) == std::string::npos && l.size() < 12)
      blocks = std::stoll(l.substr(7)) + 1;
    last_stage_blocks = (blocks < 0 || last_stage_blocks < 0) ? -1 : std::max(last_stage_blocks, blocks);
  }
  resnet_ = ResNet(resnet_config(architecture), num_stages, last_stage_blocks);
  resnet_->eval();
}

std::vector<std::string> ResNetBackbone::layer_names() const {
  std::vector<std::string> names{"conv1", "bn1", "relu", "maxpool"};
  for (size_t s = 0; s < resnet_->layers.size(); ++s) {
    const std::string stage = "layer" + std::to_string(s + 1);
    names.push_back(stage);
    for (size_t b = 0; b < resnet_->layers[s]->size(); ++b) names.push_back(stage + "." + std::to_string(b));
  }
  return names;
}

bool ResNetBackbone::can_fold(const torch::Tensor& images, const std::vector<std::string>& layers) const {
  const torch::Tensor& weight = resnet_->conv1->weight;
  return at::hasMKLDNN() && !resnet_->is_training() && images.device().is_cpu() && weight.device().is_cpu() &&
         images.scalar_type() == torch::kFloat32 && weight.scalar_type() == torch::kFloat32 &&
         std::none_of(layers.begin(), layers.end(), [](const std::string& l) { return l == "conv1" || l == "bn1"; });
}

std::shared_ptr<const ResNetBackbone::Folded> ResNetBackbone::folded() const {
  std::lock_guard<std::mutex> lock(folded_mutex_);
  if (!folded_ || folded_->versions != tensor_versions(*resnet_)) {
    torch::NoGradGuard no_grad;
    folded_ = std::make_shared<const Folded>(*resnet_.ptr());
  }
  return folded_;
}

torch::OrderedDict<std::string, at::Tensor> ResNetBackbone::extract(const at::Tensor& images,
                                                                    const std::vector<std::string>& layers) const {
  check_layers(layers);
  if (images.dim() != 4 || images.size(1) != 3)
    throw std::invalid_argument(name() + ": expected images of shape [B, 3, H, W], got " + shape_string(images));
  torch::NoGradGuard no_grad;

  // The network as steps in execution order, each with the layer names its output answers to.
  using Step = std::function<torch::Tensor(const torch::Tensor&)>;
  std::vector<std::pair<std::vector<std::string>, Step>> steps;
  // Stage s's blocks as steps, block(b, x) running block b; the last also answers to the stage's name.
  auto add_stage = [&](size_t s, size_t count, std::function<torch::Tensor(size_t, const torch::Tensor&)> block) {
    const std::string stage = "layer" + std::to_string(s + 1);
    for (size_t b = 0; b < count; ++b) {
      std::vector<std::string> names{stage + "." + std::to_string(b)};
      if (b + 1 == count) names.push_back(stage);
      steps.emplace_back(names, [block, b](const torch::Tensor& t) { return block(b, t); });
    }
  };
  // Inference only reads the modules; their call operators are not const.
  ResNetImpl& net = *resnet_.ptr();
  torch::Tensor x = images;
  std::shared_ptr<const Folded> f;
  if (can_fold(images, layers)) {
    f = folded();
    x = images.contiguous().to_mkldnn();
    steps.push_back({{"relu"}, [&](const torch::Tensor& t) { return f->stem(t).relu_(); }});
    steps.push_back({{"maxpool"}, [&](const torch::Tensor& t) {
                       const auto& o = f->maxpool;
                       return torch::max_pool2d(t, o.kernel_size(), o.stride(), o.padding(), o.dilation(),
                                                o.ceil_mode());
                     }});
    for (size_t s = 0; s < f->stages.size(); ++s)
      add_stage(s, f->stages[s].size(), [&, s](size_t b, const torch::Tensor& t) { return f->stages[s][b](t); });
  } else {
    steps.push_back({{"conv1"}, [&](const torch::Tensor& t) { return net.conv1(t); }});
    steps.push_back({{"bn1"}, [&](const torch::Tensor& t) { return net.bn1(t); }});
    steps.push_back({{"relu"}, [&](const torch::Tensor& t) { return net.relu(t); }});
    steps.push_back({{"maxpool"}, [&](const torch::Tensor& t) { return net.maxpool(t); }});
    for (size_t s = 0; s < net.layers.size(); ++s)
      add_stage(s, net.layers[s]->size(),
                [&, s](size_t b, const torch::Tensor& t) { return (net.layers[s]->begin() + b)->forward(t); });
  }

  // Stops right after the deepest requested layer: deeper stages cost time and are never used.
  std::map<std::string, torch::Tensor> found;
  size_t remaining = std::set<std::string>(layers.begin(), layers.end()).size();
  for (const auto& [names, step] : steps) {
    x = step(x);
    for (const auto& layer : names) {
      if (std::find(layers.begin(), layers.end(), layer) == layers.end() || found.count(layer)) continue;
      // A plain copy of a oneDNN tensor: later steps update those in place.
      found[layer] = x.is_mkldnn() ? x.to_dense() : x;
      if (--remaining == 0) return in_request_order(found, layers);
    }
  }
  throw std::logic_error(name() + ": requested layers were not all reached");
}

void ResNetBackbone::load_checkpoint(const std::string& path) {
  load_state_dict(patchcore::load_state_dict(path), path);
  weights_path_ = path;
}

void ResNetBackbone::load_state_dict(const std::vector<std::pair<std::string, torch::Tensor>>& state,
                                     const std::string& source) {
  std::map<std::string, const torch::Tensor*> by_name;
  for (const auto& [key, tensor] : state) by_name[key] = &tensor;
  torch::NoGradGuard no_grad;
  auto assign = [&](const std::string& key, torch::Tensor& target, bool optional) {
    auto it = by_name.find(key);
    if (it == by_name.end()) {
      if (optional) return;
      throw std::runtime_error(source + ": missing tensor '" + key + "' needed by " + name());
    }
    const torch::Tensor& value = *it->second;
    if (value.sizes() != target.sizes())
      throw std::runtime_error(source + ": tensor '" + key + "' has shape " + shape_string(value) + ", " + name() +
                               " expects " + shape_string(target));
    if (!value.is_floating_point() && target.is_floating_point())
      throw std::runtime_error(source + ": tensor '" + key + "' has non-floating dtype " +
                               std::string(c10::toString(value.scalar_type())));
    target.copy_(value);
  };
  for (auto& p : resnet_->named_parameters()) assign(p.key(), p.value(), false);
  // Checkpoints from before BatchNorm counted its batches have no num_batches_tracked; eval never reads it.
  for (auto& b : resnet_->named_buffers()) assign(b.key(), b.value(), ends_with(b.key(), ".num_batches_tracked"));
}

}  // namespace patchcore

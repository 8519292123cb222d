#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <fstream>

#include "common_fixtures.h"
#include "patchcore/backbone/network_feature_aggregator.h"
#include "patchcore/backbone/resnet.h"
#include "patchcore/backbone/torchscript_backbone.h"
#include "patchcore/io/checkpoint.h"
#include "patchcore/io/image.h"

using namespace patchcore;
using test::error_of;
using test::load_golden;
using test::max_abs_diff;

namespace {

// The same deterministic weights as formula_weights() in scripts/fixtures/make_common.py.
void set_formula_weights(ResNetBackbone& backbone) {
  torch::NoGradGuard no_grad;
  auto set = [](const std::string& name, torch::Tensor& t) {
    if (name.size() >= 19 && name.compare(name.size() - 19, 19, "num_batches_tracked") == 0) return;
    int p = 0;
    for (char c : name) p += static_cast<unsigned char>(c);
    p %= 101;
    const auto i = torch::arange(t.numel(), torch::kFloat64);
    auto ends = [&](const std::string& s) {
      return name.size() >= s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0;
    };
    torch::Tensor v;
    if (t.dim() == 4) {
      const double fan_in = static_cast<double>(t.size(1) * t.size(2) * t.size(3));
      v = (2.0 / std::sqrt(fan_in)) * torch::sin(0.7 * i + 1.3 * p);
    } else if (ends("running_var")) {
      v = 1.0 + 0.5 * torch::sin(1.1 * i + p).pow(2);
    } else if (ends("running_mean")) {
      v = 0.1 * torch::sin(0.9 * i + 2 * p);
    } else if (ends("weight")) {
      v = 1.0 + 0.1 * torch::sin(0.3 * i + p);
    } else {
      v = 0.1 * torch::cos(0.5 * i + p);
    }
    t.copy_(v.reshape(t.sizes()).to(t.scalar_type()));
  };
  for (auto& p : backbone.module()->named_parameters()) set(p.key(), p.value());
  for (auto& b : backbone.module()->named_buffers()) set(b.key(), b.value());
}

torch::Tensor formula_images(int64_t batch, int64_t size) {
  auto grids =
      torch::meshgrid({torch::arange(batch), torch::arange(3), torch::arange(size), torch::arange(size)}, "ij");
  const auto &b = grids[0], &c = grids[1], &h = grids[2], &w = grids[3];
  return (1.5 * torch::sin(0.05 * (h * size + w) + c + 0.5 * b) + 0.3 * torch::cos(0.11 * h - 0.07 * w))
      .to(torch::kFloat32);
}

double relative_error(const torch::Tensor& actual, const torch::Tensor& expected) {
  return max_abs_diff(actual, expected) / expected.abs().max().item<double>();
}

}  // namespace

TEST(ResNetBackbone, Resnet18FeaturesMatchTorchvisionIncludingNestedLayers) {
  const std::vector<std::string> layers{"layer2", "layer3", "layer2.1", "layer3.0"};
  auto backbone = std::make_shared<ResNetBackbone>("resnet18", layers);
  set_formula_weights(*backbone);
  NetworkFeatureAggregator aggregator(backbone, layers, "cpu");
  const auto features = aggregator.forward(formula_images(2, 64));
  ASSERT_EQ(features.size(), 4u);
  EXPECT_EQ(features.keys(), layers);
  for (const auto& l : layers)
    EXPECT_LT(relative_error(features[l], load_golden("common/resnet18_formula_" + l + ".npy")), 1e-5) << l;
}

TEST(ResNetBackbone, FoldedInferenceFollowsTheModulesAndTheirChanges) {
  // extract() runs the convolutions with their BatchNorm folded in; a request for the stem's conv1 (which
  // folding merges away) runs the modules themselves, so both can be compared on the same weights.
  ResNetBackbone backbone("resnet18", {"layer2"});
  set_formula_weights(backbone);
  const torch::Tensor images = formula_images(2, 64);
  auto folded = [&] { return backbone.extract(images, {"layer2"})["layer2"]; };
  auto modules = [&] { return backbone.extract(images, {"conv1", "layer2"})["layer2"]; };
  const torch::Tensor before = folded();
  EXPECT_LT(relative_error(before, modules()), 1e-5);
  EXPECT_FALSE(torch::equal(before, modules()));  // two different computations, not one path twice

  // A tensor changed in place after the first run (a second load_state_dict does the same) is picked up.
  {
    torch::NoGradGuard no_grad;
    for (auto& b : backbone.module()->named_buffers())
      if (b.key() == "layer2.0.bn1.running_var") b.value().mul_(9.0);
  }
  const torch::Tensor after = folded();
  EXPECT_GT(relative_error(after, before), 1e-2);
  EXPECT_LT(relative_error(after, modules()), 1e-5);
}

TEST(ResNetBackbone, WideResnet50FeaturesMatchTorchvision) {
  const std::vector<std::string> layers{"layer2", "layer3"};
  auto backbone = std::make_shared<ResNetBackbone>("wide_resnet50_2", layers);
  set_formula_weights(*backbone);
  NetworkFeatureAggregator aggregator(backbone, layers);
  const auto features = aggregator.forward(formula_images(1, 64));
  for (const auto& l : layers)
    EXPECT_LT(relative_error(features[l], load_golden("common/wide_resnet50_2_formula_" + l + ".npy")), 1e-5) << l;
  EXPECT_EQ(aggregator.feature_dimensions({3, 64, 64}), (std::vector<int64_t>{512, 1024}));
}

TEST(ResNetBackbone, StopsAfterTheLastRequestedLayer) {
  // Only the stages up to the deepest requested layer are built, so deeper ones can never run.
  ResNetBackbone up_to_layer2("resnet18", {"layer1", "layer2.0"});
  EXPECT_EQ(up_to_layer2.module()->layers.size(), 2u);
  const auto names = up_to_layer2.layer_names();
  EXPECT_EQ(std::count(names.begin(), names.end(), "layer3"), 0);
  const auto features = up_to_layer2.extract(torch::zeros({1, 3, 64, 64}), {"layer2.0", "layer1"});
  EXPECT_EQ(features.keys(), (std::vector<std::string>{"layer2.0", "layer1"}));
  EXPECT_EQ(features["layer2.0"].sizes(), (std::vector<int64_t>{1, 128, 8, 8}));
}

TEST(ResNetBackbone, SharedWeightsReproduceTorchvisionOnARealTireImage) {
  PATCHCORE_REQUIRE_SHARED(weights, "weights/resnet18-imagenet-stem-to-layer3.pth");
  PATCHCORE_REQUIRE_SHARED(image, "data/tire/test/good/000.png");
  auto backbone = load_backbone("resnet18", weights, {"layer2", "layer3"});
  NetworkFeatureAggregator aggregator(backbone, {"layer2", "layer3"});
  const torch::Tensor input = ImageTransform{}.load(image).unsqueeze(0);
  const auto features = aggregator.forward(input);
  EXPECT_LE(max_abs_diff(features["layer2"], load_golden("common/tire_resnet18_layer2.npy")), 1e-4);
  EXPECT_LE(max_abs_diff(features["layer3"], load_golden("common/tire_resnet18_layer3.npy")), 1e-4);
  EXPECT_EQ(aggregator.feature_dimensions({3, 224, 224}), (std::vector<int64_t>{128, 256}));
}

TEST(ResNetBackbone, LoadsAllArchitecturesByName) {
  for (const auto& name : resnet_names()) {
    ResNetBackbone backbone(name, {"layer1"});
    const int64_t expected = resnet_config(name).bottleneck ? 256 : 64;
    EXPECT_EQ(backbone.extract(torch::zeros({1, 3, 32, 32}), {"layer1"})["layer1"].size(1), expected) << name;
  }
}

TEST(ResNetBackbone, ErrorsNameTheLayerOrTensor) {
  EXPECT_NE(error_of([] { ResNetBackbone("resnet19"); }).find("unknown backbone 'resnet19'"), std::string::npos);
  auto backbone = std::make_shared<ResNetBackbone>("resnet18", std::vector<std::string>{"layer2"});
  EXPECT_NE(error_of([&] { NetworkFeatureAggregator(backbone, {"layer9"}); }).find("unknown layer 'layer9'"),
            std::string::npos);
  EXPECT_NE(error_of([&] { NetworkFeatureAggregator(backbone, {"layer2.7"}); }).find("unknown layer 'layer2.7'"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              backbone->extract(torch::zeros({3, 64, 64}), {"layer2"});
            }).find("[B, 3, H, W]"),
            std::string::npos);

  // A state dict with one tensor missing and one of the wrong shape.
  StateDict state;
  for (const auto& p : backbone->module()->named_parameters()) state.emplace_back(p.key(), p.value().detach().clone());
  for (const auto& b : backbone->module()->named_buffers()) state.emplace_back(b.key(), b.value().clone());
  StateDict wrong_shape = state;
  for (auto& [key, t] : wrong_shape)
    if (key == "layer2.0.conv1.weight") t = torch::zeros({128, 64, 1, 1});
  EXPECT_NE(error_of([&] {
              backbone->load_state_dict(wrong_shape, "ckpt.pth");
            }).find("ckpt.pth: tensor 'layer2.0.conv1.weight' has shape [128, 64, 1, 1]"),
            std::string::npos);
  StateDict missing(state.begin() + 1, state.end());
  EXPECT_NE(error_of([&] { backbone->load_state_dict(missing, "ckpt.pth"); }).find("missing tensor 'conv1.weight'"),
            std::string::npos);
}

TEST(ResNetBackbone, LoadsTruncatedZipAndLegacyCheckpoints) {
  // Fixtures of scripts/fixtures/make_checkpoints.py: torchvision ResNet-18 keys, truncated after layer1.0.
  for (const char* file :
       {"checkpoints/resnet18_stem_layer1_0.zip.pth", "checkpoints/resnet18_stem_layer1_0.legacy.pth"}) {
    const StateDict state = load_state_dict(test::fixture(file));
    ResNetBackbone backbone("resnet18", {"layer1.0"});
    backbone.load_checkpoint(test::fixture(file));
    for (const auto& [key, value] : state)
      for (const auto& p : backbone.module()->named_parameters())
        if (p.key() == key) EXPECT_TRUE(torch::equal(p.value(), value)) << key;
    // The next block needs tensors the file does not have.
    ResNetBackbone deeper("resnet18", {"layer1.1"});
    EXPECT_NE(
        error_of([&] { deeper.load_checkpoint(test::fixture(file)); }).find("missing tensor 'layer1.1.conv1.weight'"),
        std::string::npos);
  }
}

TEST(TorchScriptBackbone, MissingOrInvalidFileIsAnError) {
  EXPECT_NE(error_of([] { TorchScriptBackbone("/nonexistent/model.pt"); }).find("/nonexistent/model.pt"),
            std::string::npos);
  const std::string path = test::temp_dir() + "/garbage.pt";
  std::ofstream(path) << "not a torchscript archive";
  EXPECT_NE(error_of([&] { TorchScriptBackbone{path}; }).find("not a loadable TorchScript module"), std::string::npos);
}

TEST(TorchScriptBackbone, AModuleSerialisedInMemoryRunsAndIsWrittenAsItsFile) {
  const std::string path = test::fixture("common/tiny_feature_extractor.pt");
  const std::string bytes = test::slurp(path);
  TorchScriptBackbone from_file(path), in_memory(bytes, "<module>");
  EXPECT_TRUE(in_memory.weights_path().empty());
  const at::Tensor images = formula_images(2, 16);
  const auto expected = from_file.extract(images, {"low", "high"}), got = in_memory.extract(images, {"low", "high"});
  EXPECT_TRUE(torch::equal(got["low"], expected["low"]));
  EXPECT_TRUE(torch::equal(got["high"], expected["high"]));
  const std::string written = test::temp_dir() + "/backbone.pt";
  in_memory.write_weights(written);
  EXPECT_EQ(test::slurp(written), bytes);
  EXPECT_NE(error_of([] { TorchScriptBackbone("garbage", "<module>"); }).find("<module>: not a loadable"),
            std::string::npos);
  // A network set in memory some other way has no file to write, and says so.
  EXPECT_NE(
      error_of([] { ResNetBackbone("resnet18").write_weights(test::temp_dir() + "/r.pth"); }).find("cannot be saved"),
      std::string::npos);
}

TEST(TorchScriptBackbone, ScriptedFeatureExtractorGivesNamedOutputs) {
  auto backbone = std::make_shared<TorchScriptBackbone>(test::fixture("common/tiny_feature_extractor.pt"));
  NetworkFeatureAggregator aggregator(backbone, {"high", "low"});
  const auto features = aggregator.forward(formula_images(2, 16));
  EXPECT_EQ(features.keys(), (std::vector<std::string>{"high", "low"}));
  EXPECT_LT(max_abs_diff(features["low"], load_golden("common/tiny_low.npy")), 1e-6);
  EXPECT_LT(max_abs_diff(features["high"], load_golden("common/tiny_high.npy")), 1e-6);
  EXPECT_EQ(aggregator.feature_dimensions({3, 16, 16}), (std::vector<int64_t>{8, 4}));
  NetworkFeatureAggregator unknown(backbone, {"middle"});
  EXPECT_NE(error_of([&] {
              unknown.forward(formula_images(1, 16));
            }).find("unknown layer 'middle'; module outputs: low, high"),
            std::string::npos);
}

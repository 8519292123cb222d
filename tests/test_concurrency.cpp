// One loaded PatchCore serves many threads: concurrent predictions equal serial ones bit for bit, with the
// native ResNet backbone and with a TorchScript one.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "patchcore/backbone/torchscript_backbone.h"
#include "patchcore/core/parallel.h"
#include "patchcore/io/dataset.h"
#include "patchcore/patchcore.h"
#include "common_fixtures.h"

using namespace patchcore;

namespace {

// Predicts every image alone, then all of them again from 8 threads at once in a different order each, and
// checks that each result has the serial one's bits.
void expect_concurrent_predictions_equal_serial(const PatchCore& model, const std::vector<torch::Tensor>& images) {
  std::vector<PredictResult> serial;
  for (const auto& image : images) serial.push_back(model.predict(image));

  constexpr int kThreads = 8;
  std::vector<std::vector<std::pair<size_t, PredictResult>>> concurrent(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::vector<size_t> order(images.size());
      for (size_t i = 0; i < order.size(); ++i) order[i] = i;
      std::shuffle(order.begin(), order.end(), std::mt19937(t));
      for (size_t i : order) concurrent[t].emplace_back(i, model.predict(images[i]));
    });
  }
  for (auto& thread : threads) thread.join();

  for (int t = 0; t < kThreads; ++t) {
    ASSERT_EQ(concurrent[t].size(), images.size());
    for (const auto& [i, result] : concurrent[t]) {
      ASSERT_EQ(result.scores.size(), 1u);
      EXPECT_EQ(std::memcmp(&result.scores[0], &serial[i].scores[0], sizeof(float)), 0)
          << "thread " << t << ", image " << i << ": " << result.scores[0] << " vs " << serial[i].scores[0];
      EXPECT_TRUE(torch::equal(result.masks[0], serial[i].masks[0])) << "thread " << t << ", image " << i;
    }
  }
}

}  // namespace

TEST(Concurrency, ResNetPredictionsEqualSerialOnesBitForBit) {
  PATCHCORE_REQUIRE_SHARED(weights, "weights/resnet18-imagenet-stem-to-layer3.pth");
  PATCHCORE_REQUIRE_SHARED(tire, "data/tire");
  set_num_threads(2);
  PatchCoreParams params;
  PatchCore model;
  model.load(load_backbone("resnet18", weights, params.layers_to_extract_from), params,
             std::make_shared<RandomSampler>(0.1, 0));
  std::vector<std::string> train;
  for (const auto& s : MVTecDataset::train(tire)) train.push_back(s.image_path);
  train.resize(3);
  model.fit(train);

  // Six test images of different kinds.
  const auto test_set = MVTecDataset::test(tire);
  ASSERT_GE(test_set.size(), 6u);
  std::vector<torch::Tensor> images;
  for (size_t i = 0; i < 6; ++i)
    images.push_back(params.transform.load(test_set[i * (test_set.size() - 1) / 5].image_path).unsqueeze(0));
  expect_concurrent_predictions_equal_serial(model, images);
}

TEST(Concurrency, TorchScriptPredictionsEqualSerialOnesBitForBit) {
  set_num_threads(2);
  // torchvision's create_feature_extractor over a two-convolution net, scripted (scripts/fixtures/make_common.py).
  auto backbone = std::make_shared<TorchScriptBackbone>(test::fixture("common/tiny_feature_extractor.pt"));
  const PatchCoreParams params = test::tiny_extractor_params();
  PatchCore model;
  model.load(backbone, params, std::make_shared<RandomSampler>(0.25, 0));
  torch::manual_seed(3);
  model.fit_features(model.embed(torch::randn({4, 3, 32, 32})));
  EXPECT_EQ(backbone->layer_names(), (std::vector<std::string>{"low", "high"}));

  std::vector<torch::Tensor> images;
  for (int i = 0; i < 6; ++i) images.push_back(torch::randn({1, 3, 32, 32}) * (1.0 + 0.2 * i));
  expect_concurrent_predictions_equal_serial(model, images);
}

// The per-image compute of predict apart from the search, at the reference's defaults: ResNet-18 up to
// layer3 on a 224 x 224 image, the embedding of layer2 (128 x 28 x 28) and layer3 (256 x 14 x 14) into
// 784 patches of 1024 values, and the 28 x 28 → 224 x 224 anomaly map. Argument: torch threads.
//
// The embedding runs both ways: PatchEmbedder (taps straight from the feature maps) and the step-by-step
// reference path (unfold, interpolate every channel-kernel plane, pool twice); tests/embedding/test_patch_embedder.cpp
// checks they agree.
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include "patchcore/backbone/resnet.h"
#include "patchcore/core/parallel.h"
#include "patchcore/embedding/patch_embedder.h"
#include "patchcore/segmentation/rescale_segmentor.h"

namespace {

const std::vector<std::string> kLayers{"layer2", "layer3"};

std::vector<torch::Tensor> tire_sized_features() {
  torch::manual_seed(3);
  return {torch::randn({1, 128, 28, 28}).relu(), torch::randn({1, 256, 14, 14}).relu()};
}

void BM_Backbone(benchmark::State& state) {
  patchcore::set_num_threads(static_cast<int>(state.range(0)));
  patchcore::ResNetBackbone backbone("resnet18", kLayers);
  const torch::Tensor image = torch::randn({1, 3, 224, 224});
  for (auto _ : state) benchmark::DoNotOptimize(backbone.extract(image, kLayers));
}

void BM_EmbeddingFast(benchmark::State& state) {
  patchcore::set_num_threads(static_cast<int>(state.range(0)));
  const auto features = tire_sized_features();
  const patchcore::PatchEmbedder embedder({128, 256}, 3, 1, 1024, 1024);
  for (auto _ : state) benchmark::DoNotOptimize(embedder.forward(features));
}

void BM_EmbeddingReference(benchmark::State& state) {
  patchcore::set_num_threads(static_cast<int>(state.range(0)));
  const auto features = tire_sized_features();
  const patchcore::PatchMaker patch_maker(3, 1);
  const patchcore::Preprocessing preprocessing({128, 256}, 1024);
  const patchcore::Aggregator aggregator(1024);
  for (auto _ : state)
    benchmark::DoNotOptimize(patchcore::reference_embedding(features, patch_maker, preprocessing, aggregator));
}

void BM_Segmentation(benchmark::State& state) {
  patchcore::set_num_threads(static_cast<int>(state.range(0)));
  torch::manual_seed(4);
  const torch::Tensor scores = torch::rand({1, 28, 28});
  const patchcore::RescaleSegmentor segmentor("cpu", 224, 4.0);
  for (auto _ : state) benchmark::DoNotOptimize(segmentor.convert_to_segmentation(scores));
}

}  // namespace

BENCHMARK(BM_Backbone)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_EmbeddingFast)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_EmbeddingReference)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Segmentation)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond);

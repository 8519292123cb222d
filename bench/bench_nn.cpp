// Nearest-neighbour search of one image's 784 patches against a PatchCore-sized memory bank of 16,464 x 1024,
// two threads: FAISS's flat brute force (FaissNN) against the pruned exact search (ExactPrunedNN), which
// return the same neighbours.
//
// Data: real tire features when ../shared is present (all 210 training images embedded with ResNet-18
// layer2+layer3, a seeded random 10% of their patches as the bank, 8 test images of every class as
// queries, one image per iteration); otherwise seeded synthetic Gaussian clusters with a decaying spectrum.
// Nothing is cached: the embedding runs once per benchmark process (a minute or two).
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include <algorithm>
#include <filesystem>
#include <vector>

#include "patchcore/core/parallel.h"
#include "patchcore/nn/exact_pruned_nn.h"
#include "patchcore/nn/faiss_nn.h"
#include "patchcore/patchcore.h"

namespace {

constexpr int kThreads = 2;
constexpr int64_t kBankRows = 16464;
constexpr int64_t kPatchesPerImage = 784;

struct Data {
  torch::Tensor bank;
  std::vector<torch::Tensor> queries;  // one [784, 1024] set per image
  const char* source = "synthetic";
};

std::string shared_path(const std::string& relative) {
  const std::filesystem::path p = std::filesystem::path(PATCHCORE_SHARED_DIR) / relative;
  return std::filesystem::exists(p) ? p.string() : std::string();
}

bool embed_tire(Data& data) {
  const std::string weights = shared_path("weights/resnet18-imagenet-stem-to-layer3.pth");
  const std::string root = shared_path("data/tire");
  if (weights.empty() || root.empty()) return false;
  patchcore::PatchCore model("cpu");
  model.load(patchcore::load_backbone("resnet18", weights, {"layer2", "layer3"}), patchcore::PatchCoreParams{});
  auto embed = [&](const std::vector<std::string>& files) {
    std::vector<torch::Tensor> images;
    for (const auto& f : files) images.push_back(patchcore::ImageTransform{}.load(f));
    return model.embed(torch::stack(images));
  };
  std::vector<std::string> train;
  for (const auto& entry : std::filesystem::directory_iterator(root + "/train/good")) train.push_back(entry.path());
  std::sort(train.begin(), train.end());
  std::vector<torch::Tensor> features;
  for (size_t i = 0; i < train.size(); i += 8)
    features.push_back(embed({train.begin() + i, train.begin() + std::min(train.size(), i + 8)}));
  const torch::Tensor all = torch::cat(features);
  torch::manual_seed(0);
  const int64_t rows = std::min(kBankRows, all.size(0));
  data.bank = all.index_select(0, torch::randperm(all.size(0)).slice(0, 0, rows)).contiguous();
  for (const char* kind : {"good", "cut", "hole", "contamination"})
    for (const char* image : {"000.png", "001.png"})
      data.queries.push_back(embed({root + "/test/" + kind + "/" + image}).contiguous());
  data.source = "tire";
  return true;
}

void synthesize(Data& data) {
  torch::manual_seed(17);
  const int64_t d = 1024, clusters = 300;
  const torch::Tensor centres = torch::randn({clusters, d}) * 3.0;
  const torch::Tensor scale = torch::exp(-torch::arange(d, torch::kFloat32) / (d / 4.0));
  auto draw = [&](int64_t n) {
    const torch::Tensor members = torch::randint(clusters, {n}, torch::kInt64);
    return ((centres.index_select(0, members) + torch::randn({n, d})) * scale).contiguous();
  };
  data.bank = draw(kBankRows);
  for (int i = 0; i < 8; ++i) data.queries.push_back(draw(kPatchesPerImage));
}

const Data& data() {
  static const Data d = [] {
    patchcore::set_num_threads(kThreads);
    Data result;
    if (!embed_tire(result)) synthesize(result);
    return result;
  }();
  return d;
}

void search(benchmark::State& state, patchcore::NearestNeighbourSearch& nn) {
  patchcore::set_num_threads(kThreads);
  const Data& d = data();
  nn.fit(d.bank);
  const int64_t k = state.range(0);
  size_t image = 0;
  for (auto _ : state) {
    benchmark::DoNotOptimize(nn.run(k, d.queries[image]));
    image = (image + 1) % d.queries.size();
  }
  state.SetLabel(d.source);
}

void BM_FaissNNFlat(benchmark::State& state) {
  patchcore::FaissNN nn(false, kThreads);
  search(state, nn);
}
BENCHMARK(BM_FaissNNFlat)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(3.0);

void BM_ExactPrunedNN(benchmark::State& state) {
  patchcore::ExactPrunedNN nn(kThreads);
  search(state, nn);
  // Work per query of one more pass over all images, out of 16,464 rows.
  patchcore::ExactPrunedNN::Stats stats;
  for (const auto& q : data().queries) nn.search(state.range(0), q, &stats);
  state.counters["refined_per_query"] = static_cast<double>(stats.refined) / static_cast<double>(stats.queries);
  state.counters["exact_per_query"] = static_cast<double>(stats.exact) / static_cast<double>(stats.queries);
  state.counters["dense_share"] = static_cast<double>(stats.dense) / static_cast<double>(stats.queries);
}
BENCHMARK(BM_ExactPrunedNN)->Arg(1)->Arg(3)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(3.0);

// Deriving the pruning structure (after fit() or load()).
void BM_ExactPrunedNNFit(benchmark::State& state) {
  patchcore::set_num_threads(kThreads);
  for (auto _ : state) {
    patchcore::ExactPrunedNN nn(kThreads);
    nn.fit(data().bank);
    benchmark::DoNotOptimize(nn.size());
  }
}
BENCHMARK(BM_ExactPrunedNNFit)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(3);

}  // namespace

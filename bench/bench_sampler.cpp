// Greedy coreset subsampling of a PatchCore-sized memory bank: 164,000 patches (about 209 training images of
// 28x28 patches), 10% coreset, two threads.
//
// Data: synthetic Gaussian clusters with a decaying spectrum (the shape of projected CNN patch features),
// seeded. The straightforward loop costs the same per selection whatever has been selected, so it runs at 1%
// (1,640 selections) and the "extrapolated_10pct_s" counter scales its time to the 16,400 selections of 10%;
// the fast loop runs at both 1% and 10%, and both select identical indices (tests/test_sampler.cpp).
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include "patchcore/core/parallel.h"
#include "patchcore/memory_bank/greedy_coreset.h"
#include "patchcore/memory_bank/sampler.h"

namespace {

constexpr int64_t kPatches = 164000;
constexpr int kThreads = 2;

torch::Tensor clustered(int64_t n, int64_t d) {
  torch::manual_seed(17);
  const int64_t clusters = 300;
  const torch::Tensor centres = torch::randn({clusters, d}) * 3.0;
  const torch::Tensor members = torch::randint(clusters, {n}, torch::kInt64);
  const torch::Tensor scale = torch::exp(-torch::arange(d, torch::kFloat32) / (d / 4.0));
  return ((centres.index_select(0, members) + torch::randn({n, d})) * scale).contiguous();
}

// Projected points (dimension 128, so no projection) and their approximate-greedy initial scores.
struct Bank {
  torch::Tensor z = clustered(kPatches, 128);
  std::vector<float> scores =
      patchcore::ApproximateGreedyCoresetSampler(0.1, torch::kCPU, 10, 128, 0).initial_scores(z);
};

const Bank& bank() {
  static const Bank b;
  return b;
}

void BM_GreedyCoresetReference(benchmark::State& state) {
  patchcore::set_num_threads(kThreads);
  const double percentage = static_cast<double>(state.range(0)) / 1000.0;
  const int64_t count = static_cast<int64_t>(kPatches * percentage);
  for (auto _ : state) benchmark::DoNotOptimize(patchcore::greedy_coreset_reference(bank().z, bank().scores, count));
  state.counters["selections"] = static_cast<double>(count);
  // seconds * (10% selections / selections made): a rate of count / selections_10pct per second, inverted.
  state.counters["extrapolated_10pct_s"] =
      benchmark::Counter(static_cast<double>(count) / static_cast<double>(static_cast<int64_t>(kPatches * 0.1)),
                         benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}
BENCHMARK(BM_GreedyCoresetReference)->Arg(10)->Unit(benchmark::kSecond)->Iterations(1)->UseRealTime();

void BM_GreedyCoresetFast(benchmark::State& state) {
  patchcore::set_num_threads(kThreads);
  const double percentage = static_cast<double>(state.range(0)) / 1000.0;
  const int64_t count = static_cast<int64_t>(kPatches * percentage);
  patchcore::GreedyStats stats;
  for (auto _ : state) benchmark::DoNotOptimize(patchcore::greedy_coreset_fast(bank().z, bank().scores, count, &stats));
  state.counters["selections"] = static_cast<double>(count);
  state.counters["catch_ups"] = static_cast<double>(stats.catch_ups);
  // Share of the straightforward loop's N * count exact distances that were still computed.
  state.counters["exact_share"] =
      static_cast<double>(stats.exact_distances) / (static_cast<double>(kPatches) * static_cast<double>(count));
}
BENCHMARK(BM_GreedyCoresetFast)->Arg(10)->Arg(100)->Unit(benchmark::kSecond)->Iterations(1)->UseRealTime();

// The whole approximate greedy sampler as PatchCore runs it: 1024-d features, projection to 128, starting
// points, 10% fast greedy loop.
void BM_ApproximateGreedySamplerRun(benchmark::State& state) {
  patchcore::set_num_threads(kThreads);
  const torch::Tensor features = clustered(kPatches, 1024);
  patchcore::ApproximateGreedyCoresetSampler sampler(0.1, torch::kCPU, 10, 128, 0);
  for (auto _ : state) benchmark::DoNotOptimize(sampler.run(features));
}
BENCHMARK(BM_ApproximateGreedySamplerRun)->Unit(benchmark::kSecond)->Iterations(1)->UseRealTime();

}  // namespace

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <set>
#include <string>
#include <vector>

#include "patchcore/core/parallel.h"
#include "patchcore/io/npy.h"
#include "patchcore/memory_bank/greedy_coreset.h"
#include "patchcore/memory_bank/sampler.h"
#include "support.h"

using namespace patchcore;

namespace {

torch::Tensor load_tensor(const std::string& relative) {
  const NpyArray a = read_npy(test::fixture(relative));
  if (a.dtype == "i8") {
    std::vector<int64_t> v = a.as_int64();
    return torch::tensor(v, torch::kInt64).reshape(a.shape);
  }
  std::vector<float> v = a.as_float();
  return torch::tensor(v, torch::kFloat32).reshape(a.shape);
}

std::vector<int64_t> load_indices(const std::string& relative) { return read_npy(test::fixture(relative)).as_int64(); }

double golden_percentage() { return read_npy(test::fixture("sampler/percentage.npy")).as_double().at(0); }

// Gaussian clusters with a decaying spectrum (the shape of CNN patch features), seeded.
torch::Tensor clustered(int64_t n, int64_t d, int64_t clusters, uint64_t seed) {
  torch::manual_seed(seed);
  const torch::Tensor centres = torch::randn({clusters, d}) * 3.0;
  const torch::Tensor members = torch::randint(clusters, {n}, torch::kInt64);
  const torch::Tensor scale = torch::exp(-torch::arange(d, torch::kFloat32) / (d / 4.0));
  return ((centres.index_select(0, members) + torch::randn({n, d})) * scale).contiguous();
}

// Restores the thread setting on scope exit.
struct Threads {
  int saved = num_threads();
  explicit Threads(int n) { set_num_threads(n); }
  ~Threads() { set_num_threads(saved); }
};

std::vector<float> approx_scores(const torch::Tensor& z, uint64_t seed) {
  return ApproximateGreedyCoresetSampler(0.5, torch::kCPU, 10, z.size(1), seed).initial_scores(z);
}

// greedy_coreset_fast with both kinds of bounds, which must agree (on a CPU without 8-bit dot products both are
// float), returning the default's selection.
std::vector<int64_t> fast_both(const torch::Tensor& z, const std::vector<float>& scores, int64_t count,
                               GreedyStats* stats = nullptr) {
  const std::vector<int64_t> quantized = greedy_coreset_fast(z, scores, count, stats, CoresetBounds::kQuantized);
  EXPECT_EQ(greedy_coreset_fast(z, scores, count, nullptr, CoresetBounds::kFloat), quantized) << "float bounds";
  return quantized;
}
template <class F>
void expect_invalid(F f, const std::string& fragment) {
  try {
    f();
    ADD_FAILURE() << "expected std::invalid_argument mentioning '" << fragment << "'";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

class GoldenSampler : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    prefix_ = "sampler/d" + std::to_string(GetParam()) + "_";
    features_ = load_tensor(prefix_ + "features.npy");
    if (GetParam() != 128) weight_ = load_tensor(prefix_ + "weight.npy");
    starts_ = load_indices(prefix_ + "starts.npy");
  }
  std::string prefix_;
  torch::Tensor features_, weight_;
  std::vector<int64_t> starts_;
};

}  // namespace

// ---- Golden selections from the Python reference algorithm (injected W and starting points). ----

TEST_P(GoldenSampler, GreedyCoresetSelectsTheReferenceIndices) {
  const std::vector<int64_t> expected = load_indices(prefix_ + "greedy.npy");
  for (GreedyAlgorithm algorithm : {GreedyAlgorithm::kFast, GreedyAlgorithm::kReference}) {
    GreedyCoresetSampler sampler(golden_percentage());
    sampler.set_projection(weight_);
    sampler.set_algorithm(algorithm);
    EXPECT_EQ(sampler.select(features_), expected) << "algorithm " << static_cast<int>(algorithm);
  }
}

TEST_P(GoldenSampler, ApproximateGreedyCoresetSelectsTheReferenceIndices) {
  const std::vector<int64_t> expected = load_indices(prefix_ + "approx.npy");
  for (GreedyAlgorithm algorithm : {GreedyAlgorithm::kFast, GreedyAlgorithm::kReference}) {
    ApproximateGreedyCoresetSampler sampler(golden_percentage());
    sampler.set_projection(weight_);
    sampler.set_starting_points(starts_);
    sampler.set_algorithm(algorithm);
    EXPECT_EQ(sampler.select(features_), expected) << "algorithm " << static_cast<int>(algorithm);
  }
}

TEST_P(GoldenSampler, RunReturnsTheOriginalRowsInSelectionOrder) {
  const std::vector<int64_t> expected = load_indices(prefix_ + "approx.npy");
  ApproximateGreedyCoresetSampler sampler(golden_percentage());
  sampler.set_projection(weight_);
  sampler.set_starting_points(starts_);
  const torch::Tensor rows = sampler.run(features_);
  ASSERT_EQ(rows.sizes(), (std::vector<int64_t>{static_cast<int64_t>(expected.size()), features_.size(1)}));
  for (size_t k = 0; k < expected.size(); ++k) EXPECT_TRUE(torch::equal(rows[k], features_[expected[k]])) << k;
}

INSTANTIATE_TEST_SUITE_P(Dims, GoldenSampler, ::testing::Values(64, 128, 256));

// ---- The fast loop selects exactly what the straightforward loop selects. ----

TEST(GreedyCoresetFast, MatchesReferenceOnClusteredData) {
  const torch::Tensor z = clustered(20000, 128, 40, 1);
  const std::vector<float> scores = approx_scores(z, 3);
  const int64_t count = 2000;
  GreedyStats stats;
  const std::vector<int64_t> fast = fast_both(z, scores, count, &stats);
  EXPECT_EQ(fast, greedy_coreset_reference(z, scores, count));
  // The point of the fast loop: most exact distances are ruled out by the bounds.
  EXPECT_LT(stats.exact_distances, 20000 * count / 10);
  EXPECT_LT(stats.lower_bounds, 20000 * count / 4);
}

TEST(GreedyCoresetFast, MatchesReferenceWithExactDuplicatesAndTies) {
  // 60 distinct rows on an integer grid, each repeated: equal scores everywhere, decided by the first index.
  torch::manual_seed(5);
  const torch::Tensor distinct = torch::randint(0, 3, {60, 128}).to(torch::kFloat32);
  const torch::Tensor z = distinct.index_select(0, torch::randint(60, {3000}, torch::kInt64)).contiguous();
  std::vector<float> scores = approx_scores(z, 4);
  for (int64_t count : {30, 59, 60, 61, 300}) {
    const std::vector<int64_t> fast = fast_both(z, scores, count);
    EXPECT_EQ(fast, greedy_coreset_reference(z, scores, count)) << count;
  }
  // Equal initial scores too: the first selection is row 0.
  std::fill(scores.begin(), scores.end(), 1.0f);
  const std::vector<int64_t> fast = fast_both(z, scores, 100);
  EXPECT_EQ(fast.front(), 0);
  EXPECT_EQ(fast, greedy_coreset_reference(z, scores, 100));
}

TEST(GreedyCoresetFast, MatchesReferenceOnConstantRowsWhereIndicesRepeat) {
  const torch::Tensor z = torch::full({500, 128}, 0.37f);
  const std::vector<float> scores = approx_scores(z, 2);
  const std::vector<int64_t> fast = fast_both(z, scores, 50);
  EXPECT_EQ(fast, greedy_coreset_reference(z, scores, 50));
  EXPECT_EQ(fast_both(torch::zeros({40, 128}), std::vector<float>(40, 0.0f), 20),
            greedy_coreset_reference(torch::zeros({40, 128}), std::vector<float>(40, 0.0f), 20));
}

TEST(GreedyCoresetFast, MatchesReferenceForInitialScoresOfEverySign) {
  // The loop orders points by their scores' bits: negative scores, both zeros and repeated values must order as
  // the floats do, ties by the first index.
  const torch::Tensor z = clustered(2000, 32, 8, 4);
  std::vector<float> scores = approx_scores(z, 3);
  for (size_t i = 0; i < scores.size(); ++i) {
    if (i % 5 == 0) scores[i] = -scores[i];
    if (i % 7 == 0) scores[i] = (i % 2 == 0) ? 0.0f : -0.0f;
    if (i % 11 == 0) scores[i] = scores[i / 2];
  }
  for (int64_t count : {1, 10, 300})
    EXPECT_EQ(fast_both(z, scores, count), greedy_coreset_reference(z, scores, count)) << count;
}

TEST(GreedyCoresetFast, MatchesReferenceOnDataWithOutlyingCoordinates) {
  // Rows whose norms span orders of magnitude, a few huge coordinates and rows a rounding error apart: the 8-bit
  // codes' error is large against the distances that decide, and only its term in the bound keeps the selection.
  torch::manual_seed(21);
  torch::Tensor z = torch::randn({3000, 128}) * torch::exp(torch::randn({3000, 1}) * 1.5);
  z.index_put_({torch::randint(3000, {60}), torch::randint(128, {60})}, 40.0f);
  z.slice(0, 1500, 3000).copy_(z.slice(0, 0, 1500) + torch::randn({1500, 128}) * 1e-4);
  z = z.contiguous();
  const std::vector<float> scores = approx_scores(z, 2);
  for (int64_t count : {300, 1600})
    EXPECT_EQ(fast_both(z, scores, count), greedy_coreset_reference(z, scores, count)) << count;
}

TEST(GreedyCoresetFast, MatchesReferenceForEveryDimension) {
  // Dimensions around the bound levels (8, 16, 32, 64) and below the first one.
  for (int64_t d : {1, 2, 7, 8, 9, 17, 33, 65, 100, 200}) {
    const torch::Tensor z = clustered(3000, d, 10, 10 + d);
    const std::vector<float> scores = approx_scores(z, 7);
    EXPECT_EQ(fast_both(z, scores, 400), greedy_coreset_reference(z, scores, 400)) << "dim " << d;
  }
}

TEST(GreedyCoresetFast, MatchesReferenceForMoreSelectionsThanRows) {
  const torch::Tensor z = clustered(200, 16, 5, 3);
  const std::vector<float> scores = approx_scores(z, 1);
  EXPECT_EQ(fast_both(z, scores, 450), greedy_coreset_reference(z, scores, 450));
}

TEST(GreedyCoresetFast, SameIndicesForAnyThreadCount) {
  const torch::Tensor z = clustered(5000, 128, 20, 9);
  const std::vector<float> scores = approx_scores(z, 5);
  std::vector<int64_t> one, two, reference_two;
  {
    Threads t(1);
    one = fast_both(z, scores, 500);
  }
  {
    Threads t(2);
    two = fast_both(z, scores, 500);
    reference_two = greedy_coreset_reference(z, scores, 500);
  }
  EXPECT_EQ(one, two);
  EXPECT_EQ(one, reference_two);
}

TEST(GreedyCoresetFast, SamplerSelectionsMatchForBothAlgorithms) {
  const torch::Tensor x = clustered(4000, 256, 15, 4);
  ApproximateGreedyCoresetSampler approx(0.1, torch::kCPU, 10, 128, 11);
  const std::vector<int64_t> fast = approx.select(x);
  approx.set_algorithm(GreedyAlgorithm::kReference);
  EXPECT_EQ(approx.select(x), fast);
  const torch::Tensor small = clustered(600, 64, 6, 8);
  GreedyCoresetSampler greedy(0.1, torch::kCPU, 128, 11);
  const std::vector<int64_t> greedy_fast = greedy.select(small);
  greedy.set_algorithm(GreedyAlgorithm::kReference);
  EXPECT_EQ(greedy.select(small), greedy_fast);
}

TEST(Samplers, SelectionFromChunkSummariesEqualsSelectionFromAllRows) {
  // What fit relies on to stream the training features: summarise batch by batch, select once.
  const torch::Tensor x = clustered(4000, 256, 15, 4);
  for (const std::string& name : {"identity", "random", "greedy", "approx_greedy"}) {
    const auto sampler = make_sampler(name, 0.05, 3);
    std::vector<torch::Tensor> chunks;
    for (auto [begin, end] : {std::pair<int64_t, int64_t>{0, 1}, {1, 700}, {700, 1500}, {1500, 4000}})
      chunks.push_back(sampler->summarize(x.slice(0, begin, end)));
    const torch::Tensor summary = torch::cat(chunks);
    EXPECT_TRUE(torch::equal(summary, sampler->summarize(x))) << name;
    const std::vector<int64_t> selected = sampler->select_from_summary(summary);
    EXPECT_EQ(selected, sampler->select(x)) << name;
    EXPECT_EQ(static_cast<int64_t>(selected.size()), sampler->selection_size(x.size(0))) << name;
    EXPECT_GE(sampler->selection_bytes_per_row(256), summary.size(1) * 4) << name;
  }
  expect_invalid([&] { GreedyCoresetSampler(0.1).select_from_summary(torch::ones({10, 64})); }, "[N, 128]");
  expect_invalid([&] { IdentitySampler().select_from_summary(torch::ones({0, 0})); }, "N >= 1");
}

TEST(GreedyCoresetFast, RejectsBadArguments) {
  const torch::Tensor z = clustered(10, 4, 2, 1);
  expect_invalid([&] { greedy_coreset_fast(z, std::vector<float>(9, 1.0f), 2); }, "9 scores for 10 points");
  std::vector<float> nan_scores(10, 1.0f);
  nan_scores[3] = std::numeric_limits<float>::quiet_NaN();
  expect_invalid([&] { greedy_coreset_reference(z, nan_scores, 2); }, "finite");
  expect_invalid([&] { greedy_coreset_fast(z, std::vector<float>(10, 1.0f), -1); }, ">= 0");
  expect_invalid([&] { greedy_coreset_fast(z.t(), std::vector<float>(4, 1.0f), 1); }, "contiguous");
  EXPECT_TRUE(greedy_coreset_fast(z, std::vector<float>(10, 1.0f), 0).empty());
}

// ---- Distances and initial scores against double precision. ----

TEST(SamplerDistances, MatchDoublePrecision) {
  const torch::Tensor z = clustered(300, 37, 4, 2);
  const torch::Tensor zd = z.to(torch::kFloat64);
  const torch::Tensor exact = torch::cdist(zd, zd);
  const std::vector<float> d = distances_to_point(z, 17);
  for (int64_t i = 0; i < z.size(0); ++i) EXPECT_NEAR(d[i], exact[i][17].item<double>(), 1e-4) << i;
  const std::vector<int64_t> points{3, 5, 250};
  const std::vector<float> mean = mean_distance_to_points(z, points);
  const torch::Tensor mean_exact = exact.index_select(1, torch::tensor(points)).mean(1);
  for (int64_t i = 0; i < z.size(0); ++i) EXPECT_NEAR(mean[i], mean_exact[i].item<double>(), 1e-4) << i;
  const std::vector<float> norms = distance_matrix_row_norms(z);
  const torch::Tensor norms_exact = exact.norm(2, 1);
  for (int64_t i = 0; i < z.size(0); ++i) EXPECT_NEAR(norms[i], norms_exact[i].item<double>(), 1e-3) << i;
  expect_invalid([&] { distances_to_point(z, 300); }, "outside");
  expect_invalid([&] { mean_distance_to_points(z, {}); }, "no points");
}

TEST(SamplerDistances, SelfDistanceIsNearZero) {
  const torch::Tensor z = clustered(50, 128, 3, 6);
  const std::vector<float> d = distances_to_point(z, 7);
  EXPECT_LT(d[7], 1e-2);
  EXPECT_GE(d[7], 0.0f);
}

// ---- Sampler properties. ----

TEST(Samplers, SelectIntOfNTimesPercentageRows) {
  const torch::Tensor x = clustered(1001, 32, 5, 12);
  const std::vector<std::string> names{"random", "greedy", "approx_greedy"};
  for (const std::string& name : names) {
    for (double p : {0.01, 0.1, 0.333}) {
      const auto sampler = make_sampler(name, p, 3);
      const std::vector<int64_t> idx = sampler->select(x);
      EXPECT_EQ(static_cast<int64_t>(idx.size()), static_cast<int64_t>(1001 * p)) << name << " " << p;
      for (int64_t i : idx) {
        EXPECT_GE(i, 0);
        EXPECT_LT(i, 1001);
      }
      const torch::Tensor rows = sampler->run(x);
      ASSERT_EQ(rows.size(0), static_cast<int64_t>(idx.size()));
      EXPECT_TRUE(torch::equal(rows, x.index_select(0, torch::tensor(idx)))) << name;
    }
  }
  EXPECT_EQ(make_sampler("identity", 0.5, 0)->select(x).size(), 1001u);
  EXPECT_TRUE(torch::equal(make_sampler("identity", 0.5, 0)->run(x), x));
}

TEST(Samplers, RandomSamplerDrawsDistinctRows) {
  const torch::Tensor x = torch::zeros({500, 3});
  const std::vector<int64_t> idx = RandomSampler(0.9, 1).select(x);
  EXPECT_EQ(std::set<int64_t>(idx.begin(), idx.end()).size(), idx.size());
}

TEST(Samplers, SameSeedSameRowsDifferentSeedDifferentRows) {
  const torch::Tensor x = clustered(2000, 200, 8, 13);
  for (const std::string& name : {"random", "approx_greedy"}) {
    const std::vector<int64_t> a = make_sampler(name, 0.05, 7)->select(x);
    EXPECT_EQ(a, make_sampler(name, 0.05, 7)->select(x)) << name;
    EXPECT_NE(a, make_sampler(name, 0.05, 8)->select(x)) << name;
  }
  ApproximateGreedyCoresetSampler a(0.1, torch::kCPU, 10, 128, 1), b(0.1, torch::kCPU, 10, 128, 1),
      c(0.1, torch::kCPU, 10, 128, 2);
  EXPECT_TRUE(torch::equal(a.projection_weight(200), b.projection_weight(200)));
  EXPECT_FALSE(torch::equal(a.projection_weight(200), c.projection_weight(200)));
  EXPECT_EQ(a.starting_points(2000), b.starting_points(2000));
  EXPECT_NE(a.starting_points(2000), c.starting_points(2000));
}

TEST(Samplers, InvalidPercentageThrows) {
  for (double p : {0.0, 1.0, -0.1, 1.5, std::numeric_limits<double>::quiet_NaN()}) {
    expect_invalid([&] { RandomSampler(p, 0); }, "percentage");
    expect_invalid([&] { GreedyCoresetSampler{p}; }, "percentage");
    expect_invalid([&] { ApproximateGreedyCoresetSampler{p}; }, "percentage");
    expect_invalid([&] { make_sampler("approx_greedy", p, 0); }, "percentage");
  }
  expect_invalid([] { make_sampler("kmeans", 0.1, 0); }, "unknown sampler 'kmeans'");
}

TEST(Samplers, SingleRowWorks) {
  const torch::Tensor x = torch::ones({1, 300});
  for (const std::string& name : {"random", "greedy", "approx_greedy"}) {
    const auto sampler = make_sampler(name, 0.99, 0);
    EXPECT_TRUE(sampler->select(x).empty()) << name;  // int(1 * 0.99) = 0
    EXPECT_EQ(sampler->run(x).sizes(), (std::vector<int64_t>{0, 300})) << name;
  }
  EXPECT_EQ(IdentitySampler().select(x), (std::vector<int64_t>{0}));
  EXPECT_EQ(ApproximateGreedyCoresetSampler(0.5).starting_points(1), (std::vector<int64_t>{0}));
  EXPECT_EQ(greedy_coreset_fast(torch::ones({1, 128}), {2.0f}, 3), (std::vector<int64_t>{0, 0, 0}));
}

TEST(Samplers, RejectBadFeatures) {
  std::vector<std::unique_ptr<BaseSampler>> samplers;
  for (const std::string& name : {"identity", "random", "greedy", "approx_greedy"})
    samplers.push_back(make_sampler(name, 0.5, 0));
  for (const auto& s : samplers) {
    expect_invalid([&] { s->select(torch::zeros({10})); }, "2-D");
    expect_invalid([&] { s->select(torch::zeros({2, 3, 4})); }, "2-D");
    expect_invalid([&] { s->select(torch::zeros({0, 4})); }, "at least one row");
    expect_invalid([&] { s->select(torch::zeros({4, 0})); }, "at least one row");
    expect_invalid([&] { s->select(torch::zeros({4, 4}, torch::kInt64)); }, "floating-point");
    expect_invalid([&] { s->select(torch::Tensor()); }, "undefined");
  }
  // Other floating types are converted, as the reference's torch code accepts them.
  const torch::Tensor features = clustered(60, 130, 3, 2);
  for (const std::string& name : {"random", "greedy", "approx_greedy"})
    EXPECT_EQ(make_sampler(name, 0.25, 3)->select(features.to(torch::kFloat64)),
              make_sampler(name, 0.25, 3)->select(features))
        << name;
  torch::Tensor x = clustered(20, 130, 2, 1);
  x[4][9] = std::numeric_limits<float>::infinity();
  expect_invalid([&] { make_sampler("approx_greedy", 0.5, 0)->select(x); }, "not finite");
  x[4][9] = std::numeric_limits<float>::quiet_NaN();
  expect_invalid([&] { make_sampler("greedy", 0.5, 0)->select(x); }, "not finite");
}

TEST(Samplers, ProjectionIsXTimesWTransposedWithNnLinearBounds) {
  const torch::Tensor x = clustered(70, 300, 3, 4);
  GreedyCoresetSampler sampler(0.5, torch::kCPU, 128, 5);
  const torch::Tensor w = sampler.projection_weight(300);
  ASSERT_EQ(w.sizes(), (std::vector<int64_t>{128, 300}));
  const double bound = 1.0 / std::sqrt(300.0);
  EXPECT_LE(w.abs().max().item<double>(), bound);
  EXPECT_GT(w.abs().max().item<double>(), 0.9 * bound);
  EXPECT_NEAR(w.mean().item<double>(), 0.0, 0.1 * bound);
  const torch::Tensor z = sampler.project(x);
  EXPECT_TRUE(torch::allclose(z, x.mm(w.t()), 1e-4, 1e-5));
  // Features already at the target dimension are used as they are.
  const torch::Tensor y = clustered(30, 128, 2, 4);
  EXPECT_TRUE(torch::equal(sampler.project(y), y));
  // An injected matrix replaces the random one and must fit the features.
  sampler.set_projection(w * 2);
  EXPECT_TRUE(torch::equal(sampler.projection_weight(300), w * 2));
  expect_invalid([&] { sampler.project(clustered(5, 299, 1, 1)); }, "299");
  expect_invalid([&] { sampler.set_projection(torch::zeros({64, 300})); }, "[128, D]");
  sampler.set_projection(torch::Tensor());
  EXPECT_TRUE(torch::equal(sampler.projection_weight(300), w));
}

TEST(Samplers, StartingPointsAreDistinctAndInjectable) {
  ApproximateGreedyCoresetSampler sampler(0.1, torch::kCPU, 10, 128, 3);
  const std::vector<int64_t> starts = sampler.starting_points(50);
  ASSERT_EQ(starts.size(), 10u);
  EXPECT_EQ(std::set<int64_t>(starts.begin(), starts.end()).size(), 10u);
  for (int64_t s : starts) EXPECT_LT(s, 50);
  EXPECT_EQ(sampler.starting_points(4).size(), 4u);  // min(10, N)
  sampler.set_starting_points({1, 2});
  EXPECT_EQ(sampler.starting_points(50), (std::vector<int64_t>{1, 2}));
  const torch::Tensor z = clustered(20, 128, 2, 2);
  const std::vector<float> scores = sampler.initial_scores(z);
  EXPECT_EQ(scores, mean_distance_to_points(z, {1, 2}));
  sampler.set_starting_points({1, 25});
  expect_invalid([&] { sampler.select(z); }, "starting point 25");
  expect_invalid([&] { sampler.set_starting_points({-1}); }, "negative");
  expect_invalid([] { ApproximateGreedyCoresetSampler(0.1, torch::kCPU, 0); }, "number_of_starting_points");
}

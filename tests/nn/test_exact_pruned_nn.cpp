#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <thread>

#include "common_fixtures.h"
#include "patchcore/memory_bank/sampler.h"
#include "patchcore/nn/exact_pruned_nn.h"
#include "patchcore/patchcore.h"

using namespace patchcore;
using test::error_of;
using test::load_golden;
using test::max_abs_diff;
namespace fs = std::filesystem;

namespace {

// Squared distances of every query to every row in double: the ground truth both searches approximate.
torch::Tensor true_distances(const torch::Tensor& queries, const torch::Tensor& bank) {
  const torch::Tensor q = queries.to(torch::kFloat64), b = bank.to(torch::kFloat64);
  return (q.pow(2).sum(1, true) + b.pow(2).sum(1).unsqueeze(0) - 2.0 * q.mm(b.t())).clamp_min(0.0);
}

// The result is the k nearest rows in ascending order, with accurate distances: every returned row is distinct
// and no farther than the true k-th distance (so any difference from another exact search is a tie), and its
// distance is the true one to float accuracy. `scale` is the size of a squared distance in this data, for
// the rounding of distances near 0.
void expect_exact(const torch::Tensor& queries, const torch::Tensor& bank, int64_t k, const torch::Tensor& distances,
                  const torch::Tensor& indices) {
  ASSERT_EQ(distances.sizes(), (std::vector<int64_t>{queries.size(0), k}));
  ASSERT_EQ(indices.sizes(), (std::vector<int64_t>{queries.size(0), k}));
  const torch::Tensor truth = true_distances(queries, bank);
  const torch::Tensor kth = std::get<0>(truth.topk(k, 1, false, true)).select(1, k - 1);
  const double scale = 1.0 + truth.mean().item<double>();
  auto t = truth.accessor<double, 2>();
  auto kk = kth.accessor<double, 1>();
  auto d = distances.accessor<float, 2>();
  auto i = indices.accessor<int64_t, 2>();
  int failures = 0;
  for (int64_t q = 0; q < queries.size(0) && failures < 5; ++q) {
    std::vector<int64_t> rows;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t r = i[q][j];
      ASSERT_TRUE(r >= 0 && r < bank.size(0)) << "query " << q << " got row " << r;
      rows.push_back(r);
      const double tolerance = 1e-5 * t[q][r] + 1e-6 * scale;
      if (t[q][r] > kk[q] + tolerance || std::abs(d[q][j] - t[q][r]) > tolerance || (j > 0 && d[q][j] < d[q][j - 1])) {
        ADD_FAILURE() << "query " << q << " neighbour " << j << ": row " << r << " at " << d[q][j] << " (true "
                      << t[q][r] << "), true k-th distance " << kk[q];
        ++failures;
      }
    }
    std::sort(rows.begin(), rows.end());
    EXPECT_EQ(std::unique(rows.begin(), rows.end()), rows.end()) << "query " << q << " repeats a row";
  }
}

// FAISS's brute force and the pruned search: the same rows except among near-equal distances, and distances
// within 1e-4 of the largest one.
void expect_same_as_faiss(const torch::Tensor& bank, const torch::Tensor& queries, int64_t k,
                          const ExactPrunedNN& pruned) {
  FaissNN flat(false, 2);
  flat.fit(bank);
  auto [expected_d, expected_i] = flat.run(k, queries);
  auto [d, i] = pruned.run(k, queries);
  expect_exact(queries, bank, k, d, i);
  EXPECT_LE(max_abs_diff(d, expected_d), 1e-4 * std::max(1e-6, expected_d.abs().max().item<double>()));
  const torch::Tensor truth = true_distances(queries, bank);
  const torch::Tensor differs = (i != expected_i).nonzero();
  for (int64_t n = 0; n < differs.size(0); ++n) {
    const int64_t q = differs[n][0].item<int64_t>(), j = differs[n][1].item<int64_t>();
    const double ours = truth[q][i[q][j].item<int64_t>()].item<double>();
    const double theirs = truth[q][expected_i[q][j].item<int64_t>()].item<double>();
    EXPECT_NEAR(ours, theirs, 1e-4 * std::max(ours, 1e-6)) << "query " << q << " neighbour " << j;
  }
}

// Gaussian clusters with a decaying spectrum, like projected CNN patch features; D is no multiple of 8 or 16.
torch::Tensor clustered(int64_t n, int64_t d, int64_t clusters, uint64_t seed) {
  torch::manual_seed(seed);
  const torch::Tensor centres = torch::randn({clusters, d}) * 3.0;
  const torch::Tensor members = torch::randint(clusters, {n}, torch::kInt64);
  const torch::Tensor scale = torch::exp(-torch::arange(d, torch::kFloat32) / (d / 5.0));
  return ((centres.index_select(0, members) + torch::randn({n, d})) * scale + 2.0).contiguous();
}

// Runs `check` on searches fitted to `bank` with each dense first tier: quantized where the CPU has 8-bit dot
// products, and float.
template <typename Check>
void for_each_dense_tier(const torch::Tensor& bank, Check check) {
  for (bool quantized : {true, false}) {
    SCOPED_TRACE(quantized ? "quantized products where native" : "float products");
    ExactPrunedNN nn(2, quantized);
    nn.fit(bank);
    check(nn);
  }
}

}  // namespace

TEST(ExactPrunedNN, TireFeaturesGiveTheBruteForceNeighbours) {
  PATCHCORE_REQUIRE_SHARED(weights, "weights/resnet18-imagenet-stem-to-layer3.pth");
  PATCHCORE_REQUIRE_SHARED(data, "data/tire");
  PatchCore model("cpu");
  model.load(load_backbone("resnet18", weights, {"layer2", "layer3"}), PatchCoreParams{});
  auto embed = [&](const std::vector<std::string>& names) {
    std::vector<torch::Tensor> images;
    for (const auto& name : names) images.push_back(ImageTransform{}.load(data + "/" + name));
    return model.embed(torch::stack(images)).contiguous();
  };
  const torch::Tensor bank = embed({"train/good/000.png", "train/good/001.png", "train/good/002.png",
                                    "train/good/003.png", "train/good/004.png", "train/good/005.png"});
  const torch::Tensor queries = embed({"test/good/000.png", "test/cut/000.png"});
  ExactPrunedNN nn(2);
  nn.fit(bank);
  for (int64_t k : {1, 3}) expect_same_as_faiss(bank, queries, k, nn);
}

// magnetic_tile's patches spread their variance over many principal axes, so the cells prune little there and most
// queries take the dense search (docs/exact_search.md); a coreset of them, like fit's, is the bank.
TEST(ExactPrunedNN, MagneticTileFeaturesGiveTheBruteForceNeighbours) {
  PATCHCORE_REQUIRE_SHARED(weights, "weights/resnet18-imagenet-stem-to-layer3.pth");
  PATCHCORE_REQUIRE_SHARED(data, "data/magnetic_tile");
  PatchCore model("cpu");
  model.load(load_backbone("resnet18", weights, {"layer2", "layer3"}), PatchCoreParams{});
  auto embed = [&](const std::string& folder, size_t count) {
    std::vector<std::string> paths;
    for (const auto& entry : fs::directory_iterator(data + "/" + folder)) paths.push_back(entry.path().string());
    std::sort(paths.begin(), paths.end());
    std::vector<torch::Tensor> images;
    for (size_t i = 0; i < count && i < paths.size(); ++i) images.push_back(ImageTransform{}.load(paths[i]));
    return model.embed(torch::stack(images)).contiguous();
  };
  const torch::Tensor bank = ApproximateGreedyCoresetSampler(0.1).run(embed("train/good", 24));
  const torch::Tensor queries = torch::cat({embed("test/good", 1), embed("test/crack", 1)}).contiguous();
  for_each_dense_tier(bank, [&](const ExactPrunedNN& nn) {
    for (int64_t k : {1, 3}) expect_same_as_faiss(bank, queries, k, nn);
    ExactPrunedNN::Stats stats;
    nn.search(1, queries, &stats);
    EXPECT_GT(stats.dense, 0) << "the brute-force check above covers the dense search";
  });
  // Calls of 4 and 8 images choose as calls of 2 do. A contiguous sampled item in the middle of such a call is an
  // image's top rows, which the cells prune better than the rest.
  ExactPrunedNN nn(2);
  nn.fit(bank);
  ExactPrunedNN::Stats two;
  nn.search(1, queries, &two);
  const torch::Tensor eight = embed("test/good", 8);
  for (int64_t images : {4, 8}) {
    ExactPrunedNN fresh(2);  // without the history of the calls before
    fresh.fit(bank);
    ExactPrunedNN::Stats stats;
    fresh.search(1, eight.slice(0, 0, images * 784), &stats);
    // All of them but the queries of sampled items that finished.
    EXPECT_GE(stats.dense, images * 784 - 112) << images << " images; 2 took " << two.dense << " of 1568";
  }
}

// Unstructured data: no principal axis holds much of the variance, the cells prune nothing, and the queries after
// the first work items take the dense search.
TEST(ExactPrunedNN, UnstructuredDataTakeTheDenseSearchAndGiveTheBruteForceNeighbours) {
  torch::manual_seed(5);
  const torch::Tensor bank = torch::randn({2000, 300});
  torch::Tensor queries = torch::randn({700, 300});
  queries.slice(0, 600, 620) = bank.slice(0, 10, 30);  // at distance 0
  queries.slice(0, 620, 640) = 0.0;                    // near the centre, where every row is about as far
  for_each_dense_tier(bank, [&](const ExactPrunedNN& nn) {
    for (int64_t k : {1, 4, 17}) expect_same_as_faiss(bank, queries, k, nn);
  });
  ExactPrunedNN nn(2);
  nn.fit(bank);
  ExactPrunedNN::Stats stats;
  auto [d, i] = nn.search(1, queries, &stats);
  EXPECT_GT(stats.dense, 400);
  EXPECT_TRUE(torch::equal(i.slice(0, 600, 620).squeeze(1), torch::arange(10, 30)));

  // Duplicated rows: equal distances come in row order in the dense search too.
  const torch::Tensor twice = torch::cat({bank, bank}).contiguous();
  ExactPrunedNN doubled(2);
  doubled.fit(twice);
  ExactPrunedNN::Stats twice_stats;
  auto [dd, di] = doubled.search(2, queries, &twice_stats);
  EXPECT_GT(twice_stats.dense, 400);
  EXPECT_TRUE(torch::equal(di.select(1, 1) - di.select(1, 0), torch::full({700}, 2000, torch::kLong)));
  EXPECT_TRUE(torch::equal(dd.select(1, 0), dd.select(1, 1)));
}

// Once a bank's calls have kept choosing the dense search, later calls take it without walking a sample first, and
// every 16th call samples again; the neighbours stay the same.
TEST(ExactPrunedNN, ABankThatKeepsTakingTheDenseSearchSparesTheSample) {
  torch::manual_seed(6);
  const torch::Tensor bank = torch::randn({2000, 300});
  const torch::Tensor queries = torch::randn({700, 300});
  ExactPrunedNN nn(2);
  nn.fit(bank);
  std::vector<int64_t> refined;
  torch::Tensor first;
  for (int call = 0; call < 17; ++call) {
    ExactPrunedNN::Stats stats;
    const torch::Tensor indices = nn.search(1, queries, &stats).second;
    if (call == 0) first = indices;
    EXPECT_TRUE(torch::equal(indices, first)) << "call " << call;
    EXPECT_EQ(stats.dense, 700) << "call " << call;
    refined.push_back(stats.refined);
  }
  for (int call : {1, 2}) EXPECT_EQ(refined[call], refined[0]) << "call " << call << " samples";
  for (int call = 3; call < 16; ++call) EXPECT_LT(refined[call], refined[0]) << "call " << call << " spares the sample";
  EXPECT_EQ(refined[16], refined[0]) << "the 17th call samples again";
}

// The quantized dense tier rounds each slot's and query's coordinates to 255 levels of its own largest one, so
// coordinates far larger than the rest of their vector leave those rest to few levels and the quantization error
// is large; the bounds subtract it, so the neighbours stay the brute force's. Log-normal magnitudes give such
// vectors, among them rows whose largest coordinate dwarfs every other.
TEST(ExactPrunedNN, QuantizedProductsKeepTheNeighboursOfDataWithOutlyingCoordinates) {
  torch::manual_seed(9);
  torch::Tensor bank = torch::randn({3000, 260}) * torch::exp(torch::randn({3000, 260}) * 1.5);
  bank.slice(0, 0, 40).select(1, 7) *= 50.0;
  bank.slice(0, 40, 50) = 0.0;  // rows whose scale is of no use
  // Near pairs, so that the queries beside them have two rows at almost the same distance, far closer than the
  // quantization error: only the bound's margin keeps the nearer one.
  bank.slice(0, 2000, 2300) = bank.slice(0, 0, 300) + torch::randn({300, 260}) * 0.1;
  torch::Tensor queries =
      torch::cat({bank.slice(0, 0, 300) + torch::randn({300, 260}) * 0.1,
                  torch::randn({300, 260}) * torch::exp(torch::randn({300, 260}) * 1.5), torch::zeros({16, 260})})
          .contiguous();
  for_each_dense_tier(bank, [&](const ExactPrunedNN& nn) {
    // Against distances in double: FAISS's own |q|^2 + |r|^2 - 2 q.r cancels too much on the outlying rows.
    for (int64_t k : {1, 5}) {
      const auto [distances, indices] = nn.run(k, queries);
      expect_exact(queries, bank, k, distances, indices);
    }
    ExactPrunedNN::Stats stats;
    nn.search(1, queries, &stats);
    EXPECT_GT(stats.dense, 300) << "the check above covers the dense search";
  });
}

// k the whole bank: until k rows are found every threshold is infinite, and the dense search must still pass over
// the padding slots at the end of each cell but the last (their row index is -1).
TEST(ExactPrunedNN, TheDenseSearchPassesOverPaddingWhileTheThresholdIsInfinite) {
  torch::manual_seed(12);
  const torch::Tensor bank = torch::randn({150, 300});
  const torch::Tensor queries = torch::randn({200, 300});
  for_each_dense_tier(bank, [&](const ExactPrunedNN& nn) {
    ExactPrunedNN::Stats stats;
    const auto [distances, indices] = nn.search(150, queries, &stats);
    EXPECT_GT(stats.dense, 0);
    expect_exact(queries, bank, 150, distances, indices);
  });
}

TEST(ExactPrunedNN, ClusteredDataGiveTheBruteForceNeighbours) {
  const torch::Tensor bank = clustered(3000, 203, 40, 1);
  torch::Tensor queries = clustered(500, 203, 40, 2);
  // Far outliers, where the bounds prune little, and copies of bank rows, at distance 0.
  queries.slice(0, 0, 20) += 10.0 * torch::randn({20, 203});
  queries.slice(0, 20, 40) = bank.slice(0, 100, 120);
  ExactPrunedNN nn(2);
  nn.fit(bank);
  for (int64_t k : {1, 2, 5, 17}) expect_same_as_faiss(bank, queries, k, nn);
  ExactPrunedNN::Stats stats;
  nn.search(1, queries, &stats);
  EXPECT_EQ(stats.queries, 500);
  EXPECT_GE(stats.exact, 500);
}

TEST(ExactPrunedNN, SmallAndDegenerateBanks) {
  torch::manual_seed(3);
  // Feature lengths around the tier widths (16, 64, 128) and bank sizes around the 8-row blocks.
  for (int64_t d : {1, 5, 16, 17, 64, 70, 128, 131}) {
    for (int64_t n : {1, 7, 8, 9, 60}) {
      SCOPED_TRACE("d=" + std::to_string(d) + " n=" + std::to_string(n));
      const torch::Tensor bank = torch::randn({n, d});
      const torch::Tensor queries = torch::randn({13, d});
      ExactPrunedNN nn(2);
      nn.fit(bank);
      for (int64_t k : {int64_t{1}, std::min<int64_t>(3, n), n}) {
        auto [distances, indices] = nn.run(k, queries);
        expect_exact(queries, bank, k, distances, indices);
      }
      EXPECT_NE(error_of([&] {
                  nn.run(n + 1, queries);
                }).find("larger than the memory bank (" + std::to_string(n) + " rows)"),
                std::string::npos);
    }
  }
}

TEST(ExactPrunedNN, DuplicateRowsComeInIndexOrder) {
  torch::manual_seed(4);
  const torch::Tensor distinct = torch::randn({50, 40});
  // Every row three times: ties at every distance.
  const torch::Tensor bank = torch::cat({distinct, distinct, distinct}).contiguous();
  const torch::Tensor queries = torch::cat({torch::randn({30, 40}), distinct.slice(0, 0, 10)}).contiguous();
  ExactPrunedNN nn(2);
  nn.fit(bank);
  auto [d, i] = nn.run(6, queries);
  expect_exact(queries, bank, 6, d, i);
  // Equal distances are bit-identical, and their rows ascend.
  for (int64_t q = 0; q < queries.size(0); ++q)
    for (int64_t j = 1; j < 6; ++j)
      if (d[q][j].item<float>() == d[q][j - 1].item<float>())
        EXPECT_LT(i[q][j - 1].item<int64_t>(), i[q][j].item<int64_t>());
  EXPECT_TRUE(torch::equal(d.slice(1, 0, 3), d.slice(1, 0, 1).expand({-1, 3})));
  EXPECT_TRUE(torch::equal(i.slice(0, 30).select(1, 0), torch::arange(10)));
  EXPECT_TRUE(torch::equal(d.slice(0, 30).select(1, 0), torch::zeros({10})));

  ExactPrunedNN constant(2);
  constant.fit(torch::full({20, 33}, 1.5f));
  auto [cd, ci] = constant.run(20, torch::full({2, 33}, -0.5f));
  EXPECT_TRUE(torch::equal(ci, torch::arange(20).expand({2, 20})));
  EXPECT_TRUE(torch::equal(cd, torch::full({2, 20}, 4.0f * 33)));
}

TEST(ExactPrunedNN, ItsPruningStructureIsSavedBesideTheIndexAndCheckedWhenLoaded) {
  const std::string dir = test::temp_dir();
  const torch::Tensor bank = clustered(900, 64, 10, 11);
  const torch::Tensor queries = clustered(120, 64, 10, 12);
  ExactPrunedNN nn(2);
  nn.fit(bank);
  nn.save(dir + "/bank.faiss");
  const std::string pruning = dir + "/bank.pruning";
  ASSERT_EQ(ExactPrunedNN::pruning_filename(dir + "/bank.faiss"), pruning);
  ASSERT_TRUE(std::filesystem::exists(pruning));
  const auto expected = nn.run(3, queries);

  // Read back rather than derived: the same neighbours, with the same work.
  ExactPrunedNN loaded(2), derived(2);
  loaded.load(dir + "/bank.faiss");
  derived.fit(bank);
  ExactPrunedNN::Stats read_stats, derived_stats;
  const auto result = loaded.search(3, queries, &read_stats);
  derived.search(3, queries, &derived_stats);
  EXPECT_TRUE(torch::equal(result.first, expected.first));
  EXPECT_TRUE(torch::equal(result.second, expected.second));
  EXPECT_EQ(read_stats.refined, derived_stats.refined);
  EXPECT_EQ(read_stats.exact, derived_stats.exact);

  // A damaged structure, or one built for another bank, is refused by name.
  std::ifstream in(pruning, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), {});
  std::string flipped = bytes;
  flipped[bytes.size() / 2] ^= 4;
  std::ofstream(pruning, std::ios::binary) << flipped;
  EXPECT_NE(error_of([&] {
              ExactPrunedNN(1).load(dir + "/bank.faiss");
            }).find(pruning + ": not a usable pruning structure: CRC-32"),
            std::string::npos);
  ExactPrunedNN other(2);
  other.fit(clustered(900, 64, 10, 13));
  other.save(dir + "/other.faiss");
  std::filesystem::copy_file(dir + "/other.pruning", pruning, std::filesystem::copy_options::overwrite_existing);
  EXPECT_NE(error_of([&] { ExactPrunedNN(1).load(dir + "/bank.faiss"); }).find("built for another memory bank"),
            std::string::npos);
  // A structure of the earlier three-tier layout is derived again, as if the file were missing.
  std::ofstream(pruning, std::ios::binary) << "PCPRUNE1" << bytes.substr(8);
  ExactPrunedNN earlier(2);
  earlier.load(dir + "/bank.faiss");
  EXPECT_TRUE(torch::equal(earlier.run(3, queries).second, expected.second));
  // Without the file the structure is derived again.
  std::filesystem::remove(pruning);
  ExactPrunedNN rebuilt(2);
  rebuilt.load(dir + "/bank.faiss");
  EXPECT_TRUE(torch::equal(rebuilt.run(3, queries).second, expected.second));
}

TEST(ExactPrunedNN, SavedIndexIsAFlatFaissIndex) {
  const std::string dir = test::temp_dir();
  const torch::Tensor bank = clustered(700, 96, 12, 5);
  const torch::Tensor queries = clustered(100, 96, 12, 6);
  ExactPrunedNN nn(2);
  nn.fit(bank);
  nn.save(dir + "/bank.faiss");
  auto [d, i] = nn.run(4, queries);

  ExactPrunedNN loaded(2);
  loaded.load(dir + "/bank.faiss");
  EXPECT_EQ(loaded.size(), 700);
  auto [ld, li] = loaded.run(4, queries);
  EXPECT_TRUE(torch::equal(ld, d));
  EXPECT_TRUE(torch::equal(li, i));

  FaissNN flat(false, 2);
  flat.load(dir + "/bank.faiss");
  auto [fd, fi] = flat.run(4, queries);
  EXPECT_LE(max_abs_diff(fd, d), 1e-4 * fd.max().item<double>());

  // And the reverse: an index the Python reference wrote.
  ExactPrunedNN from_python(2);
  from_python.load(test::fixture("common/faiss_flat_by_python.faiss"));
  auto [pd, pi] = from_python.run(4, load_golden("common/faiss_queries.npy"));
  EXPECT_TRUE(torch::equal(pi, load_golden("common/faiss_indices_k4.npy")));
  const torch::Tensor expected = load_golden("common/faiss_distances_k4.npy");
  EXPECT_LT(max_abs_diff(pd, expected) / expected.abs().max().item<double>(), 1e-5);

  loaded.reset_index();
  EXPECT_FALSE(loaded.is_fitted());
  EXPECT_THROW(loaded.run(1, queries), std::logic_error);
}

TEST(ExactPrunedNN, ConcurrentRunsEqualSerialOnes) {
  const torch::Tensor bank = clustered(2000, 150, 30, 7);
  ExactPrunedNN nn(2);
  nn.fit(bank);
  std::vector<torch::Tensor> queries;
  std::vector<std::pair<torch::Tensor, torch::Tensor>> serial, parallel(6);
  for (int t = 0; t < 6; ++t) {
    queries.push_back(clustered(150, 150, 30, 100 + t));
    serial.push_back(nn.run(1 + t % 3, queries[t]));
  }
  std::vector<std::thread> threads;
  for (int t = 0; t < 6; ++t) threads.emplace_back([&, t] { parallel[t] = nn.run(1 + t % 3, queries[t]); });
  for (auto& thread : threads) thread.join();
  for (int t = 0; t < 6; ++t) {
    EXPECT_TRUE(torch::equal(parallel[t].first, serial[t].first));
    EXPECT_TRUE(torch::equal(parallel[t].second, serial[t].second));
  }
}

TEST(ExactPrunedNN, IsANearestNeighbourSearchWithItsOwnKind) {
  std::shared_ptr<NearestNeighbourSearch> nn = std::make_shared<ExactPrunedNN>(2);
  EXPECT_STREQ(nn->kind(), "ExactPrunedNN");
  const torch::Tensor bank = clustered(300, 24, 5, 8);
  const torch::Tensor queries = clustered(40, 24, 5, 9);
  nn->fit(bank);
  auto [d, i] = nn->run(2, queries);  // through the base class
  expect_exact(queries, bank, 2, d, i);
  // index_features: a throw-away bank instead of the fitted one.
  auto [od, oi] = nn->run(2, queries, bank.slice(0, 0, 100));
  expect_exact(queries, bank.slice(0, 0, 100), 2, od, oi);
  EXPECT_EQ(nn->size(), 300);
}

TEST(ExactPrunedNN, ErrorsNameTheProblem) {
  ExactPrunedNN nn(1);
  EXPECT_NE(error_of([&] {
              nn.run(1, torch::ones({1, 8}));
            }).find("ExactPrunedNN: run() before fit()"),
            std::string::npos);
  EXPECT_NE(error_of([] { ExactPrunedNN(0); }).find("num_workers must be at least 1"), std::string::npos);
  nn.fit(torch::ones({3, 8}));
  EXPECT_NE(error_of([&] { nn.run(1, torch::ones({1, 9})); }).find("dimension 9, the index has 8"), std::string::npos);
  EXPECT_NE(error_of([&] { nn.run(0, torch::ones({1, 8})); }).find("at least 1"), std::string::npos);
  torch::Tensor bad = torch::ones({2, 8});
  bad[1][3] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_NE(error_of([&] { nn.run(1, bad); }).find("query features contain NaN"), std::string::npos);
  // A bank it cannot search leaves the object unfitted rather than half fitted.
  EXPECT_NE(error_of([&] { nn.fit(bad); }).find("memory bank contains NaN"), std::string::npos);
  EXPECT_FALSE(nn.is_fitted());
}

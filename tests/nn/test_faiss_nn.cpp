#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "common_fixtures.h"
#include "patchcore/core/file.h"
#include "patchcore/nn/faiss_nn.h"
#include "patchcore/nn/nearest_neighbour_scorer.h"

using namespace patchcore;
using test::error_of;
using test::load_golden;
using test::max_abs_diff;

TEST(FaissNN, ReturnsSquaredDistancesOfPythonFaiss) {
  FaissNN nn(false, 2);
  nn.fit(load_golden("common/faiss_bank.npy"));
  auto [distances, indices] = nn.run(4, load_golden("common/faiss_queries.npy"));
  EXPECT_TRUE(torch::equal(indices, load_golden("common/faiss_indices_k4.npy")));
  const torch::Tensor expected = load_golden("common/faiss_distances_k4.npy");
  EXPECT_LT(max_abs_diff(distances, expected) / expected.abs().max().item<double>(), 1e-5);
  // Squared, not plain L2: check one against a direct computation.
  const torch::Tensor bank = load_golden("common/faiss_bank.npy");
  const torch::Tensor q = load_golden("common/faiss_queries.npy")[0];
  const double direct = (bank[indices[0][0].item<int64_t>()] - q).pow(2).sum().item<double>();
  EXPECT_NEAR(distances[0][0].item<double>(), direct, 1e-4 * direct);
}

TEST(FaissNN, RunWithIndexFeaturesSearchesThoseInstead) {
  FaissNN nn;
  nn.fit(torch::zeros({3, 64}));
  auto [distances, indices] = nn.run(4, load_golden("common/faiss_queries.npy"), load_golden("common/faiss_bank.npy"));
  EXPECT_TRUE(torch::equal(indices, load_golden("common/faiss_indices_k4.npy")));
  EXPECT_EQ(nn.size(), 3);
}

TEST(FaissNN, IndexWrittenByPythonLoadsAndSearchesIdentically) {
  FaissNN nn;
  nn.load(test::fixture("common/faiss_flat_by_python.faiss"));
  EXPECT_EQ(nn.size(), 300);
  auto [distances, indices] = nn.run(4, load_golden("common/faiss_queries.npy"));
  EXPECT_TRUE(torch::equal(indices, load_golden("common/faiss_indices_k4.npy")));
  // BLAS blocking and thread count change the rounding of |x|²+|y|²-2x·y, not the neighbours.
  const torch::Tensor expected = load_golden("common/faiss_distances_k4.npy");
  EXPECT_LT(max_abs_diff(distances, expected) / expected.abs().max().item<double>(), 1e-5);
}

TEST(FaissNN, SaveLoadRoundTripKeepsResults) {
  const std::string file = test::temp_dir() + "/bank.faiss";
  FaissNN nn;
  nn.fit(load_golden("common/faiss_bank.npy"));
  nn.save(file);
  FaissNN loaded;
  loaded.load(file);
  const torch::Tensor queries = load_golden("common/faiss_queries.npy");
  auto [d1, i1] = nn.run(2, queries);
  auto [d2, i2] = loaded.run(2, queries);
  EXPECT_TRUE(torch::equal(d1, d2));
  EXPECT_TRUE(torch::equal(i1, i2));
  loaded.reset_index();
  EXPECT_FALSE(loaded.is_fitted());
  EXPECT_THROW(loaded.run(1, queries), std::logic_error);
}

TEST(FaissNN, ErrorsNameTheProblem) {
  FaissNN nn;
  EXPECT_NE(error_of([&] { nn.fit(torch::zeros({0, 8})); }).find("at least one row"), std::string::npos);
  nn.fit(torch::ones({3, 8}));
  EXPECT_NE(error_of([&] {
              nn.run(4, torch::ones({1, 8}));
            }).find("larger than the memory bank (3 rows)"),
            std::string::npos);
  EXPECT_NE(error_of([&] { nn.run(1, torch::ones({1, 9})); }).find("dimension 9, the index has 8"), std::string::npos);
  EXPECT_NE(error_of([&] { nn.run(0, torch::ones({1, 8})); }).find("at least 1"), std::string::npos);
  EXPECT_NE(error_of([] { FaissNN(true, 1); }).find("GPU"), std::string::npos);

  const std::string dir = test::temp_dir();
  EXPECT_NE(error_of([&] { nn.load(dir + "/missing.faiss"); }).find("missing.faiss: no such index file"),
            std::string::npos);
  std::ofstream(dir + "/garbage.faiss") << "this is not a faiss index";
  EXPECT_NE(error_of([&] { nn.load(dir + "/garbage.faiss"); }).find("garbage.faiss: not a readable FAISS index"),
            std::string::npos);
  std::ifstream good(test::fixture("common/faiss_flat_by_python.faiss"), std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(good)), {});
  std::ofstream(dir + "/cut.faiss", std::ios::binary) << bytes.substr(0, bytes.size() / 2);
  EXPECT_NE(error_of([&] { nn.load(dir + "/cut.faiss"); }).find("cut.faiss: not a readable FAISS index"),
            std::string::npos);
  // An IVF-PQ file is a valid index, but not what the exact search expects.
  EXPECT_NE(error_of([&] { nn.load(test::fixture("common/faiss_ivfpq_by_python.faiss")); }).find("another kind"),
            std::string::npos);
  EXPECT_TRUE(nn.is_fitted()) << "a failed load must leave the previous index in place";
}

TEST(ApproximateFaissNN, IvfPqIndexFromPythonSearchesIdentically) {
  ApproximateFaissNN nn;
  nn.load(test::fixture("common/faiss_ivfpq_by_python.faiss"));
  auto [distances, indices] = nn.run(3, load_golden("common/faiss_queries.npy"));
  EXPECT_TRUE(torch::equal(indices, load_golden("common/faiss_ivfpq_indices_k3.npy")));
  EXPECT_LT(max_abs_diff(distances, load_golden("common/faiss_ivfpq_distances_k3.npy")), 1e-4);
}

TEST(ApproximateFaissNN, TrainsBeforeAddingAndFindsExactDuplicates) {
  torch::manual_seed(0);
  const torch::Tensor rows = torch::randn({1024, 64});
  ApproximateFaissNN nn(false, 1);
  nn.fit(rows);
  EXPECT_EQ(nn.size(), 1024);
  // Quantised distances are approximate, but most bank rows should find themselves first.
  auto [distances, indices] = nn.run(1, rows.slice(0, 0, 200));
  const auto self = (indices.squeeze(1) == torch::arange(200)).sum().item<int64_t>();
  EXPECT_GT(self, 150);
}

TEST(ApproximateFaissNN, ErrorsForTooFewPointsOrIndivisibleDimension) {
  ApproximateFaissNN nn;
  EXPECT_NE(error_of([&] { nn.fit(torch::randn({100, 64})); }).find("at least 512 training rows"), std::string::npos);
  EXPECT_NE(error_of([&] { nn.fit(torch::randn({600, 100})); }).find("not divisible by 64"), std::string::npos);
}

TEST(ApproximateFaissNN, DamagedIvfPqCountsAreRefusedBeforeFaissReadsThem) {
  torch::manual_seed(0);
  ApproximateFaissNN nn(false, 1);
  nn.fit(torch::randn({1024, 64}));
  const std::string dir = test::temp_dir(), good = dir + "/good.faiss";
  nn.save(good);
  const std::string bytes = read_file(good);
  // Offsets in FAISS's IVF-PQ layout: fourcc and index header (37 bytes), nlist, nprobe, the flat quantizer
  // (fourcc and header, count, 512 x 64 floats), an empty direct map (type, count), by_residual, code_size,
  // then the product quantizer's d, M and nbits.
  const size_t pq = 37 + 8 + 8 + 37 + 8 + 512 * 64 * 4 + 1 + 8 + 1 + 8;
  auto damaged = [&](size_t offset, uint64_t value) {
    std::string copy = bytes;
    std::memcpy(copy.data() + offset, &value, sizeof value);
    const std::string path = dir + "/damaged.faiss";
    std::ofstream(path, std::ios::binary) << copy;
    ApproximateFaissNN loaded;
    return error_of([&] { loaded.load(path); });
  };
  ASSERT_EQ(damaged(pq, 64), "<no error>");  // the offsets are right: rewriting d with itself changes nothing
  for (auto [offset, value] : {std::pair<size_t, uint64_t>{pq + 8, 0}, {pq + 8, 3}, {pq + 16, 40}, {pq + 16, 0}})
    EXPECT_NE(damaged(offset, value).find("the product quantizer"), std::string::npos) << offset << " " << value;
  EXPECT_NE(damaged(37, uint64_t{1} << 40).find("one centroid"), std::string::npos);  // nlist
  std::ofstream(dir + "/truncated.faiss", std::ios::binary) << bytes.substr(0, bytes.size() - 100);
  ApproximateFaissNN loaded;
  EXPECT_NE(error_of([&] { loaded.load(dir + "/truncated.faiss"); }).find("more than the file holds"),
            std::string::npos);
}

TEST(NearestNeighbourScorer, ScoresAreMeanOfKSquaredDistances) {
  NearestNeighbourScorer scorer(4, std::make_shared<FaissNN>());
  const torch::Tensor bank = load_golden("common/faiss_bank.npy");
  // Two "layers" of 32 columns each are concatenated back into the 64-d bank.
  scorer.fit({bank.slice(1, 0, 32), bank.slice(1, 32, 64)});
  const torch::Tensor queries = load_golden("common/faiss_queries.npy");
  auto [scores, distances, nns] = scorer.predict({queries.slice(1, 0, 32), queries.slice(1, 32, 64)});
  const torch::Tensor expected = load_golden("common/faiss_distances_k4.npy");
  EXPECT_TRUE(torch::equal(nns, load_golden("common/faiss_indices_k4.npy")));
  EXPECT_LT(max_abs_diff(scores, expected.mean(1)) / expected.max().item<double>(), 1e-5);
  EXPECT_EQ(distances.sizes(), (std::vector<int64_t>{40, 4}));
}

TEST(NearestNeighbourScorer, SaveLoadRoundTripWithPrependAndFeatures) {
  const std::string dir = test::temp_dir() + "/model";
  const torch::Tensor bank = load_golden("common/faiss_bank.npy");
  const torch::Tensor queries = load_golden("common/faiss_queries.npy");
  NearestNeighbourScorer scorer(2, std::make_shared<FaissNN>());
  scorer.fit({bank});
  scorer.save(dir, true, "Ensemble-0-1_");
  EXPECT_TRUE(std::filesystem::exists(dir + "/Ensemble-0-1_nnscorer_search_index.faiss"));
  EXPECT_TRUE(std::filesystem::exists(dir + "/Ensemble-0-1_nnscorer_features.npy"));
  NearestNeighbourScorer loaded(2, std::make_shared<FaissNN>());
  loaded.load(dir, "Ensemble-0-1_");
  EXPECT_TRUE(torch::equal(std::get<0>(scorer.predict({queries})), std::get<0>(loaded.predict({queries}))));
  // The separately saved bank reloads and can be written again.
  loaded.save(dir + "/again", true);
  EXPECT_TRUE(torch::equal(
      load_golden("common/faiss_bank.npy"),
      torch::from_blob(read_npy(dir + "/again/nnscorer_features.npy").as_float().data(), {300, 64}).clone()));
  EXPECT_THROW(loaded.load(dir, "wrong_prefix_"), std::runtime_error);
}

TEST(NearestNeighbourScorer, RejectsEmptyFitMismatchedRowsAndSmallBanks) {
  NearestNeighbourScorer scorer(3, std::make_shared<FaissNN>());
  EXPECT_THROW(scorer.fit({}), std::invalid_argument);
  EXPECT_THROW(scorer.fit({torch::ones({4, 2}), torch::ones({5, 2})}), std::invalid_argument);
  EXPECT_NE(error_of([&] {
              scorer.fit({torch::ones({2, 8})});
            }).find("smaller than n_nearest_neighbours 3"),
            std::string::npos);
  EXPECT_THROW(NearestNeighbourScorer(0, std::make_shared<FaissNN>()), std::invalid_argument);
}

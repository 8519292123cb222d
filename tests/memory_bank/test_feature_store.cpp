#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <limits>
#include <memory>

#include "patchcore/memory_bank/feature_store.h"
#include "support.h"

using namespace patchcore;
using test::error_of;
namespace fs = std::filesystem;

TEST(FeatureStore, GatherReturnsTheAskedRowsInTheAskedOrder) {
  torch::manual_seed(3);
  const int64_t dim = 37;
  const std::string dir = test::temp_dir();
  for (const auto& store : {std::make_unique<FeatureStore>(dim, dir), FeatureStore::in_memory(dim)}) {
    SCOPED_TRACE(store->directory().empty() ? "in memory" : "in a file");
    EXPECT_TRUE(store->directory().empty() || store->directory() == dir);
    store->reserve(900);
    std::vector<torch::Tensor> chunks;
    for (int64_t n : {1, 500, 64, 300}) {
      chunks.push_back(torch::randn({n, dim}));
      store->append(chunks.back());
    }
    const torch::Tensor all = torch::cat(chunks);
    ASSERT_EQ(store->rows(), all.size(0));
    EXPECT_EQ(store->dim(), dim);

    // Unsorted, repeated, every row, and runs of consecutive rows longer than one read.
    std::vector<int64_t> indices = {864, 0, 5, 5, 4, 863, 1, 2, 3};
    for (int64_t i = 100; i < 700; ++i) indices.push_back(i);
    for (int64_t i = 0; i < 200; ++i) indices.push_back((i * 7919) % all.size(0));
    const torch::Tensor expected = all.index_select(0, torch::tensor(indices, torch::kInt64));
    EXPECT_TRUE(torch::equal(store->gather(indices), expected));
    EXPECT_EQ(store->gather({}).sizes(), (std::vector<int64_t>{0, dim}));
  }
  // Non-contiguous input is stored by value.
  FeatureStore transposed(3, test::temp_dir());
  const torch::Tensor t = torch::randn({3, 5}).t();
  transposed.append(t);
  EXPECT_TRUE(torch::equal(transposed.gather({0, 1, 2, 3, 4}), t));
}

TEST(FeatureStore, LeavesNoFileBehind) {
  const std::string dir = test::temp_dir();
  {
    FeatureStore store(8, dir);
    store.reserve(1000);
    store.append(torch::ones({10, 8}));
    EXPECT_TRUE(fs::is_empty(dir));  // the file has no name
  }
  EXPECT_TRUE(fs::is_empty(dir));
}

TEST(FeatureStore, ErrorsNameTheDirectoryAndTheProblem) {
  const std::string missing = test::temp_dir() + "/no/such/dir";
  EXPECT_NE(error_of([&] { FeatureStore(4, missing); }).find(missing), std::string::npos);
  EXPECT_THROW(FeatureStore(0, test::temp_dir()), std::invalid_argument);
  EXPECT_THROW(FeatureStore::in_memory(0), std::invalid_argument);

  const std::string dir = test::temp_dir();
  FeatureStore store(4, dir);
  EXPECT_THROW(store.append(torch::ones({2, 5})), std::invalid_argument);
  EXPECT_THROW(store.append(torch::ones({2, 4}, torch::kFloat64)), std::invalid_argument);
  EXPECT_THROW(store.append(torch::ones({4})), std::invalid_argument);
  store.append(torch::ones({2, 4}));
  EXPECT_NE(error_of([&] { store.gather({0, 2}); }).find("row 2 is outside the 2 stored rows"), std::string::npos);
  EXPECT_THROW(store.gather({-1}), std::out_of_range);
  // Far more space than any disk has: refused at once, naming the directory.
  const std::string message = error_of([&] { store.reserve(int64_t{1} << 55); });
  EXPECT_NE(message.find(dir), std::string::npos) << message;
  EXPECT_NE(message.find("cannot reserve"), std::string::npos) << message;
  const std::string overflow = error_of([&] { store.reserve(std::numeric_limits<int64_t>::max()); });
  EXPECT_NE(overflow.find(dir + ": cannot reserve"), std::string::npos) << overflow;
}

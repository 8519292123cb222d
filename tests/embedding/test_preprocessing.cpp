#include <gtest/gtest.h>
#include <torch/torch.h>

#include "common_fixtures.h"
#include "patchcore/embedding/aggregator.h"
#include "patchcore/embedding/preprocessing.h"

using namespace patchcore;
using test::load_golden;
using test::max_abs_diff;

class AdaptivePooling : public ::testing::TestWithParam<std::pair<int, int>> {};

TEST_P(AdaptivePooling, MeanMapperMatchesTorchAdaptiveAvgPool1d) {
  const auto [lin, lout] = GetParam();
  const std::string tag = "common/pool_" + std::to_string(lin) + "_" + std::to_string(lout);
  const torch::Tensor in = load_golden(tag + "_in.npy");
  const torch::Tensor expected = load_golden(tag + "_out.npy");
  EXPECT_LT(max_abs_diff(MeanMapper(lout).forward(in), expected), 1e-6);
}

// Fractional, overlapping bins (ResNet-18), exact bins (WRN50), the aggregator's halving, and upsampling.
INSTANTIATE_TEST_SUITE_P(Bins, AdaptivePooling,
                         ::testing::Values(std::pair{1152, 1024}, std::pair{2304, 1024}, std::pair{4608, 1024},
                                           std::pair{9216, 1024}, std::pair{2048, 1024}, std::pair{7, 3},
                                           std::pair{5, 8}, std::pair{10, 10}));

TEST(Preprocessing, StacksOneMeanMapperPerLayer) {
  const torch::Tensor l2 = load_golden("common/embed_layer2.npy");
  const torch::Tensor l3 = load_golden("common/embed_layer3.npy");
  Preprocessing preprocessing({128, 256}, 1024);
  const torch::Tensor stacked = preprocessing.forward({l2, l3});
  EXPECT_LT(max_abs_diff(stacked, load_golden("common/embed_preprocessed.npy")), 1e-6);
  EXPECT_LT(max_abs_diff(Aggregator(512).forward(stacked), load_golden("common/embed_aggregated_512.npy")), 1e-6);
}

TEST(Preprocessing, RejectsWrongLayerCountOrChannels) {
  Preprocessing preprocessing({128, 256}, 1024);
  const torch::Tensor l2 = torch::zeros({2, 128, 3, 3});
  EXPECT_THROW(preprocessing.forward({l2}), std::invalid_argument);
  try {
    preprocessing.forward({l2, torch::zeros({2, 64, 3, 3})});
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("64 channels, expected 256"), std::string::npos) << e.what();
  }
}

TEST(Aggregator, RejectsEmptyInputAndBadDimension) {
  EXPECT_THROW(Aggregator(0), std::invalid_argument);
  EXPECT_THROW(Aggregator(4).forward(torch::zeros({0, 2, 8})), std::invalid_argument);
}

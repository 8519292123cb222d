#include <gtest/gtest.h>
#include <torch/torch.h>

#include "common_fixtures.h"
#include "patchcore/segmentation/rescale_segmentor.h"

using namespace patchcore;
using test::load_golden;
using test::max_abs_diff;

TEST(RescaleSegmentor, UpsamplesBilinearAndSmoothsLikeScipy) {
  const torch::Tensor scores = load_golden("common/segment_scores.npy");
  const torch::Tensor expected = load_golden("common/segment_maps.npy");
  RescaleSegmentor segmentor("cpu", 224);
  const auto maps = segmentor.convert_to_segmentation(scores);
  ASSERT_EQ(maps.size(), 2u);
  EXPECT_EQ(maps[0].sizes(), (std::vector<int64_t>{224, 224}));
  EXPECT_LT(max_abs_diff(maps[0], expected[0]), 1e-6);
  // Each map depends on its own scores only.
  EXPECT_LT(max_abs_diff(segmentor.convert_to_segmentation(scores.slice(0, 0, 1))[0], expected[0]), 1e-6);
  // [B, L] input with a square grid is the same as [B, h, w].
  EXPECT_LT(max_abs_diff(segmentor.convert_to_segmentation(scores.reshape({2, 784}))[0], expected[0]), 1e-6);
}

TEST(RescaleSegmentor, BilinearUpsamplingMatchesTorchAlignCornersFalse) {
  const torch::Tensor scores = load_golden("common/segment_scores.npy");
  const torch::Tensor expected = load_golden("common/segment_upsampled.npy");
  // A tiny sigma leaves the upsampled map as it is, so this isolates the interpolation.
  const auto maps = RescaleSegmentor("cpu", 224, 1e-3).convert_to_segmentation(scores.slice(0, 0, 1));
  EXPECT_LT(max_abs_diff(maps[0], expected[0]), 1e-6);
}

class GaussianFilter : public ::testing::TestWithParam<std::string> {};

TEST_P(GaussianFilter, MatchesScipyIncludingReflectBorders) {
  const std::string tag = "common/gauss_" + GetParam();
  const double sigma = std::stod(GetParam().substr(GetParam().find("_s") + 2));
  const torch::Tensor in = load_golden(tag + "_in.npy");
  const torch::Tensor out = gaussian_filter(in, sigma);
  EXPECT_EQ(out.scalar_type(), torch::kFloat32);
  EXPECT_LT(max_abs_diff(out, load_golden(tag + "_out.npy")), 2e-7);
}

INSTANTIATE_TEST_SUITE_P(Shapes, GaussianFilter, ::testing::Values("20x31_s4.0", "5x7_s4.0", "50x40_s2.5", "1x9_s1.0"));

TEST(RescaleSegmentor, RejectsBadShapesAndParameters) {
  RescaleSegmentor segmentor("cpu", 32);
  EXPECT_THROW(segmentor.convert_to_segmentation(torch::zeros({2, 10})), std::invalid_argument);
  EXPECT_THROW(segmentor.convert_to_segmentation(torch::zeros({28, 28})), std::invalid_argument);
  EXPECT_THROW(RescaleSegmentor("cpu", 0), std::invalid_argument);
  EXPECT_THROW(RescaleSegmentor("tpu", 224), std::invalid_argument);
  EXPECT_THROW(gaussian_filter(torch::zeros({4, 4}), -1.0), std::invalid_argument);
}

TEST(RescaleSegmentor, UpsamplesTheLayer3GridLikeTorch) {
  // 14 -> 28 is the layer alignment PatchCore does; sigma 1e-3 has a single tap, so only interpolation remains.
  const auto maps = RescaleSegmentor("cpu", 28, 1e-3).convert_to_segmentation(load_golden("common/bilinear_14.npy"));
  const torch::Tensor expected = load_golden("common/bilinear_14_to_28.npy");
  for (int i = 0; i < 3; ++i) EXPECT_LT(max_abs_diff(maps[static_cast<size_t>(i)], expected[i]), 1e-6);
}

#include <gtest/gtest.h>

#include <opencv2/core.hpp>
#include <random>

#include "patchcore/segmentation/view_map.h"

using namespace patchcore;

namespace {

cv::Mat random_map(int side, uint32_t seed) {
  cv::Mat map(side, side, CV_32F);
  cv::RNG rng(seed);
  rng.fill(map, cv::RNG::UNIFORM, 1.0, 2.0);
  return map;
}

}  // namespace

TEST(ViewMap, WithoutScalingTheMapLandsOnTheCropWindowPixelForPixel) {
  // 256 x 300 (w x h) with resize 256: no scaling; the crop of 256 starts at row (300 - 256) / 2 = 22.
  ImageTransform t;
  t.resize = t.crop = 256;
  const cv::Size original(256, 300);
  const cv::Rect2d view = view_in_original(t, original);
  EXPECT_EQ(view, cv::Rect2d(0, 22, 256, 256));
  const cv::Mat map = random_map(256, 1);
  const cv::Mat placed = map_to_original(map, t, original, -5.f);
  ASSERT_EQ(placed.size(), original);
  EXPECT_EQ(cv::norm(placed(cv::Rect(0, 22, 256, 256)), map, cv::NORM_INF), 0.0);
  EXPECT_EQ(cv::countNonZero(placed.rowRange(0, 22) != -5.f), 0);
  EXPECT_EQ(cv::countNonZero(placed.rowRange(278, 300) != -5.f), 0);
  const cv::Mat seen = view_mask(t, original);
  EXPECT_EQ(cv::countNonZero(seen), 256 * 256);
  EXPECT_EQ(cv::countNonZero(seen(cv::Rect(0, 22, 256, 256))), 256 * 256);
}

TEST(ViewMap, ScaledWindowMatchesTheResizeAndCropGeometry) {
  // 600 x 400 resized to 384 x 256, crop 224 at (80, 16): in the original, scale 600 / 384 = 1.5625 on both axes.
  ImageTransform t;
  const cv::Size original(600, 400);
  const cv::Rect2d view = view_in_original(t, original);
  const double scale = 600.0 / 384.0;
  EXPECT_DOUBLE_EQ(view.x, 80 * scale);
  EXPECT_DOUBLE_EQ(view.y, 16 * scale);
  EXPECT_DOUBLE_EQ(view.width, 224 * scale);
  EXPECT_DOUBLE_EQ(view.height, 224 * (400.0 / 256.0));
  // A constant map stays constant inside the window; outside is the given value.
  const cv::Mat placed = map_to_original(cv::Mat(224, 224, CV_32F, cv::Scalar(3.f)), t, original, 0.f);
  const cv::Rect inside(cv::Point(126, 26), cv::Point(474, 374));  // pixel centres within the window
  EXPECT_LE(cv::norm(placed(inside) - 3.f, cv::NORM_INF), 1e-5);
  EXPECT_EQ(cv::countNonZero(placed.colRange(0, 124) != 0.f), 0);
  EXPECT_EQ(cv::countNonZero(placed.colRange(476, 600) != 0.f), 0);
  // A map with values in [1, 2] keeps that range: bilinear resampling never leaves it.
  double low, high;
  cv::minMaxLoc(map_to_original(random_map(224, 2), t, original, 1.5f), &low, &high);
  EXPECT_GE(low, 1.0 - 1e-5);
  EXPECT_LE(high, 2.0 + 1e-5);
}

TEST(ViewMap, RefusesAMapOfAnotherSize) {
  ImageTransform t;
  EXPECT_THROW(map_to_original(cv::Mat(100, 100, CV_32F), t, cv::Size(300, 300), 0.f), std::invalid_argument);
}

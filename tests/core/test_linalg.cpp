#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <set>

#include "patchcore/core/linalg.h"
#include "patchcore/core/numeric.h"

using namespace patchcore;

TEST(PrincipalAxes, AreOrthonormalAndMatchTheCovariancesEigenvectors) {
  torch::manual_seed(5);
  // Variances 16, 9, 4, 1 along a random rotation: the axes must be that rotation's columns, in that order.
  const int64_t d = 4, n = 20000;
  const torch::Tensor rotation = std::get<0>(torch::linalg::qr(torch::randn({d, d}, torch::kFloat64)));
  const torch::Tensor scales = torch::tensor({4.0, 3.0, 2.0, 1.0}, torch::kFloat64);
  const torch::Tensor rows =
      (torch::randn({n, d}, torch::kFloat64) * scales).mm(rotation.t()).to(torch::kFloat32) + 7.0;
  const PrincipalAxes pa = principal_axes(rows.contiguous(), 3, n);
  ASSERT_EQ(pa.axes.sizes(), (std::vector<int64_t>{3, d}));
  EXPECT_LT((pa.axes.mm(pa.axes.t()) - torch::eye(3, torch::kFloat64)).abs().max().item<double>(), 1e-14);
  for (int64_t k = 0; k < 3; ++k) {
    const double alignment = std::abs(pa.axes[k].dot(rotation.select(1, k)).item<double>());
    EXPECT_GT(alignment, 0.999) << "axis " << k;
  }
  EXPECT_LT((pa.mean - rows.mean(0)).abs().max().item<double>(), 1e-4);
  // A sample of the rows gives nearly the same axes.
  const PrincipalAxes sampled = principal_axes(rows.contiguous(), 1, 2000);
  EXPECT_GT(std::abs(sampled.axes[0].dot(rotation.select(1, 0)).item<double>()), 0.99);
}

TEST(KdOrder, IsAPermutationWhoseLeavesAreAlignedAndCompact) {
  torch::manual_seed(9);
  const int64_t n = 1000, axes = 3;
  const torch::Tensor values = torch::rand({n, axes}).contiguous();
  std::vector<int64_t> ids(n);
  std::iota(ids.begin(), ids.end(), 0);
  std::vector<std::pair<int64_t, int64_t>> leaves;
  kd_order(ids.data(), n, values.data_ptr<float>(), axes, axes, 64, 8, &leaves);
  EXPECT_EQ(std::set<int64_t>(ids.begin(), ids.end()).size(), static_cast<size_t>(n));
  ASSERT_FALSE(leaves.empty());
  EXPECT_EQ(leaves.front().first, 0);
  EXPECT_EQ(leaves.back().second, n);
  double leaf_extent = 0.0;
  for (size_t l = 0; l < leaves.size(); ++l) {
    const auto [begin, end] = leaves[l];
    if (l > 0) EXPECT_EQ(begin, leaves[l - 1].second);
    EXPECT_LE(end - begin, 64);
    if (end != n) EXPECT_EQ((end - begin) % 8, 0) << "leaf " << l;
    std::vector<int64_t> members(ids.begin() + begin, ids.begin() + end);
    const torch::Tensor box = values.index_select(0, torch::tensor(members));
    leaf_extent += (box.amax(0) - box.amin(0)).prod().item<double>();
  }
  // Leaves of 64 uniform points in a unit cube hold about 1/16 of it each, far below the whole cube.
  EXPECT_LT(leaf_extent / static_cast<double>(leaves.size()), 0.2);
}

TEST(AllFinite, AgreesWithIsfiniteOnEveryKindOfFloat) {
  // Random bit patterns cover every exponent, both signs and NaN payloads; each is checked alone and amid finite
  // values, at every position of a vector-width run.
  std::mt19937 random(11);
  std::vector<float> values(37, 1.5f);
  for (int trial = 0; trial < 20000; ++trial) {
    const uint32_t bits = trial < 4 ? std::array<uint32_t, 4>{0x7f800000u, 0xff800000u, 0x7f7fffffu, 0x00000001u}[trial]
                                    : static_cast<uint32_t>(random());
    float v;
    std::memcpy(&v, &bits, sizeof v);
    const size_t at = static_cast<size_t>(trial) % values.size();
    values[at] = v;
    EXPECT_EQ(all_finite(values.data(), static_cast<int64_t>(values.size())), static_cast<bool>(std::isfinite(v)))
        << std::hex << bits;
    EXPECT_EQ(all_finite(&values[at], 1), static_cast<bool>(std::isfinite(v))) << std::hex << bits;
    values[at] = 1.5f;
  }
  EXPECT_TRUE(all_finite(values.data(), 0));
}

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "patchcore/embedding/patch_maker.h"

using namespace patchcore;

TEST(PatchMaker, PatchifyFollowsUnfoldOrderWithZeroPadding) {
  const torch::Tensor x = torch::arange(2 * 3 * 4 * 5, torch::kFloat32).reshape({2, 3, 4, 5});
  PatchMaker maker(3);
  auto [patches, grid] = maker.patchify(x);
  EXPECT_EQ(grid, (std::vector<int64_t>{4, 5}));
  ASSERT_EQ(patches.sizes(), (std::vector<int64_t>{2, 20, 3, 3, 3}));
  // Patch at grid (1, 2) of image 1, channel 2: the 3x3 neighbourhood around x[1, 2, 1, 2].
  EXPECT_TRUE(torch::equal(patches[1][1 * 5 + 2][2], x[1][2].slice(0, 0, 3).slice(1, 1, 4)));
  // Top-left patch: the padded row and column are zeros.
  EXPECT_EQ(patches[0][0][0][0][0].item<float>(), 0.f);
  EXPECT_EQ(patches[0][0][0][1][1].item<float>(), x[0][0][0][0].item<float>());
}

TEST(PatchMaker, ScoreIsMaxOverPatchesAndUnpatchSplitsBatches) {
  PatchMaker maker(3);
  const torch::Tensor scores = torch::tensor({1.f, 5.f, 2.f, 7.f, 3.f, 0.f});
  const torch::Tensor per_image = maker.unpatch_scores(scores, 2);
  EXPECT_EQ(per_image.sizes(), (std::vector<int64_t>{2, 3}));
  EXPECT_TRUE(torch::equal(maker.score(per_image), torch::tensor({5.f, 7.f})));
  EXPECT_THROW(maker.unpatch_scores(scores, 4), std::invalid_argument);
  EXPECT_THROW(PatchMaker(0), std::invalid_argument);
}

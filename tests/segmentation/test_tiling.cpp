#include <gtest/gtest.h>
#include <torch/torch.h>

#include "patchcore/segmentation/tiling.h"

using namespace patchcore;

TEST(TileGrid, CoversTheFrameWithTheLeastOverlapAndTheFewestTiles) {
  for (int length : {64, 65, 100, 127, 128, 300, 401, 1000}) {
    for (int overlap : {0, 8, 31}) {
      const TileGrid grid = tile_grid(length, 64, 64, overlap);
      ASSERT_EQ(grid.ys, std::vector<int>{0});
      const std::vector<int>& xs = grid.xs;
      EXPECT_EQ(xs.front(), 0);
      EXPECT_EQ(xs.back() + 64, length) << length;
      for (size_t i = 1; i < xs.size(); ++i) {
        EXPECT_GT(xs[i], xs[i - 1]);
        EXPECT_GE(xs[i - 1] + 64 - xs[i], overlap) << length << " " << overlap;
      }
      // One tile fewer could not keep that overlap: its n - 2 strides of at most 64 - overlap fall short.
      const auto n = static_cast<int>(xs.size());
      if (n > 1) EXPECT_LT((n - 2) * (64 - overlap) + 64, length) << length << " " << overlap;
      EXPECT_EQ(grid.count(), n);
    }
  }
  EXPECT_THROW(tile_grid(63, 64, 64, 0), std::invalid_argument);
  EXPECT_THROW(tile_grid(100, 100, 64, 64), std::invalid_argument);
  EXPECT_THROW(tile_grid(100, 100, 64, -1), std::invalid_argument);
}

TEST(TileGrid, CutTilesAreTheFramesWindowsInRowOrder) {
  const torch::Tensor image = torch::rand({3, 90, 130});
  const TileGrid grid = tile_grid(130, 90, 64, 16);
  ASSERT_EQ(grid.xs.size(), 3u);
  ASSERT_EQ(grid.ys.size(), 2u);
  const torch::Tensor tiles = cut_tiles(image, grid);
  ASSERT_EQ(tiles.sizes(), (std::vector<int64_t>{6, 3, 64, 64}));
  int64_t index = 0;
  for (int y : grid.ys)
    for (int x : grid.xs)
      EXPECT_TRUE(torch::equal(tiles[index++], image.slice(1, y, y + 64).slice(2, x, x + 64))) << x << "," << y;
}

TEST(TileGrid, StitchingTheWindowsOfAMapGivesTheMapBack) {
  const torch::Tensor map = torch::rand({150, 97});
  const TileGrid grid = tile_grid(97, 150, 40, 12);
  const torch::Tensor stitched = stitch_tiles(cut_tiles(map.unsqueeze(0), grid).squeeze(1), grid, 150, 97);
  EXPECT_LT((stitched - map).abs().max().item<float>(), 1e-6);
  // Where tiles disagree, each pixel is the mean of those covering it.
  const torch::Tensor ones = torch::ones({grid.count(), 40, 40});
  const torch::Tensor numbered = ones * torch::arange(grid.count()).to(torch::kFloat).view({-1, 1, 1});
  const torch::Tensor mean = stitch_tiles(numbered, grid, 150, 97);
  const int x = grid.xs[1] + 1, y = grid.ys[1] + 1;  // covered by tiles (0,0)…(1,1): indices 0, 1, n, n + 1
  const auto n = static_cast<float>(grid.xs.size());
  ASSERT_LT(x, grid.xs[0] + 40);
  ASSERT_LT(y, grid.ys[0] + 40);
  EXPECT_FLOAT_EQ(mean[y][x].item<float>(), (0 + 1 + n + n + 1) / 4);
  EXPECT_THROW(stitch_tiles(numbered, grid, 151, 97), std::invalid_argument);
  EXPECT_THROW(stitch_tiles(numbered.slice(0, 1), grid, 150, 97), std::invalid_argument);
}

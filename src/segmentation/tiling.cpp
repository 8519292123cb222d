#include "patchcore/segmentation/tiling.h"

#include <ATen/ATen.h>

#include <stdexcept>
#include <string>

namespace patchcore {
namespace {

// Edges of the fewest tiles whose neighbours overlap by at least `overlap`: with n tiles the spacing
// (length - tile) / (n - 1) is at most tile - overlap, and rounding keeps it there as tile - overlap is whole.
std::vector<int> edges(int length, int tile, int overlap) {
  const int stride = tile - overlap;
  const int count = length <= tile ? 1 : 1 + (length - tile + stride - 1) / stride;
  std::vector<int> result(static_cast<size_t>(count), 0);
  for (int i = 1; i < count; ++i) {
    const int64_t span = static_cast<int64_t>(i) * (length - tile);
    result[static_cast<size_t>(i)] = static_cast<int>((2 * span + count - 1) / (2 * (count - 1)));
  }
  return result;
}

}  // namespace

TileGrid tile_grid(int width, int height, int tile, int overlap) {
  if (overlap < 0 || tile <= overlap || width < tile || height < tile) {
    throw std::invalid_argument("tile_grid: needs 0 <= overlap (" + std::to_string(overlap) + ") < tile (" +
                                std::to_string(tile) + ") <= width, height (" + std::to_string(width) + "x" +
                                std::to_string(height) + ")");
  }
  return {tile, edges(width, tile, overlap), edges(height, tile, overlap)};
}

at::Tensor cut_tiles(const at::Tensor& image, const TileGrid& grid) {
  if (image.dim() != 3 || image.size(2) < grid.tile || image.size(1) < grid.tile)
    throw std::invalid_argument("cut_tiles: the image must be [C, H, W] with both sides at least the tile");
  std::vector<at::Tensor> tiles;
  for (int y : grid.ys) {
    for (int x : grid.xs) tiles.push_back(image.slice(1, y, y + grid.tile).slice(2, x, x + grid.tile));
  }
  return at::stack(tiles);
}

at::Tensor stitch_tiles(const at::Tensor& maps, const TileGrid& grid, int64_t height, int64_t width) {
  if (maps.dim() != 3 || maps.size(0) != grid.count() || maps.size(1) != grid.tile || maps.size(2) != grid.tile)
    throw std::invalid_argument("stitch_tiles: needs one tile x tile map per tile");
  if (grid.xs.back() + grid.tile != width || grid.ys.back() + grid.tile != height)
    throw std::invalid_argument("stitch_tiles: the grid does not cover a " + std::to_string(width) + "x" +
                                std::to_string(height) + " map");
  at::Tensor sum = at::zeros({height, width}, at::kFloat);
  at::Tensor covered = at::zeros({height, width}, at::kFloat);
  int64_t index = 0;
  for (int y : grid.ys) {
    for (int x : grid.xs) {
      sum.slice(0, y, y + grid.tile).slice(1, x, x + grid.tile).add_(maps[index++]);
      covered.slice(0, y, y + grid.tile).slice(1, x, x + grid.tile).add_(1.0f);
    }
  }
  return sum.div_(covered);
}

}  // namespace patchcore

#pragma once
// The tiles view (View::kTiles): a frame too large for one pass at the model's resolution is cut into overlapping
// tiles of the model's input size, and their anomaly maps are put back together into one map of the frame.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace patchcore {

// tile x tile windows covering a width x height frame, row by row; neighbours overlap by at least `overlap` pixels,
// and the windows are spread evenly from one edge to the other.
struct TileGrid {
  int tile = 0;
  std::vector<int> xs, ys;  // left and top edges
  int64_t count() const { return static_cast<int64_t>(xs.size() * ys.size()); }
};

// Throws std::invalid_argument unless 0 <= overlap < tile <= width, height.
TileGrid tile_grid(int width, int height, int tile, int overlap);

// image [3, height, width] → tiles [count, 3, tile, tile], in the grid's row order.
at::Tensor cut_tiles(const at::Tensor& image, const TileGrid& grid);

// maps [count, tile, tile] → [height, width]: each pixel the mean of the tiles that cover it, so that the seams carry
// no step where one tile's context ends.
at::Tensor stitch_tiles(const at::Tensor& maps, const TileGrid& grid, int64_t height, int64_t width);

}  // namespace patchcore

#include "patchcore/embedding/patch_maker.h"

#include <ATen/ATen.h>

#include <stdexcept>

namespace patchcore {

PatchMaker::PatchMaker(int64_t patchsize, int64_t stride) : patchsize_(patchsize), stride_(stride) {
  if (patchsize < 1) throw std::invalid_argument("PatchMaker: patchsize must be at least 1");
  if (stride < 1) throw std::invalid_argument("PatchMaker: stride must be at least 1");
}

std::pair<at::Tensor, std::vector<int64_t>> PatchMaker::patchify(const at::Tensor& features) const {
  if (features.dim() != 4) throw std::invalid_argument("PatchMaker: features must be [B, C, H, W]");
  const int64_t padding = (patchsize_ - 1) / 2;
  std::vector<int64_t> grid;
  for (int d = 2; d < 4; ++d) {
    const int64_t n = (features.size(d) + 2 * padding - (patchsize_ - 1) - 1) / stride_ + 1;
    if (n < 1) throw std::invalid_argument("PatchMaker: feature map smaller than a patch");
    grid.push_back(n);
  }
  // torch.nn.Unfold on a 4-D input.
  const at::Tensor unfolded =
      at::im2col(features, {patchsize_, patchsize_}, {1, 1}, {padding, padding}, {stride_, stride_});
  const at::Tensor patches =
      unfolded.reshape({features.size(0), features.size(1), patchsize_, patchsize_, -1}).permute({0, 4, 1, 2, 3});
  return {patches, grid};
}

at::Tensor PatchMaker::unpatch_scores(const at::Tensor& x, int64_t batchsize) const {
  if (batchsize < 1 || x.dim() < 1 || x.size(0) % batchsize != 0)
    throw std::invalid_argument("PatchMaker: " + std::to_string(x.dim() ? x.size(0) : 0) +
                                " patch scores do not split into batches of " + std::to_string(batchsize));
  std::vector<int64_t> shape{batchsize, -1};
  for (int64_t d = 1; d < x.dim(); ++d) shape.push_back(x.size(d));
  return x.reshape(shape);
}

at::Tensor PatchMaker::score(const at::Tensor& x) const {
  at::Tensor s = x;
  while (s.dim() > 1) s = std::get<0>(s.max(-1));
  return s;
}

}  // namespace patchcore

#pragma once
// patchcore.PatchMaker: local neighbourhoods of feature maps as patches, and patch scores back to images.
#include <ATen/core/Tensor.h>

#include <utility>
#include <vector>

namespace patchcore {

class PatchMaker {
 public:
  explicit PatchMaker(int64_t patchsize, int64_t stride = 1);

  // features [B, C, H, W] → patches [B, L, C, p, p] with zero padding (p-1)/2, in torch.nn.Unfold's
  // order: L runs over the patch grid row-major, each patch channel-major then kernel row then column.
  // Also returns the patch grid size {h, w}.
  std::pair<at::Tensor, std::vector<int64_t>> patchify(const at::Tensor& features) const;
  // [B·L, ...] → [B, L, ...].
  at::Tensor unpatch_scores(const at::Tensor& x, int64_t batchsize) const;
  // Max over every axis after the first: the image score is its highest patch score.
  at::Tensor score(const at::Tensor& x) const;

  int64_t patchsize() const { return patchsize_; }
  int64_t stride() const { return stride_; }

 private:
  int64_t patchsize_;
  int64_t stride_;
};

}  // namespace patchcore

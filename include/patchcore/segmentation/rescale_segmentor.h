#pragma once
// common.RescaleSegmentor: patch scores → pixel anomaly maps.
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <string>
#include <vector>

namespace patchcore {

// scipy.ndimage.gaussian_filter(image, sigma) on a 2-D float32 map with scipy's defaults: truncate 4.0
// (radius int(4σ + 0.5), so 33 taps for σ = 4), 'reflect' borders (half-sample symmetric: d c b a | a b c d),
// axis 0 then axis 1, each pass accumulated in double and stored as float32.
at::Tensor gaussian_filter(const at::Tensor& image, double sigma, double truncate = 4.0);

class RescaleSegmentor {
 public:
  explicit RescaleSegmentor(const std::string& device = "cpu", int64_t target_size = 224, double smoothing = 4.0);

  // patch_scores [B, h, w] (or [B, h·w] with a square grid) → B maps of [target_size, target_size]:
  // bilinear upsampling (align_corners=False), then the Gaussian above.
  std::vector<at::Tensor> convert_to_segmentation(const at::Tensor& patch_scores) const;
  // The same to maps of height x width, for views that are not square.
  std::vector<at::Tensor> convert_to_segmentation(const at::Tensor& patch_scores, int64_t height, int64_t width) const;
  // Its two steps, for maps put together from tiles: the bilinear upsampling to [B, height, width], and the
  // Gaussian of one [height, width] map.
  at::Tensor rescale(const at::Tensor& patch_scores, int64_t height, int64_t width) const;
  at::Tensor smooth(const at::Tensor& map) const;

  int64_t target_size() const { return target_size_; }
  double smoothing() const { return smoothing_; }

 private:
  c10::Device device_;
  int64_t target_size_;
  double smoothing_;
};

}  // namespace patchcore

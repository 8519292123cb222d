#pragma once
// Image decoding and the reference preprocessing (PIL 9.4 + torchvision 0.14), bit for bit:
//   PIL.Image.open(p).convert("RGB") → Resize(shorter side) → CenterCrop → ToTensor → Normalize,
// and the views beyond the published centre crop (View), which resample with the same arithmetic.
//
// Decoding goes through OpenCV (IMREAD_UNCHANGED, so the real depth and channels are visible) and then
// applies PIL's conversion rules: alpha is dropped, palettes are expanded, 16-bit grey (PIL mode I / I;16)
// saturates at 255, 16-bit colour keeps the high byte, EXIF orientation is ignored. The container header
// is parsed first so that the pixel limit is enforced before any pixel buffer is allocated; only PNG,
// JPEG, BMP and TIFF are accepted.
#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <opencv2/core.hpp>
#include <stdexcept>
#include <string>

namespace patchcore {

// Any problem with an image file or its contents; the message names the file.
class ImageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct ImageLimits {
  // PIL raises DecompressionBombError above twice Image.MAX_IMAGE_PIXELS (2 · 89478485).
  int64_t max_pixels = 178956970;
};

// CV_8UC3 in RGB order, the array PIL's convert("RGB") gives.
cv::Mat load_image_rgb(const std::string& path, const ImageLimits& limits = {});
// CV_8UC1 with PIL mode L semantics (nonzero = defect): grey as stored, 1-bit as 0/255, 16-bit grey
// saturated at 255, colour and palette masks converted with PIL's convert("L") luma weights.
cv::Mat load_mask(const std::string& path, const ImageLimits& limits = {});
// As load_image_rgb, from the encoded bytes; `name` is only used in error messages.
cv::Mat decode_image_rgb(const std::string& bytes, const std::string& name, const ImageLimits& limits = {});
// As load_mask, from the encoded bytes.
cv::Mat decode_mask(const std::string& bytes, const std::string& name, const ImageLimits& limits = {});

// Pillow's antialiased BILINEAR resize (Image.resize(..., BILINEAR)) of an 8-bit image with 1 or 3
// channels, bit-exact: triangle filter widened by the downscale factor, 22-bit fixed-point weights,
// horizontal pass then vertical pass, each rounded and clamped to uint8.
cv::Mat pil_resize_bilinear(const cv::Mat& image, int out_width, int out_height);

// Pillow's NEAREST resize, which Image.resize substitutes for any filter on mode "1" and "P" images.
cv::Mat pil_resize_nearest(const cv::Mat& image, int out_width, int out_height);

// torchvision's Resize(int) output size for a width x height image: the shorter side becomes `shorter`,
// the longer one int(shorter * long / short). Returns {width, height}.
std::array<int, 2> resized_size_shorter_side(int width, int height, int shorter);

// torchvision's CenterCrop offsets for a crop x crop window in a width x height image (crop <= both
// sides): int(round((side - crop) / 2.0)) with Python's round half to even. Returns {left, top}.
std::array<int, 2> center_crop_offsets(int width, int height, int crop);

// What part of an image the model sees, and at what scale.
enum class View {
  kCrop,   // the published preprocessing: the shorter side resized to `resize`, then the centre crop x crop
  kFull,   // the whole frame, the shorter side resized to `resize`, aspect kept
  kTiles,  // the whole frame at its own resolution, cut into crop x crop tiles (PatchCore splits and stitches them)
};
// "crop", "full" or "tiles".
const char* view_name(View view);
// Throws std::invalid_argument naming the accepted values.
View parse_view(const std::string& name);

struct ImageTransform {
  // Bounds resize, crop and the sides of a view, and so the size of every tensor derived from them.
  static constexpr int kMaxSide = 4096;

  int resize = 256;  // shorter side (crop and full views)
  int crop = 224;    // center crop (crop view), tile side (tiles view)
  std::array<float, 3> mean{0.485f, 0.456f, 0.406f};
  std::array<float, 3> std{0.229f, 0.224f, 0.225f};
  View view = View::kCrop;
  // Tiles view: the least overlap of neighbouring tiles, in pixels; tiles share their border context this way.
  int tile_overlap = 32;

  // Throws std::invalid_argument unless 0 < crop, resize <= kMaxSide, every std is finite and nonzero, and in the crop
  // view crop <= resize, in the tiles view 0 <= tile_overlap < crop.
  void validate() const;
  // The size of the image the model sees for an original of size `original`: crop x crop; the resized frame (full);
  // the frame itself, enlarged (aspect kept) until its shorter side fills a tile where it is smaller (tiles). Throws
  // std::invalid_argument where a side would exceed kMaxSide.
  cv::Size view_size(cv::Size original) const;
  // The view of a uint8 image with 1 or 3 channels. Where it crops, only the cropped pixels are computed, which
  // gives the same bytes as resizing the whole image and cropping.
  cv::Mat to_view(const cv::Mat& image) const;
  // ToTensor + Normalize of a CV_8UC3 RGB image: float32 [3, rows, cols], contiguous.
  at::Tensor to_tensor(const cv::Mat& rgb) const;
  // File → normalised tensor of its view, the whole reference image pipeline in the crop view. `original`
  // (optional) receives the decoded image's size.
  at::Tensor load(const std::string& path, const ImageLimits& limits = {}, cv::Size* original = nullptr) const;
  // A decoded RGB image (load_image_rgb, decode_image_rgb) → normalised tensor of its view: what load does after
  // decoding, for images that arrive as bytes. `name` is only used in error messages.
  at::Tensor view_tensor(const cv::Mat& rgb, const std::string& name) const;
  // File → uint8 mask of the view: the resampled bytes (0..255) that the reference's ToTensor divides by 255.
  // Like PIL, 1-bit and palette PNG masks are resampled with NEAREST, all others with BILINEAR.
  cv::Mat load_mask(const std::string& path, const ImageLimits& limits = {}) const;
};

}  // namespace patchcore

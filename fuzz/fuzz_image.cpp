// libFuzzer target: arbitrary bytes as an encoded image (PNG, JPEG, BMP, TIFF), decoded both as an RGB
// image and as a mask, then resized and cropped as the model's transform does. Any input must either
// decode or throw ImageError.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "patchcore/io/image.h"

namespace {

// Small enough that every decodable input is quick to resize, so the fuzzer spends its time on headers.
constexpr int64_t kMaxPixels = 1 << 16;

void check(const cv::Mat& m, int channels) {
  if (m.empty() || m.channels() != channels || m.depth() != CV_8U || static_cast<int64_t>(m.rows) * m.cols > kMaxPixels)
    std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  patchcore::ImageLimits limits;
  limits.max_pixels = kMaxPixels;
  patchcore::ImageTransform transform;
  transform.resize = 12;
  transform.crop = 8;
  try {
    const cv::Mat rgb = patchcore::decode_image_rgb(bytes, "fuzz.img", limits);
    check(rgb, 3);
    (void)transform.to_tensor(transform.to_view(rgb));
  } catch (const patchcore::ImageError&) {
  }
  try {
    const cv::Mat mask = patchcore::decode_mask(bytes, "fuzz.img", limits);
    check(mask, 1);
    check(transform.to_view(mask), 1);
  } catch (const patchcore::ImageError&) {
  }
  return 0;
}

#include "patchcore/io/image.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <vector>

#include "patchcore/core/bytes.h"
#include "patchcore/core/file.h"

namespace patchcore {
namespace {

// ---------------------------------------------------------------------------------------------------
// Container headers, read before decoding so that the pixel limit holds before OpenCV allocates.

enum class Format { png, jpeg, bmp, tiff };

struct Header {
  Format format;
  int64_t width = 0;
  int64_t height = 0;
  int png_bit_depth = 0;
  int png_color_type = -1;
  int jpeg_components = 0;
  bool tiff_alpha = false;
};

[[noreturn]] void fail(const std::string& name, const std::string& problem) { throw ImageError(name + ": " + problem); }

Header parse_png(const unsigned char* d, size_t n, const std::string& name) {
  // Signature (8), IHDR length (4), "IHDR" (4), width, height, depth, colour type, ...
  if (n < 33) fail(name, "truncated PNG header");
  if (load_be32(d + 8) != 13 || std::memcmp(d + 12, "IHDR", 4) != 0) fail(name, "corrupt PNG: first chunk is not IHDR");
  Header h{Format::png};
  h.width = load_be32(d + 16);
  h.height = load_be32(d + 20);
  h.png_bit_depth = d[24];
  h.png_color_type = d[25];
  return h;
}

bool is_jpeg_sof(int marker) {
  // SOF0..SOF15, except DHT (C4), JPG (C8) and DAC (CC) which share the range.
  return marker >= 0xC0 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 && marker != 0xCC;
}

// Walks the marker segments up to EOI. libjpeg pads a file that ends early with grey and only warns,
// where PIL refuses it ("image file is truncated"), so a missing EOI is an error here.
Header parse_jpeg(const unsigned char* d, size_t n, const std::string& name) {
  Header h{Format::jpeg};
  bool have_frame = false;
  size_t pos = 2;
  for (;;) {
    while (pos < n && d[pos] != 0xFF) ++pos;  // tolerate stray bytes between segments, as libjpeg does
    while (pos < n && d[pos] == 0xFF) ++pos;  // fill bytes
    if (pos >= n) fail(name, "truncated JPEG (no end-of-image marker)");
    const int marker = d[pos++];
    if (marker == 0xD9) break;
    if (marker == 0x01 || (marker >= 0xD0 && marker <= 0xD8)) continue;  // no length field
    if (pos + 2 > n) fail(name, "truncated JPEG segment");
    const size_t length = load_be16(d + pos);
    if (length < 2 || pos + length > n) fail(name, "truncated JPEG segment");
    if (is_jpeg_sof(marker) && !have_frame) {
      if (length < 8) fail(name, "corrupt JPEG frame header");
      h.height = load_be16(d + pos + 3);
      h.width = load_be16(d + pos + 5);
      h.jpeg_components = d[pos + 7];
      have_frame = true;
    }
    pos += length;
    if (marker == 0xDA) {
      if (!have_frame) fail(name, "corrupt JPEG: scan before frame header");
      // Entropy-coded data: a marker is 0xFF followed by anything but 0x00 (stuffing), 0xFF (fill)
      // or a restart marker.
      for (;;) {
        const void* ff = pos < n ? std::memchr(d + pos, 0xFF, n - pos) : nullptr;
        pos = ff ? static_cast<size_t>(static_cast<const unsigned char*>(ff) - d) : n;
        if (pos + 1 >= n) fail(name, "truncated JPEG (scan data ends without end-of-image marker)");
        const int next = d[pos + 1];
        if (next == 0x00 || (next >= 0xD0 && next <= 0xD7)) {
          pos += 2;
        } else if (next == 0xFF) {
          pos += 1;
        } else {
          break;
        }
      }
    }
  }
  if (!have_frame) fail(name, "corrupt JPEG: no frame header");
  if (h.height == 0) fail(name, "unsupported JPEG: height defined by a DNL marker");
  return h;
}

Header parse_bmp(const unsigned char* d, size_t n, const std::string& name) {
  if (n < 26) fail(name, "truncated BMP header");
  Header h{Format::bmp};
  const uint32_t info_size = load_le32(d + 14);
  if (info_size == 12) {  // OS/2 BITMAPCOREHEADER: 16-bit unsigned dimensions
    h.width = load_le16(d + 18);
    h.height = load_le16(d + 20);
  } else {
    if (info_size < 16 || n < 26) fail(name, "corrupt BMP header");
    h.width = int32_t(load_le32(d + 18));
    h.height = std::llabs(int64_t(int32_t(load_le32(d + 22))));  // negative height = top-down rows
    if (h.width < 0) fail(name, "corrupt BMP header: negative width");
  }
  return h;
}

Header parse_tiff(const unsigned char* d, size_t n, const std::string& name) {
  const bool little = d[0] == 'I';
  auto u16 = [&](size_t at) { return little ? load_le16(d + at) : load_be16(d + at); };
  auto u32 = [&](size_t at) { return little ? load_le32(d + at) : load_be32(d + at); };
  if (n < 8) fail(name, "truncated TIFF header");
  const size_t ifd = u32(4);
  if (ifd < 8 || ifd + 2 > n) fail(name, "truncated TIFF: first directory outside the file");
  const size_t count = u16(ifd);
  if (ifd + 2 + count * 12 > n) fail(name, "truncated TIFF directory");
  Header h{Format::tiff};
  bool seen_width = false, seen_height = false;
  for (size_t i = 0; i < count; ++i) {
    const size_t e = ifd + 2 + i * 12;
    const int tag = u16(e);
    if (tag == 338) {
      // ExtraSamples (SHORTs, inline when at most two): 1 = associated alpha, 2 = unassociated alpha.
      const size_t values = u32(e + 4);
      const size_t at = values <= 2 ? e + 8 : u32(e + 8);
      for (size_t v = 0; v < values && at + 2 * v + 2 <= n; ++v) {
        const int kind = u16(at + 2 * v);
        if (kind == 1 || kind == 2) h.tiff_alpha = true;
      }
      continue;
    }
    if (tag != 256 && tag != 257) continue;
    // libtiff keeps the first of repeated tags and PIL the last, so the two would decode different sizes,
    // and the pixel limit would hold for only one of them.
    bool& seen = tag == 256 ? seen_width : seen_height;
    if (seen)
      fail(name, std::string("corrupt TIFF: more than one ") + (tag == 256 ? "ImageWidth" : "ImageLength") + " tag");
    seen = true;
    const int type = u16(e + 2);
    int64_t value;
    if (type == 3) {
      value = u16(e + 8);
    } else if (type == 4) {
      value = u32(e + 8);
    } else {
      fail(name, "corrupt TIFF: image size tag has type " + std::to_string(type));
    }
    (tag == 256 ? h.width : h.height) = value;
  }
  return h;
}

Header parse_header(const std::string& bytes, const std::string& name) {
  const auto* d = reinterpret_cast<const unsigned char*>(bytes.data());
  const size_t n = bytes.size();
  if (n == 0) fail(name, "empty file");
  Header h;
  if (n >= 8 && std::memcmp(d, "\x89PNG\r\n\x1a\n", 8) == 0) {
    h = parse_png(d, n, name);
  } else if (n >= 3 && d[0] == 0xFF && d[1] == 0xD8 && d[2] == 0xFF) {
    h = parse_jpeg(d, n, name);
  } else if (n >= 2 && d[0] == 'B' && d[1] == 'M') {
    h = parse_bmp(d, n, name);
  } else if (n >= 4 && (std::memcmp(d, "II*\0", 4) == 0 || std::memcmp(d, "MM\0*", 4) == 0)) {
    h = parse_tiff(d, n, name);
  } else {
    fail(name, "not a PNG, JPEG, BMP or TIFF file (unrecognised signature)");
  }
  if (h.width <= 0 || h.height <= 0) {
    fail(name, "invalid image size " + std::to_string(h.width) + "x" + std::to_string(h.height));
  }
  return h;
}

// ---------------------------------------------------------------------------------------------------
// Decoding to PIL's pixel values.

struct PilPixels {
  cv::Mat pixels;        // CV_8UC1 (PIL's grey modes) or CV_8UC3 in RGB order
  bool nearest = false;  // PIL mode "1" or "P": Image.resize uses NEAREST whatever filter is asked
};

PilPixels decode(const std::string& bytes, const std::string& name, const ImageLimits& limits) {
  if (bytes.size() > static_cast<size_t>(INT_MAX)) fail(name, "file larger than 2 GiB");
  const Header h = parse_header(bytes, name);
  // Both sides can reach 2^32 - 1 (TIFF), so compare without forming the product.
  if (h.width > std::max<int64_t>(limits.max_pixels, 0) / h.height) {
    fail(name, "image of " + std::to_string(h.width) + "x" + std::to_string(h.height) +
                   " pixels exceeds the limit of " + std::to_string(limits.max_pixels) +
                   " pixels (possible decompression bomb)");
  }
  if (h.format == Format::jpeg && h.jpeg_components == 4) {
    // OpenCV's CMYK→BGR formula differs from PIL's; refusing is better than silently different pixels.
    fail(name, "CMYK/YCCK JPEG is not supported");
  }
  if (h.format == Format::tiff && h.tiff_alpha) {
    // libtiff's RGBA reader (which OpenCV uses for 8-bit TIFF) premultiplies the colours by alpha, PIL
    // keeps them; the colours under transparent pixels cannot be recovered.
    fail(name, "TIFF with an alpha channel is not supported");
  }
  cv::Mat decoded;
  try {
    const cv::Mat buffer(1, static_cast<int>(bytes.size()), CV_8U, const_cast<char*>(bytes.data()));
    decoded = cv::imdecode(buffer, cv::IMREAD_UNCHANGED);
  } catch (const cv::Exception& e) {
    fail(name, std::string("cannot decode image: ") + e.what());
  }
  if (decoded.empty()) fail(name, "cannot decode image (corrupt or truncated file, or unsupported variant)");
  if (decoded.cols != h.width || decoded.rows != h.height) {
    fail(name, "decoded size " + std::to_string(decoded.cols) + "x" + std::to_string(decoded.rows) +
                   " differs from the header's " + std::to_string(h.width) + "x" + std::to_string(h.height));
  }

  PilPixels out;
  out.nearest = h.format == Format::png && (h.png_color_type == 3 || (h.png_color_type == 0 && h.png_bit_depth == 1));
  const int channels = decoded.channels();
  if (decoded.depth() == CV_16U) {
    if (channels == 1) {
      // 16-bit grey opens as PIL mode I (PNG) or I;16 (TIFF); both convert to 8 bits by saturation.
      decoded.convertTo(out.pixels, CV_8U, 1.0, 0.0);
      return out;
    }
    // 16-bit colour opens as an 8-bit PIL mode keeping each sample's high byte.
    cv::Mat shifted(decoded.size(), CV_MAKETYPE(CV_8U, channels));
    for (int y = 0; y < decoded.rows; ++y) {
      const uint16_t* src = decoded.ptr<uint16_t>(y);
      uint8_t* dst = shifted.ptr<uint8_t>(y);
      for (int i = 0; i < decoded.cols * channels; ++i) dst[i] = static_cast<uint8_t>(src[i] >> 8);
    }
    decoded = shifted;
  } else if (decoded.depth() != CV_8U) {
    fail(name, "unsupported sample format (only 8- and 16-bit integer images are supported)");
  }
  switch (channels) {
    case 1:
      out.pixels = decoded;
      break;
    case 2: {  // grey + alpha: PIL drops the alpha
      out.pixels.create(decoded.size(), CV_8UC1);
      cv::extractChannel(decoded, out.pixels, 0);
      break;
    }
    case 3:
      cv::cvtColor(decoded, out.pixels, cv::COLOR_BGR2RGB);
      break;
    case 4:  // PIL's convert("RGB") drops the alpha without compositing
      cv::cvtColor(decoded, out.pixels, cv::COLOR_BGRA2RGB);
      break;
    default:
      fail(name, "unsupported number of channels: " + std::to_string(channels));
  }
  return out;
}

cv::Mat gray_to_rgb(const cv::Mat& gray) {
  cv::Mat rgb;
  cv::cvtColor(gray, rgb, cv::COLOR_GRAY2RGB);
  return rgb;
}

// PIL's convert("L"): ITU-R 601-2 luma in 16-bit fixed point, rounded.
cv::Mat rgb_to_pil_l(const cv::Mat& rgb) {
  cv::Mat l(rgb.size(), CV_8UC1);
  for (int y = 0; y < rgb.rows; ++y) {
    const uint8_t* src = rgb.ptr<uint8_t>(y);
    uint8_t* dst = l.ptr<uint8_t>(y);
    for (int x = 0; x < rgb.cols; ++x, src += 3) {
      dst[x] = static_cast<uint8_t>((src[0] * 19595 + src[1] * 38470 + src[2] * 7471 + 0x8000) >> 16);
    }
  }
  return l;
}

PilPixels decode_mask_pixels(const std::string& bytes, const std::string& name, const ImageLimits& limits) {
  PilPixels p = decode(bytes, name, limits);
  if (p.pixels.channels() == 3) p.pixels = rgb_to_pil_l(p.pixels);
  return p;
}

std::string read_image_file(const std::string& path) {
  try {
    return read_file(path);
  } catch (const std::runtime_error& e) {
    throw ImageError(e.what());
  }
}

// ---------------------------------------------------------------------------------------------------
// Pillow's separable resampling.

constexpr int kPrecisionBits = 32 - 8 - 2;  // Pillow: leaves room for the sum of 8-bit values times weights

// Fixed-point weights of output samples [first, first + count) of an in_size → out_size resize.
struct AxisCoefficients {
  int taps = 0;                  // weights stored per output sample (the widest support)
  std::vector<int> start;        // first input sample used
  std::vector<int> length;       // number of input samples used
  std::vector<int32_t> weights;  // count * taps
};

AxisCoefficients bilinear_coefficients(int in_size, int out_size, int first, int count) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double filter_scale = std::max(scale, 1.0);  // widen the triangle when shrinking: antialiasing
  const double support = 1.0 * filter_scale;         // the bilinear filter's support is 1
  AxisCoefficients c;
  c.taps = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.start.resize(count);
  c.length.resize(count);
  c.weights.assign(static_cast<size_t>(count) * c.taps, 0);
  std::vector<double> w(c.taps);
  const double inv_filter_scale = 1.0 / filter_scale;
  for (int i = 0; i < count; ++i) {
    const int xx = first + i;
    const double center = (xx + 0.5) * scale;
    // Pillow rounds the window ends with a truncating cast; the order of operations below is its own,
    // so that every double matches.
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double total = 0.0;
    for (int x = 0; x < xmax; ++x) {
      double t = (x + xmin - center + 0.5) * inv_filter_scale;
      if (t < 0.0) t = -t;
      w[x] = t < 1.0 ? 1.0 - t : 0.0;
      total += w[x];
    }
    int32_t* k = &c.weights[static_cast<size_t>(i) * c.taps];
    for (int x = 0; x < xmax; ++x) {
      const double v = total != 0.0 ? w[x] / total : w[x];
      const double scaled = v * (1 << kPrecisionBits);
      k[x] = static_cast<int32_t>(v < 0 ? -0.5 + scaled : 0.5 + scaled);
    }
    c.start[i] = xmin;
    c.length[i] = xmax;
  }
  return c;
}

inline uint8_t clip8(int32_t accumulator) {
  const int32_t v = accumulator >> kPrecisionBits;
  return static_cast<uint8_t>(v < 0 ? 0 : v > 255 ? 255 : v);
}

void check_resize_input(const cv::Mat& image, int out_width, int out_height) {
  if (image.empty() || image.depth() != CV_8U || (image.channels() != 1 && image.channels() != 3)) {
    throw std::invalid_argument("pil resize: expected a non-empty 8-bit image with 1 or 3 channels");
  }
  if (out_width <= 0 || out_height <= 0) {
    throw std::invalid_argument("pil resize: output size " + std::to_string(out_width) + "x" +
                                std::to_string(out_height) + " is not positive");
  }
}

// Output pixels [x0, x0 + w) x [y0, y0 + h) of the BILINEAR resize of `src` to out_width x out_height.
// Every output pixel depends only on its own weights, so this equals cropping the full resize.
cv::Mat bilinear_region(const cv::Mat& src, int out_width, int out_height, int x0, int y0, int w, int h) {
  const int cn = src.channels();
  const bool horizontal = out_width != src.cols;
  const bool vertical = out_height != src.rows;
  // Pillow skips a pass when that axis keeps its size; the pass would be the identity anyway.

  // Rows of the source that the vertical pass will read.
  AxisCoefficients vc;
  int row_first = y0;
  int row_end = y0 + h;
  if (vertical) {
    vc = bilinear_coefficients(src.rows, out_height, y0, h);
    row_first = vc.start[0];
    row_end = 0;
    for (int i = 0; i < h; ++i) {
      row_first = std::min(row_first, vc.start[i]);
      row_end = std::max(row_end, vc.start[i] + vc.length[i]);
    }
  }

  cv::Mat temp;  // (row_end - row_first) x w after the horizontal pass
  if (horizontal) {
    const AxisCoefficients hc = bilinear_coefficients(src.cols, out_width, x0, w);
    temp.create(row_end - row_first, w, src.type());
    for (int y = row_first; y < row_end; ++y) {
      const uint8_t* in = src.ptr<uint8_t>(y);
      uint8_t* out = temp.ptr<uint8_t>(y - row_first);
      for (int i = 0; i < w; ++i) {
        const int32_t* k = &hc.weights[static_cast<size_t>(i) * hc.taps];
        const uint8_t* p = in + static_cast<size_t>(hc.start[i]) * cn;
        const int n = hc.length[i];
        if (cn == 3) {
          int32_t s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
          for (int t = 0; t < n; ++t, p += 3) {
            s0 += p[0] * k[t];
            s1 += p[1] * k[t];
            s2 += p[2] * k[t];
          }
          out[3 * i] = clip8(s0);
          out[3 * i + 1] = clip8(s1);
          out[3 * i + 2] = clip8(s2);
        } else {
          int32_t s = 1 << (kPrecisionBits - 1);
          for (int t = 0; t < n; ++t) s += p[t] * k[t];
          out[i] = clip8(s);
        }
      }
    }
  } else {
    temp = src(cv::Range(row_first, row_end), cv::Range(x0, x0 + w));
  }

  if (!vertical) return temp.clone();
  cv::Mat result(h, w, src.type());
  const int row_values = w * cn;
  std::vector<int32_t> acc(row_values);
  for (int i = 0; i < h; ++i) {
    std::fill(acc.begin(), acc.end(), 1 << (kPrecisionBits - 1));
    const int32_t* k = &vc.weights[static_cast<size_t>(i) * vc.taps];
    for (int t = 0; t < vc.length[i]; ++t) {
      const uint8_t* in = temp.ptr<uint8_t>(vc.start[i] + t - row_first);
      const int32_t weight = k[t];
      for (int j = 0; j < row_values; ++j) acc[j] += in[j] * weight;
    }
    uint8_t* out = result.ptr<uint8_t>(i);
    for (int j = 0; j < row_values; ++j) out[j] = clip8(acc[j]);
  }
  return result;
}

// Source index of each output sample [first, first + count) for Pillow's NEAREST resize, which walks
// the output accumulating the scale in double precision (so the drift is part of the result).
std::vector<int> nearest_indices(int in_size, int out_size, int first, int count) {
  const double scale = static_cast<double>(in_size) / out_size;
  double position = scale * 0.5;
  for (int i = 0; i < first; ++i) position += scale;
  std::vector<int> index(count);
  for (int i = 0; i < count; ++i) {
    const int v = position < 0.0 ? -1 : static_cast<int>(position);
    index[i] = std::clamp(v, 0, in_size - 1);
    position += scale;
  }
  return index;
}

cv::Mat nearest_region(const cv::Mat& src, int out_width, int out_height, int x0, int y0, int w, int h) {
  if (out_width == src.cols && out_height == src.rows) {
    return src(cv::Range(y0, y0 + h), cv::Range(x0, x0 + w)).clone();
  }
  const int cn = src.channels();
  const std::vector<int> xs = nearest_indices(src.cols, out_width, x0, w);
  const std::vector<int> ys = nearest_indices(src.rows, out_height, y0, h);
  cv::Mat result(h, w, src.type());
  for (int i = 0; i < h; ++i) {
    const uint8_t* in = src.ptr<uint8_t>(ys[i]);
    uint8_t* out = result.ptr<uint8_t>(i);
    for (int j = 0; j < w; ++j) {
      for (int c = 0; c < cn; ++c) out[j * cn + c] = in[xs[j] * cn + c];
    }
  }
  return result;
}

cv::Mat to_view_impl(const ImageTransform& t, const cv::Mat& image, bool nearest) {
  t.validate();
  if (image.empty() || image.depth() != CV_8U || (image.channels() != 1 && image.channels() != 3)) {
    throw std::invalid_argument("to_view: expected a non-empty 8-bit image with 1 or 3 channels");
  }
  const cv::Size size = t.view_size(image.size());
  // The crop view crops the resized frame; the others keep all of it.
  std::array<int, 2> resized{size.width, size.height}, offset{0, 0};
  if (t.view == View::kCrop) {
    resized = resized_size_shorter_side(image.cols, image.rows, t.resize);
    offset = center_crop_offsets(resized[0], resized[1], t.crop);
  }
  return nearest ? nearest_region(image, resized[0], resized[1], offset[0], offset[1], size.width, size.height)
                 : bilinear_region(image, resized[0], resized[1], offset[0], offset[1], size.width, size.height);
}

}  // namespace

cv::Mat decode_image_rgb(const std::string& bytes, const std::string& name, const ImageLimits& limits) {
  PilPixels p = decode(bytes, name, limits);
  return p.pixels.channels() == 1 ? gray_to_rgb(p.pixels) : p.pixels;
}

cv::Mat decode_mask(const std::string& bytes, const std::string& name, const ImageLimits& limits) {
  return decode_mask_pixels(bytes, name, limits).pixels;
}

cv::Mat load_image_rgb(const std::string& path, const ImageLimits& limits) {
  return decode_image_rgb(read_image_file(path), path, limits);
}

cv::Mat load_mask(const std::string& path, const ImageLimits& limits) {
  return decode_mask(read_image_file(path), path, limits);
}

cv::Mat pil_resize_bilinear(const cv::Mat& image, int out_width, int out_height) {
  check_resize_input(image, out_width, out_height);
  return bilinear_region(image, out_width, out_height, 0, 0, out_width, out_height);
}

cv::Mat pil_resize_nearest(const cv::Mat& image, int out_width, int out_height) {
  check_resize_input(image, out_width, out_height);
  return nearest_region(image, out_width, out_height, 0, 0, out_width, out_height);
}

std::array<int, 2> resized_size_shorter_side(int width, int height, int shorter) {
  if (width <= 0 || height <= 0 || shorter <= 0) {
    throw std::invalid_argument("resize: sizes must be positive (image " + std::to_string(width) + "x" +
                                std::to_string(height) + ", shorter side " + std::to_string(shorter) + ")");
  }
  const int short_side = std::min(width, height);
  const int long_side = std::max(width, height);
  // torchvision: int(size * long / short), a float64 division truncated toward zero.
  const double new_long = static_cast<double>(int64_t(shorter) * long_side) / short_side;
  if (new_long > INT_MAX) {
    throw std::invalid_argument("resize: a " + std::to_string(width) + "x" + std::to_string(height) +
                                " image resized to shorter side " + std::to_string(shorter) +
                                " would have a longer side beyond the int range");
  }
  const int long_out = static_cast<int>(new_long);
  return width <= height ? std::array<int, 2>{shorter, long_out} : std::array<int, 2>{long_out, shorter};
}

std::array<int, 2> center_crop_offsets(int width, int height, int crop) {
  if (crop <= 0 || crop > width || crop > height) {
    throw std::invalid_argument("center crop: a " + std::to_string(crop) + "x" + std::to_string(crop) +
                                " crop does not fit a " + std::to_string(width) + "x" + std::to_string(height) +
                                " image");
  }
  // std::nearbyint in the default rounding mode rounds halves to even, as Python's round() does.
  return {static_cast<int>(std::nearbyint((width - crop) / 2.0)),
          static_cast<int>(std::nearbyint((height - crop) / 2.0))};
}

void ImageTransform::validate() const {
  if (resize <= 0 || crop <= 0) {
    throw std::invalid_argument("ImageTransform: resize (" + std::to_string(resize) + ") and crop (" +
                                std::to_string(crop) + ") must be positive");
  }
  if (view == View::kCrop && crop > resize) {
    throw std::invalid_argument("ImageTransform: crop (" + std::to_string(crop) + ") must not exceed resize (" +
                                std::to_string(resize) + ")");
  }
  if (resize > kMaxSide) {
    throw std::invalid_argument("ImageTransform: resize (" + std::to_string(resize) + ") must not exceed " +
                                std::to_string(kMaxSide));
  }
  if (view == View::kTiles && (tile_overlap < 0 || tile_overlap >= crop)) {
    throw std::invalid_argument("ImageTransform: the tile overlap (" + std::to_string(tile_overlap) +
                                ") must be at least 0 and less than the tile side (" + std::to_string(crop) + ")");
  }
  for (int c = 0; c < 3; ++c) {
    if (!std::isfinite(std[c]) || std[c] == 0.0f || !std::isfinite(mean[c])) {
      throw std::invalid_argument("ImageTransform: mean and std must be finite and std nonzero (channel " +
                                  std::to_string(c) + ")");
    }
  }
}

const char* view_name(View view) {
  switch (view) {
    case View::kCrop:
      return "crop";
    case View::kFull:
      return "full";
    case View::kTiles:
      return "tiles";
  }
  throw std::invalid_argument("view_name: not a View");
}

View parse_view(const std::string& name) {
  for (View view : {View::kCrop, View::kFull, View::kTiles}) {
    if (name == view_name(view)) return view;
  }
  throw std::invalid_argument("unknown view '" + name + "' (use crop, full or tiles)");
}

cv::Size ImageTransform::view_size(cv::Size original) const {
  validate();
  if (view == View::kCrop) return {crop, crop};
  std::array<int, 2> size{original.width, original.height};
  if (view == View::kFull || std::min(original.width, original.height) < crop)
    size = resized_size_shorter_side(original.width, original.height, view == View::kFull ? resize : crop);
  if (size[0] > kMaxSide || size[1] > kMaxSide) {
    throw std::invalid_argument("the " + std::string(view_name(view)) + " view of a " + std::to_string(original.width) +
                                "x" + std::to_string(original.height) + " image is " + std::to_string(size[0]) + "x" +
                                std::to_string(size[1]) + ", beyond the limit of " + std::to_string(kMaxSide) +
                                " pixels per side");
  }
  return {size[0], size[1]};
}

cv::Mat ImageTransform::to_view(const cv::Mat& image) const { return to_view_impl(*this, image, false); }

at::Tensor ImageTransform::to_tensor(const cv::Mat& rgb) const {
  validate();
  if (rgb.type() != CV_8UC3 || rgb.empty()) {
    throw std::invalid_argument("ImageTransform::to_tensor: expected a non-empty CV_8UC3 image");
  }
  const int rows = rgb.rows, cols = rgb.cols;
  // torchvision's arithmetic in float32: (v / 255 - mean) / std, one rounding per operation; a table
  // per channel holds the 256 possible results.
  float table[3][256];
  for (int c = 0; c < 3; ++c) {
    for (int v = 0; v < 256; ++v) table[c][v] = (static_cast<float>(v) / 255.0f - mean[c]) / std[c];
  }
  at::Tensor out = at::empty({3, rows, cols}, at::kFloat);
  float* planes = out.data_ptr<float>();
  const size_t plane = static_cast<size_t>(rows) * cols;
  for (int y = 0; y < rows; ++y) {
    const uint8_t* in = rgb.ptr<uint8_t>(y);
    const size_t row = static_cast<size_t>(y) * cols;
    for (int x = 0; x < cols; ++x, in += 3) {
      planes[row + x] = table[0][in[0]];
      planes[plane + row + x] = table[1][in[1]];
      planes[2 * plane + row + x] = table[2][in[2]];
    }
  }
  return out;
}

at::Tensor ImageTransform::load(const std::string& path, const ImageLimits& limits, cv::Size* original) const {
  validate();
  const cv::Mat rgb = load_image_rgb(path, limits);
  if (original) *original = rgb.size();
  return view_tensor(rgb, path);
}

at::Tensor ImageTransform::view_tensor(const cv::Mat& rgb, const std::string& name) const {
  validate();
  cv::Mat seen;
  try {
    seen = to_view(rgb);
  } catch (const std::invalid_argument& e) {
    fail(name, e.what());
  }
  return to_tensor(seen);
}

cv::Mat ImageTransform::load_mask(const std::string& path, const ImageLimits& limits) const {
  validate();
  const PilPixels mask = decode_mask_pixels(read_image_file(path), path, limits);
  try {
    return to_view_impl(*this, mask.pixels, mask.nearest);
  } catch (const std::invalid_argument& e) {
    fail(path, e.what());
  }
}

}  // namespace patchcore

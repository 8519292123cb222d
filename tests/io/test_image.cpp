#include <gtest/gtest.h>
#include <torch/torch.h>

#include <array>
#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <utility>
#include <vector>

#include "patchcore/io/image.h"
#include "patchcore/io/npy.h"
#include "support.h"

using namespace patchcore;
using json = nlohmann::json;

namespace {

json read_json(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error(path + ": cannot open");
  return json::parse(in);
}

const json& manifest() {
  static const json m = read_json(test::fixture("images/manifest.json"));
  return m;
}

std::string image_fixture(const std::string& name) { return test::fixture("images/" + name); }

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), {});
}

void write_bytes(const std::string& path, const std::string& bytes) { std::ofstream(path, std::ios::binary) << bytes; }

// A uint8 .npy of shape [H, W] or [H, W, C] as a cv::Mat.
cv::Mat npy_mat(const std::string& name) {
  NpyArray a = read_npy(image_fixture(name));
  EXPECT_EQ(a.dtype, "u1") << name;
  const int channels = a.shape.size() == 3 ? static_cast<int>(a.shape[2]) : 1;
  cv::Mat m(static_cast<int>(a.shape[0]), static_cast<int>(a.shape[1]), CV_MAKETYPE(CV_8U, channels));
  std::memcpy(m.data, a.data.data(), a.data.size());
  return m;
}

// Exact equality with a useful message on the first difference.
::testing::AssertionResult same_bytes(const cv::Mat& actual, const cv::Mat& expected) {
  if (actual.size() != expected.size() || actual.type() != expected.type()) {
    return ::testing::AssertionFailure() << "shape/type " << actual.cols << "x" << actual.rows << "x"
                                         << actual.channels() << " depth " << actual.depth() << " vs " << expected.cols
                                         << "x" << expected.rows << "x" << expected.channels() << " depth "
                                         << expected.depth();
  }
  const int values = actual.cols * actual.channels();
  int differing = 0;
  std::string first;
  for (int y = 0; y < actual.rows; ++y) {
    const uint8_t* a = actual.ptr<uint8_t>(y);
    const uint8_t* e = expected.ptr<uint8_t>(y);
    for (int i = 0; i < values; ++i) {
      if (a[i] != e[i] && differing++ == 0) {
        first = "y=" + std::to_string(y) + " value " + std::to_string(i) + ": " + std::to_string(a[i]) + " vs " +
                std::to_string(e[i]);
      }
    }
  }
  if (differing == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << differing << " values differ, first at " << first;
}

// SHA-256 (FIPS 180-4), to compare large outputs with the digests the fixture script stored.
std::string sha256_hex(const uint8_t* data, size_t size) {
  static const uint32_t k[64] = {
      0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
      0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
      0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
      0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
      0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
      0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
      0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
      0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
  uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  std::vector<uint8_t> msg(data, data + size);
  msg.push_back(0x80);
  while (msg.size() % 64 != 56) msg.push_back(0);
  const uint64_t bits = static_cast<uint64_t>(size) * 8;
  for (int i = 7; i >= 0; --i) msg.push_back(static_cast<uint8_t>(bits >> (8 * i)));
  auto rotr = [](uint32_t x, int n) { return (x >> n) | (x << (32 - n)); };
  for (size_t chunk = 0; chunk < msg.size(); chunk += 64) {
    uint32_t w[64];
    for (int i = 0; i < 16; ++i) {
      const uint8_t* p = &msg[chunk + 4 * i];
      w[i] = (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | p[3];
    }
    for (int i = 16; i < 64; ++i) {
      const uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      const uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
    for (int i = 0; i < 64; ++i) {
      const uint32_t t1 = hh + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i];
      const uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      hh = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e, h[5] += f, h[6] += g, h[7] += hh;
  }
  char hex[65];
  for (int i = 0; i < 8; ++i) std::snprintf(hex + 8 * i, 9, "%08x", h[i]);
  return std::string(hex, 64);
}

// First 16 hex digits of the SHA-256 of the C-order bytes, as make_images.py's digest().
std::string digest(const cv::Mat& m) {
  const cv::Mat c = m.isContinuous() ? m : m.clone();
  return sha256_hex(c.data, c.total() * c.elemSize()).substr(0, 16);
}

int64_t byte_sum(const cv::Mat& m) {
  int64_t s = 0;
  for (int y = 0; y < m.rows; ++y) {
    const uint8_t* p = m.ptr<uint8_t>(y);
    for (int i = 0; i < m.cols * m.channels(); ++i) s += p[i];
  }
  return s;
}

torch::Tensor npy_tensor(const std::string& name) {
  NpyArray a = read_npy(image_fixture(name));
  EXPECT_EQ(a.dtype, "f4");
  return torch::from_blob(a.data.data(), a.shape, torch::kFloat32).clone();
}

// Runs `f`, which must throw ImageError whose message names `name` and contains `problem`.
template <typename F>
void expect_image_error(F f, const std::string& name, const std::string& problem) {
  try {
    f();
    ADD_FAILURE() << "expected an ImageError for " << name;
  } catch (const ImageError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find(name), std::string::npos) << what;
    EXPECT_NE(what.find(problem), std::string::npos) << "'" << problem << "' not in: " << what;
  }
}

// A PNG with a valid signature and IHDR chunk (CRC included) claiming width x height, and no pixels.
std::string png_header_only(uint32_t width, uint32_t height) {
  std::string ihdr = "IHDR";
  for (uint32_t v : {width, height}) {
    for (int i = 3; i >= 0; --i) ihdr.push_back(static_cast<char>(v >> (8 * i)));
  }
  ihdr += std::string("\x08\x02\x00\x00\x00", 5);
  uint32_t crc = 0xFFFFFFFFu;
  for (unsigned char ch : ihdr) {
    crc ^= ch;
    for (int b = 0; b < 8; ++b) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
  }
  crc ^= 0xFFFFFFFFu;
  std::string out("\x89PNG\r\n\x1a\n", 8);
  out += std::string("\x00\x00\x00\x0d", 4) + ihdr;
  for (int i = 3; i >= 0; --i) out.push_back(static_cast<char>(crc >> (8 * i)));
  return out;
}

// A little-endian TIFF holding only its first directory, with the given (tag, SHORT value) entries.
std::string tiff_directory_only(const std::vector<std::pair<uint16_t, uint16_t>>& entries) {
  std::string out("II*\0\x08\0\0\0", 8);
  auto put16 = [&](uint32_t v) { out += {static_cast<char>(v), static_cast<char>(v >> 8)}; };
  put16(static_cast<uint32_t>(entries.size()));
  for (const auto& [tag, value] : entries) {
    put16(tag);
    put16(3);            // SHORT
    put16(1), put16(0);  // count
    put16(value), put16(0);
  }
  put16(0), put16(0);  // no next directory
  return out;
}

}  // namespace

// ----------------------------------------------------------------------------------------------------
// Decoding: every mode and container against PIL's convert("RGB") / convert("L").

TEST(ImageDecode, MatchesPilConvertForEveryModeAndContainer) {
  int checked = 0;
  for (const json& c : manifest()["decode"]) {
    const std::string file = c["file"];
    if (file == "cmyk.jpg" || file == "rgba.tif" || file == "la.tif") continue;  // refused, see below
    SCOPED_TRACE(file + " (PIL mode " + c["pil_mode"].get<std::string>() + ")");
    const cv::Mat rgb = load_image_rgb(image_fixture(file));
    EXPECT_TRUE(same_bytes(rgb, npy_mat(c["expected_rgb"])));
    EXPECT_TRUE(same_bytes(load_mask(image_fixture(file)), npy_mat(c["expected_l"])));
    EXPECT_TRUE(same_bytes(decode_image_rgb(read_bytes(image_fixture(file)), file), rgb));
    ++checked;
  }
  EXPECT_GE(checked, 25);
}

// Variants where OpenCV's decoder cannot give PIL's pixels are refused rather than silently different.
TEST(ImageDecode, CmykJpegAndTiffWithAlphaAreRefused) {
  expect_image_error([] { load_image_rgb(image_fixture("cmyk.jpg")); }, "cmyk.jpg", "CMYK");
  expect_image_error([] { load_image_rgb(image_fixture("rgba.tif")); }, "rgba.tif", "alpha");
  expect_image_error([] { load_mask(image_fixture("la.tif")); }, "la.tif", "alpha");
}

// ----------------------------------------------------------------------------------------------------
// Resampling.

TEST(PilResize, BilinearMatchesPillowBitForBit) {
  for (const json& c : manifest()["resize"]) {
    const std::string expected = c["expected"];
    SCOPED_TRACE(expected);
    const cv::Mat src = npy_mat(c["source"]);
    EXPECT_TRUE(same_bytes(pil_resize_bilinear(src, c["width"], c["height"]), npy_mat(expected)));
  }
}

TEST(PilResize, WorksOnNonContinuousInput) {
  const cv::Mat src = npy_mat("resize_src_rgb.npy");
  cv::Mat padded(src.rows + 4, src.cols + 6, src.type(), cv::Scalar::all(7));
  src.copyTo(padded(cv::Rect(3, 2, src.cols, src.rows)));
  const cv::Mat view = padded(cv::Rect(3, 2, src.cols, src.rows));
  ASSERT_FALSE(view.isContinuous());
  EXPECT_TRUE(same_bytes(pil_resize_bilinear(view, 100, 70), npy_mat("resize_rgb_100x70.npy")));
}

TEST(PilResize, RejectsBadArguments) {
  const cv::Mat src = npy_mat("resize_src_rgb.npy");
  EXPECT_THROW(pil_resize_bilinear(src, 0, 5), std::invalid_argument);
  EXPECT_THROW(pil_resize_bilinear(src, 5, -1), std::invalid_argument);
  EXPECT_THROW(pil_resize_bilinear(cv::Mat(), 5, 5), std::invalid_argument);
  EXPECT_THROW(pil_resize_bilinear(cv::Mat(4, 4, CV_32FC3), 5, 5), std::invalid_argument);
  EXPECT_THROW(pil_resize_bilinear(cv::Mat(4, 4, CV_8UC4), 5, 5), std::invalid_argument);
}

TEST(PilResize, NearestOfSameSizeIsACopyAndUpscaleRepeatsPixels) {
  const cv::Mat src = npy_mat("resize_src_l.npy");
  EXPECT_TRUE(same_bytes(pil_resize_nearest(src, src.cols, src.rows), src));
  const cv::Mat doubled = pil_resize_nearest(src, src.cols * 2, src.rows * 2);
  for (int y = 0; y < doubled.rows; ++y) {
    for (int x = 0; x < doubled.cols; ++x) ASSERT_EQ(doubled.at<uint8_t>(y, x), src.at<uint8_t>(y / 2, x / 2));
  }
}

// ----------------------------------------------------------------------------------------------------
// The torchvision transform.

TEST(ImageTransform, OutputSizeAndCropOffsetsMatchTorchvision) {
  for (const json& c : manifest()["geometry"]) {
    SCOPED_TRACE(c.dump());
    const auto size = resized_size_shorter_side(c["width"], c["height"], c["resize"]);
    EXPECT_EQ(size[0], c["new_width"].get<int>());
    EXPECT_EQ(size[1], c["new_height"].get<int>());
    const auto offsets = center_crop_offsets(size[0], size[1], c["crop"]);
    EXPECT_EQ(offsets[0], c["crop_left"].get<int>());
    EXPECT_EQ(offsets[1], c["crop_top"].get<int>());
  }
  EXPECT_THROW(center_crop_offsets(10, 20, 11), std::invalid_argument);
  EXPECT_THROW(resized_size_shorter_side(0, 20, 11), std::invalid_argument);
  EXPECT_THROW(resized_size_shorter_side(1, 100000000, 256), std::invalid_argument);  // beyond int
}

TEST(ImageTransform, CropAndTensorMatchTorchvision) {
  for (const json& c : manifest()["transform"]) {
    const std::string file = c["file"];
    SCOPED_TRACE(file + " resize " + std::to_string(c["resize"].get<int>()) + " crop " +
                 std::to_string(c["crop"].get<int>()));
    ImageTransform t;
    t.resize = c["resize"];
    t.crop = c["crop"];
    const cv::Mat cropped = t.to_view(load_image_rgb(image_fixture(file)));
    EXPECT_EQ(digest(cropped), c["crop_sha"].get<std::string>());
    EXPECT_EQ(byte_sum(cropped), c["crop_sum"].get<int64_t>());
    if (c.contains("crop_expected")) EXPECT_TRUE(same_bytes(cropped, npy_mat(c["crop_expected"])));

    const torch::Tensor tensor = t.load(image_fixture(file));
    ASSERT_EQ(tensor.sizes(), (std::vector<int64_t>{3, t.crop, t.crop}));
    EXPECT_EQ(tensor.scalar_type(), torch::kFloat32);
    EXPECT_TRUE(tensor.is_contiguous());
    EXPECT_NEAR(tensor.to(torch::kFloat64).sum().item<double>(), c["tensor_sum"].get<double>(), 1e-6 * t.crop * t.crop);
    EXPECT_NEAR(tensor.to(torch::kFloat64).abs().sum().item<double>(), c["tensor_abs_sum"].get<double>(),
                1e-6 * t.crop * t.crop);
    if (c.contains("tensor_expected")) {
      const torch::Tensor expected = npy_tensor(c["tensor_expected"]);
      EXPECT_LE((tensor - expected).abs().max().item<float>(), 1e-6f);
    }
  }
}

TEST(ImageTransform, CropEqualsCroppingTheFullResize) {
  ImageTransform t;
  // 300x400 → 256x341 (downscale), 30x45 → 256x384 (upscale), 3x150 → 256x12800 (extreme aspect).
  for (const std::string name : {"tire_like_300x400.png", "small_l_30x45.png", "thin_rgb_3x150.png"}) {
    SCOPED_TRACE(name);
    const cv::Mat image = load_image_rgb(image_fixture(name));
    const auto [w, h] = resized_size_shorter_side(image.cols, image.rows, t.resize);
    const cv::Mat full = pil_resize_bilinear(image, w, h);
    const auto [left, top] = center_crop_offsets(w, h, t.crop);  // checked against torchvision above
    const cv::Rect centre(left, top, t.crop, t.crop);
    EXPECT_TRUE(same_bytes(t.to_view(image), full(centre)));
  }
}

TEST(ImageTransform, FullAndTilesViewsKeepTheWholeFrame) {
  ImageTransform full;
  full.view = View::kFull;
  ImageTransform tiles;
  tiles.view = View::kTiles;
  for (const std::string name : {"tire_like_300x400.png", "small_l_30x45.png"}) {
    SCOPED_TRACE(name);
    const cv::Mat image = load_image_rgb(image_fixture(name));
    // The full view is the resize before the published crop, all of it.
    const auto [w, h] = resized_size_shorter_side(image.cols, image.rows, full.resize);
    EXPECT_EQ(full.view_size(image.size()), cv::Size(w, h));
    EXPECT_TRUE(same_bytes(full.to_view(image), pil_resize_bilinear(image, w, h)));
    EXPECT_EQ(full.load(image_fixture(name)).sizes(), (std::vector<int64_t>{3, h, w}));
    // The tiles view keeps a frame's own pixels, and enlarges only a frame smaller than a tile.
    const cv::Size size = tiles.view_size(image.size());
    if (std::min(image.cols, image.rows) >= tiles.crop) {
      EXPECT_EQ(size, image.size());
      EXPECT_TRUE(same_bytes(tiles.to_view(image), image));
    } else {
      const auto [tw, th] = resized_size_shorter_side(image.cols, image.rows, tiles.crop);
      EXPECT_EQ(size, cv::Size(tw, th));
      EXPECT_TRUE(same_bytes(tiles.to_view(image), pil_resize_bilinear(image, tw, th)));
    }
  }
  // A view beyond kMaxSide per side is refused by name, before any pixel is resampled.
  EXPECT_THROW(full.view_size({20, 400}), std::invalid_argument);
  EXPECT_THROW(tiles.view_size({ImageTransform::kMaxSide + 1, 300}), std::invalid_argument);
  EXPECT_EQ(parse_view("tiles"), View::kTiles);
  EXPECT_STREQ(view_name(parse_view("full")), "full");
  EXPECT_THROW(parse_view("whole"), std::invalid_argument);
  tiles.tile_overlap = tiles.crop;
  EXPECT_THROW(tiles.validate(), std::invalid_argument);
}

TEST(ImageTransform, MaskMatchesTorchvisionIncludingNearestForOneBitMasks) {
  for (const json& c : manifest()["mask"]) {
    const std::string expected = c["expected"];
    SCOPED_TRACE(expected);
    ImageTransform t;
    t.resize = c["resize"];
    t.crop = c["crop"];
    EXPECT_TRUE(same_bytes(t.load_mask(image_fixture(c["file"])), npy_mat(expected)));
  }
}

TEST(ImageTransform, InvalidParametersAreRejected) {
  const cv::Mat image = npy_mat("resize_src_rgb.npy");
  auto with = [](int resize, int crop, float std0) {
    ImageTransform t;
    t.resize = resize;
    t.crop = crop;
    t.std[0] = std0;
    return t;
  };
  EXPECT_THROW(with(224, 256, 0.229f).to_view(image), std::invalid_argument);
  EXPECT_THROW(with(0, 0, 0.229f).to_view(image), std::invalid_argument);
  EXPECT_THROW(with(256, -1, 0.229f).validate(), std::invalid_argument);
  EXPECT_THROW(with(256, 224, 0.0f).validate(), std::invalid_argument);
  EXPECT_THROW(with(256, 224, std::nanf("")).validate(), std::invalid_argument);
  EXPECT_NO_THROW(with(256, 256, 1.0f).validate());
  ImageTransform t;
  EXPECT_EQ(t.to_tensor(image).sizes(), (std::vector<int64_t>{3, image.rows, image.cols}));  // views of any size
  EXPECT_THROW(t.to_tensor(cv::Mat(224, 224, CV_8UC1)), std::invalid_argument);
  EXPECT_THROW(t.to_tensor(cv::Mat(0, 0, CV_8UC3)), std::invalid_argument);
}

// ----------------------------------------------------------------------------------------------------
// Bad input: an ImageError naming the file, never a crash.

TEST(ImageErrors, MissingFileAndDirectory) {
  const std::string dir = test::temp_dir();
  expect_image_error([&] { load_image_rgb(dir + "/absent.png"); }, "absent.png", "no such file");
  expect_image_error([&] { load_mask(dir); }, dir, "directory");
}

TEST(ImageErrors, EmptyFile) {
  const std::string path = test::temp_dir() + "/empty.png";
  write_bytes(path, "");
  expect_image_error([&] { load_image_rgb(path); }, "empty.png", "empty file");
}

TEST(ImageErrors, RandomBytesAndUnknownSignature) {
  std::mt19937 rng(7);
  std::string noise(4096, '\0');
  for (char& ch : noise) ch = static_cast<char>(rng());
  noise[0] = 'x';
  const std::string path = test::temp_dir() + "/noise.png";
  write_bytes(path, noise);
  expect_image_error([&] { load_image_rgb(path); }, "noise.png", "unrecognised signature");
}

TEST(ImageErrors, TruncatedFilesOfEveryContainer) {
  const std::string dir = test::temp_dir();
  for (const std::string name : {"rgb.png", "rgb.jpg", "l.jpg", "progressive.jpg", "rgb.bmp", "rgb.tif"}) {
    const std::string bytes = read_bytes(image_fixture(name));
    for (const size_t keep : {bytes.size() / 2, bytes.size() * 9 / 10, size_t(20)}) {
      const std::string path = dir + "/cut_" + std::to_string(keep) + "_" + name;
      write_bytes(path, bytes.substr(0, keep));
      SCOPED_TRACE(path);
      expect_image_error([&] { load_image_rgb(path); }, path, "");
    }
  }
}

TEST(ImageErrors, JpegWithoutEndMarkerIsTruncatedAsForPil) {
  const std::string bytes = read_bytes(image_fixture("rgb.jpg"));
  ASSERT_EQ(bytes.substr(bytes.size() - 2), "\xFF\xD9");
  expect_image_error([&] { decode_image_rgb(bytes.substr(0, bytes.size() - 2), "noeoi.jpg"); }, "noeoi.jpg",
                     "truncated JPEG");
  // Trailing bytes after the end marker are ignored, by PIL too.
  EXPECT_TRUE(same_bytes(decode_image_rgb(bytes + "trailing", "trailing.jpg"), npy_mat("rgb_jpg_rgb.npy")));
}

TEST(ImageErrors, CorruptPngChecksum) {
  std::string bytes = read_bytes(image_fixture("rgb.png"));
  bytes[bytes.size() / 2] = static_cast<char>(bytes[bytes.size() / 2] ^ 0x5A);
  expect_image_error([&] { decode_image_rgb(bytes, "flipped.png"); }, "flipped.png", "cannot decode");
}

TEST(ImageErrors, HugeDeclaredSizeIsRejectedBeforeDecoding) {
  const std::string path = test::temp_dir() + "/bomb.png";
  write_bytes(path, png_header_only(100000, 100000));
  expect_image_error([&] { load_image_rgb(path); }, "bomb.png", "exceeds the limit");
  expect_image_error([&] { load_mask(path); }, "bomb.png", "exceeds the limit");
}

// libtiff reads the first of two ImageWidth tags and PIL the last: the small one must not vouch for the large.
TEST(ImageErrors, RepeatedTiffSizeTagsAreRefusedInEitherOrder) {
  for (const uint16_t tag : {256, 257}) {
    const uint16_t other = tag == 256 ? 257 : 256;
    for (const bool large_first : {true, false}) {
      SCOPED_TRACE(std::to_string(tag) + (large_first ? " large first" : " small first"));
      const uint16_t a = large_first ? 65000 : 1, b = large_first ? 1 : 65000;
      const std::string bytes = tiff_directory_only({{tag, a}, {other, 65000}, {tag, b}});
      expect_image_error([&] { decode_image_rgb(bytes, "twice.tif"); }, "twice.tif", "more than one");
      expect_image_error([&] { decode_mask(bytes, "twice.tif"); }, "twice.tif", "more than one");
    }
  }
}

TEST(ImageErrors, PixelLimitIsInclusiveAndConfigurableForEveryContainer) {
  for (const std::string name : {"rgb.png", "rgb.jpg", "rgb.bmp", "rgb.tif", "progressive.jpg"}) {
    SCOPED_TRACE(name);
    const std::string path = image_fixture(name);
    const cv::Mat image = load_image_rgb(path);
    const int64_t pixels = int64_t(image.rows) * image.cols;
    EXPECT_NO_THROW(load_image_rgb(path, ImageLimits{pixels}));
    expect_image_error([&] { load_image_rgb(path, ImageLimits{pixels - 1}); }, name, "exceeds the limit");
  }
}

// Mutated copies of every fixture: each either decodes or throws ImageError.
TEST(ImageErrors, MutatedFilesNeverCrash) {
  std::mt19937 rng(12345);
  for (const json& c : manifest()["decode"]) {
    const std::string file = c["file"];
    const std::string original = read_bytes(image_fixture(file));
    for (int trial = 0; trial < 8; ++trial) {
      std::string bytes = original;
      const int flips = 1 + static_cast<int>(rng() % 8);
      for (int i = 0; i < flips; ++i) bytes[rng() % bytes.size()] = static_cast<char>(rng());
      if (trial % 2) bytes.resize(rng() % bytes.size());
      try {
        const cv::Mat m = decode_image_rgb(bytes, file);
        EXPECT_EQ(m.type(), CV_8UC3);
      } catch (const ImageError& e) {
        EXPECT_NE(std::string(e.what()).find(file), std::string::npos) << e.what();
      }
    }
  }
}

TEST(ImageErrors, TransformLoadNamesTheFile) {
  const std::string path = test::temp_dir() + "/not_an_image.jpg";
  write_bytes(path, "hello");
  ImageTransform t;
  expect_image_error([&] { t.load(path); }, "not_an_image.jpg", "");
  expect_image_error([&] { t.load_mask(path); }, "not_an_image.jpg", "");
}

// ----------------------------------------------------------------------------------------------------
// The real data sets: every image and mask against digests of the reference preprocessing.

TEST(ImageSharedData, EveryImageAndMaskMatchesTheReferencePreprocessing) {
  PATCHCORE_REQUIRE_SHARED(data, "data");
  const json digests = read_json(image_fixture("shared_digests.json"));
  ImageTransform t;
  for (const auto& [dataset, parts] : digests.items()) {
    const std::string root = test::shared("data/" + dataset);
    if (root.empty()) continue;
    int images = 0, masks = 0;
    for (const json& row : parts["images"]) {
      const std::string path = root + "/" + row[0].get<std::string>();
      SCOPED_TRACE(path);
      const cv::Mat rgb = load_image_rgb(path);
      ASSERT_EQ(rgb.cols, row[1].get<int>());
      ASSERT_EQ(rgb.rows, row[2].get<int>());
      EXPECT_EQ(digest(rgb), row[3].get<std::string>()) << "decoded pixels differ from PIL's";
      const cv::Mat cropped = t.to_view(rgb);
      EXPECT_EQ(digest(cropped), row[4].get<std::string>()) << "224x224 crop differs from torchvision's";
      const torch::Tensor tensor = t.to_tensor(cropped).to(torch::kFloat64);
      EXPECT_NEAR(tensor.sum().item<double>(), row[5].get<double>(), 0.01);
      EXPECT_NEAR(tensor.abs().sum().item<double>(), row[6].get<double>(), 0.01);
      ++images;
    }
    for (const json& row : parts["masks"]) {
      const std::string path = root + "/" + row[0].get<std::string>();
      SCOPED_TRACE(path);
      const cv::Mat mask = t.load_mask(path);
      EXPECT_EQ(digest(mask), row[1].get<std::string>());
      EXPECT_EQ(cv::countNonZero(mask == 255), row[2].get<int>());
      ++masks;
    }
    EXPECT_GT(images, 0) << dataset;
    EXPECT_GT(masks, 0) << dataset;
  }
}

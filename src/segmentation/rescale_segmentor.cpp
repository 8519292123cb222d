#include "patchcore/segmentation/rescale_segmentor.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "patchcore/core/device.h"
#include "patchcore/core/parallel.h"

namespace patchcore {
namespace {

// scipy's 'reflect' mode: the edge sample is repeated, and the pattern repeats with period 2n.
int64_t reflect_index(int64_t i, int64_t n) {
  const int64_t period = 2 * n;
  i %= period;
  if (i < 0) i += period;
  return i < n ? i : period - 1 - i;
}

// One 1-D pass along `axis` of a row-major [rows, cols] float map.
void filter_axis(const float* in, float* out, int64_t rows, int64_t cols, int axis, const std::vector<double>& taps) {
  const int64_t radius = static_cast<int64_t>(taps.size() / 2);
  const int64_t n = axis == 0 ? rows : cols;
  std::vector<int64_t> clamp(static_cast<size_t>(n + 2 * radius));
  for (int64_t i = -radius; i < n + radius; ++i) clamp[static_cast<size_t>(i + radius)] = reflect_index(i, n);
  // Items of 8 rows, each worker with its own accumulator and padded row.
  constexpr int64_t kRowsPerItem = 8;
  const int64_t items = (rows + kRowsPerItem - 1) / kRowsPerItem;
  struct Scratch {
    std::vector<double> acc;
    std::vector<float> padded;  // along a row, the row with its reflected borders: contiguous reads, which vectorise
  };
  std::vector<Scratch> scratches(static_cast<size_t>(parallel_threads(items)),
                                 Scratch{std::vector<double>(static_cast<size_t>(cols)),
                                         std::vector<float>(axis == 0 ? 0 : static_cast<size_t>(cols + 2 * radius))});
  parallel_for(items, [&](int64_t item, int worker) {
    std::vector<double>& acc = scratches[static_cast<size_t>(worker)].acc;
    std::vector<float>& padded = scratches[static_cast<size_t>(worker)].padded;
    for (int64_t r = item * kRowsPerItem; r < std::min(rows, (item + 1) * kRowsPerItem); ++r) {
      std::fill(acc.begin(), acc.end(), 0.0);
      if (axis == 1)
        for (size_t c = 0; c < padded.size(); ++c) padded[c] = in[r * cols + clamp[c]];
      for (int64_t t = 0; t < static_cast<int64_t>(taps.size()); ++t) {
        const double w = taps[static_cast<size_t>(t)];
        const float* src = axis == 0 ? in + clamp[static_cast<size_t>(r + t)] * cols : padded.data() + t;
        for (int64_t c = 0; c < cols; ++c) acc[static_cast<size_t>(c)] += w * src[c];
      }
      for (int64_t c = 0; c < cols; ++c) out[r * cols + c] = static_cast<float>(acc[static_cast<size_t>(c)]);
    }
  });
}

}  // namespace

at::Tensor gaussian_filter(const at::Tensor& image, double sigma, double truncate) {
  if (image.dim() != 2 || image.numel() == 0)
    throw std::invalid_argument("gaussian_filter: expected a non-empty 2-D map");
  if (!(sigma > 0) || !(truncate > 0))
    throw std::invalid_argument("gaussian_filter: sigma and truncate must be positive");
  const int64_t radius = static_cast<int64_t>(truncate * sigma + 0.5);
  std::vector<double> taps(static_cast<size_t>(2 * radius + 1));
  double sum = 0;
  for (int64_t x = -radius; x <= radius; ++x)
    sum += taps[static_cast<size_t>(x + radius)] = std::exp(-0.5 * x * x / (sigma * sigma));
  for (double& t : taps) t /= sum;

  const at::Tensor in = image.to(at::kCPU, at::kFloat).contiguous();
  const int64_t rows = in.size(0), cols = in.size(1);
  at::Tensor tmp = at::empty_like(in), out = at::empty_like(in);
  filter_axis(in.data_ptr<float>(), tmp.data_ptr<float>(), rows, cols, 0, taps);
  filter_axis(tmp.data_ptr<float>(), out.data_ptr<float>(), rows, cols, 1, taps);
  return out;
}

RescaleSegmentor::RescaleSegmentor(const std::string& device, int64_t target_size, double smoothing)
    : device_(parse_device(device)), target_size_(target_size), smoothing_(smoothing) {
  if (target_size < 1) throw std::invalid_argument("RescaleSegmentor: target_size must be positive");
  if (!(smoothing > 0)) throw std::invalid_argument("RescaleSegmentor: smoothing sigma must be positive");
}

std::vector<at::Tensor> RescaleSegmentor::convert_to_segmentation(const at::Tensor& patch_scores) const {
  return convert_to_segmentation(patch_scores, target_size_, target_size_);
}

std::vector<at::Tensor> RescaleSegmentor::convert_to_segmentation(const at::Tensor& patch_scores, int64_t height,
                                                                  int64_t width) const {
  const at::Tensor upsampled = rescale(patch_scores, height, width);
  std::vector<at::Tensor> maps;
  for (int64_t b = 0; b < upsampled.size(0); ++b) maps.push_back(smooth(upsampled[b]));
  return maps;
}

at::Tensor RescaleSegmentor::rescale(const at::Tensor& patch_scores, int64_t height, int64_t width) const {
  at::Tensor scores = patch_scores;
  if (scores.dim() == 2) {
    const auto side = static_cast<int64_t>(std::lround(std::sqrt(static_cast<double>(scores.size(1)))));
    if (side * side != scores.size(1))
      throw std::invalid_argument("RescaleSegmentor: [B, L] patch scores need a square grid, L = " +
                                  std::to_string(scores.size(1)));
    scores = scores.reshape({scores.size(0), side, side});
  }
  if (scores.dim() != 3 || scores.numel() == 0)
    throw std::invalid_argument("RescaleSegmentor: patch scores must be [B, h, w]");
  if (height < 1 || width < 1) throw std::invalid_argument("RescaleSegmentor: the map size must be positive");
  at::NoGradGuard no_grad;
  // F.interpolate(size=(height, width), mode="bilinear", align_corners=False).
  return at::upsample_bilinear2d(scores.to(device_, at::kFloat).unsqueeze(1), {height, width}, false).squeeze(1).cpu();
}

at::Tensor RescaleSegmentor::smooth(const at::Tensor& map) const { return gaussian_filter(map, smoothing_); }

}  // namespace patchcore

#include "patchcore/embedding/patch_embedder.h"

#include <ATen/ATen.h>

#include "patchcore/core/parallel.h"

#include <algorithm>
#include <map>
#include <stdexcept>
#include <string>

namespace patchcore {
namespace {

// adaptive_avg_pool1d's bin i of `out` bins over `in` values: [floor(i·in/out), ceil((i+1)·in/out)).
std::pair<int64_t, int64_t> pool_bin(int64_t i, int64_t in, int64_t out) {
  return {i * in / out, ((i + 1) * in + out - 1) / out};
}

// Source rows (or columns) and weights of bilinear resampling from `in` to `out` samples with
// align_corners=False, computed in float as PyTorch's CPU kernel does.
struct LinearAxis {
  std::vector<int64_t> i0, i1;
  std::vector<float> w0, w1;
};

LinearAxis linear_axis(int64_t in, int64_t out) {
  LinearAxis a;
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  for (int64_t d = 0; d < out; ++d) {
    const float src = std::max(scale * (static_cast<float>(d) + 0.5f) - 0.5f, 0.f);
    const auto i0 = static_cast<int64_t>(src);
    const float w1 = std::min(src - static_cast<float>(i0), 1.f);
    a.i0.push_back(i0);
    a.i1.push_back(i0 + (i0 < in - 1 ? 1 : 0));
    a.w0.push_back(1.f - w1);
    a.w1.push_back(w1);
  }
  return a;
}

struct LayerMap {
  const float* data;
  int64_t channels, height, width;
  int64_t grid_h, grid_w;
  LinearAxis rows, cols;  // to the first layer's grid; unused when the grids agree
  bool aligned;
};

}  // namespace

PatchEmbedder::PatchEmbedder(std::vector<int64_t> feature_dimensions, int64_t patchsize, int64_t patchstride,
                             int64_t pretrain_embed_dimension, int64_t target_embed_dimension)
    : feature_dimensions_(std::move(feature_dimensions)), patchsize_(patchsize), patchstride_(patchstride) {
  if (feature_dimensions_.empty()) throw std::invalid_argument("PatchEmbedder: no layers");
  for (int64_t c : feature_dimensions_)
    if (c < 1) throw std::invalid_argument("PatchEmbedder: a layer has " + std::to_string(c) + " channels");
  if (patchsize < 1 || patchstride < 1)
    throw std::invalid_argument("PatchEmbedder: patchsize and stride must be at least 1");
  if (pretrain_embed_dimension < 1 || target_embed_dimension < 1)
    throw std::invalid_argument("PatchEmbedder: embedding dimensions must be positive");
  const int64_t d = pretrain_embed_dimension, kernel = patchsize * patchsize;
  const int64_t layers = static_cast<int64_t>(feature_dimensions_.size()), concatenated = layers * d;
  outputs_.resize(static_cast<size_t>(target_embed_dimension));
  for (int64_t j = 0; j < target_embed_dimension; ++j) {
    // Output j is the Aggregator's mean over bins [first, last) of the concatenated per-layer vectors,
    // each of which is a MeanMapper mean over a range of one layer's c·p² + ky·p + kx patch index.
    const auto [first, last] = pool_bin(j, concatenated, target_embed_dimension);
    std::map<std::pair<size_t, int64_t>, double> weights;  // (layer, patch index) → weight
    for (int64_t g = first; g < last; ++g) {
      const auto layer = static_cast<size_t>(g / d);
      const int64_t length = feature_dimensions_[layer] * kernel;
      const auto [begin, end] = pool_bin(g % d, length, d);
      const double w = 1.0 / (static_cast<double>(end - begin) * static_cast<double>(last - first));
      for (int64_t k = begin; k < end; ++k) weights[{layer, k}] += w;
    }
    auto& parts = outputs_[static_cast<size_t>(j)];
    for (const auto& [key, w] : weights) {
      if (parts.empty() || parts.back().layer != key.first) parts.push_back({key.first, {}});
      const int64_t k = key.second;
      parts.back().taps.push_back({k / kernel, k % kernel / patchsize, k % patchsize, static_cast<float>(w)});
    }
  }
}

at::Tensor PatchEmbedder::forward(const std::vector<at::Tensor>& features, std::vector<int64_t>* patch_shape) const {
  if (features.size() != feature_dimensions_.size())
    throw std::invalid_argument("PatchEmbedder: got " + std::to_string(features.size()) + " layers, built for " +
                                std::to_string(feature_dimensions_.size()));
  const int64_t pad = (patchsize_ - 1) / 2, stride = patchstride_;
  std::vector<at::Tensor> contiguous;
  std::vector<LayerMap> maps;
  for (size_t l = 0; l < features.size(); ++l) {
    const at::Tensor& f = features[l];
    if (f.dim() != 4 || f.size(1) != feature_dimensions_[l] || f.size(0) != features[0].size(0) || f.size(0) < 1)
      throw std::invalid_argument("PatchEmbedder: layer " + std::to_string(l) + " must be [B, " +
                                  std::to_string(feature_dimensions_[l]) + ", H, W] with the batch size of layer 0");
    contiguous.push_back(f.to(at::kCPU, at::kFloat).contiguous());
    LayerMap m{contiguous.back().data_ptr<float>(), f.size(1), f.size(2), f.size(3), 0, 0, {}, {}, true};
    if (m.height + 2 * pad < patchsize_ || m.width + 2 * pad < patchsize_)
      throw std::invalid_argument("PatchEmbedder: layer " + std::to_string(l) + " feature map is smaller than a patch");
    m.grid_h = (m.height + 2 * pad - patchsize_) / stride + 1;
    m.grid_w = (m.width + 2 * pad - patchsize_) / stride + 1;
    maps.push_back(std::move(m));
  }
  const int64_t batch = features[0].size(0), grid_h = maps[0].grid_h, grid_w = maps[0].grid_w;
  size_t scratch_size = 0;
  for (auto& m : maps) {
    m.aligned = m.grid_h == grid_h && m.grid_w == grid_w;
    if (m.aligned) continue;
    m.rows = linear_axis(m.grid_h, grid_h);
    m.cols = linear_axis(m.grid_w, grid_w);
    scratch_size = std::max(scratch_size, static_cast<size_t>(m.grid_h * m.grid_w));
  }

  const int64_t dims = target_embed_dimension(), plane = grid_h * grid_w;
  at::Tensor planes = at::empty({batch, dims, grid_h, grid_w}, at::kFloat);
  float* const out_data = planes.data_ptr<float>();
  // Items of 16 output planes; each worker sums a deeper layer's planes in its own scratch.
  constexpr int64_t kPlanesPerItem = 16;
  const int64_t planes_total = batch * dims, items = (planes_total + kPlanesPerItem - 1) / kPlanesPerItem;
  std::vector<std::vector<float>> scratches(static_cast<size_t>(parallel_threads(items)),
                                            std::vector<float>(scratch_size));
  parallel_for(items, [&](int64_t item, int worker) {
    std::vector<float>& scratch = scratches[static_cast<size_t>(worker)];
    for (int64_t index = item * kPlanesPerItem; index < std::min(planes_total, (item + 1) * kPlanesPerItem); ++index) {
      const int64_t b = index / dims;
      float* __restrict out = out_data + index * plane;
      std::fill(out, out + plane, 0.f);
      for (const Part& part : outputs_[static_cast<size_t>(index % dims)]) {
        const LayerMap& m = maps[part.layer];
        // Deeper layers are summed on their own grid, then upsampled once into the output.
        float* __restrict sum = m.aligned ? out : scratch.data();
        if (!m.aligned) std::fill(sum, sum + m.grid_h * m.grid_w, 0.f);
        for (const Tap& tap : part.taps) {
          const float* __restrict channel = m.data + (b * m.channels + tap.channel) * m.height * m.width;
          const float w = tap.weight;
          // Zero padding: only grid positions whose source pixel lies inside the map contribute.
          const int64_t oy = tap.ky - pad, ox = tap.kx - pad;
          const int64_t y_begin = oy >= 0 ? 0 : (-oy + stride - 1) / stride;
          const int64_t y_end = std::min(m.grid_h, m.height - 1 - oy >= 0 ? (m.height - 1 - oy) / stride + 1 : 0);
          const int64_t x_begin = ox >= 0 ? 0 : (-ox + stride - 1) / stride;
          const int64_t x_end = std::min(m.grid_w, m.width - 1 - ox >= 0 ? (m.width - 1 - ox) / stride + 1 : 0);
          for (int64_t y = y_begin; y < y_end; ++y) {
            const float* __restrict src = channel + (y * stride + oy) * m.width + ox;
            float* __restrict dst = sum + y * m.grid_w;
            if (stride == 1) {
              for (int64_t x = x_begin; x < x_end; ++x) dst[x] += w * src[x];
            } else {
              for (int64_t x = x_begin; x < x_end; ++x) dst[x] += w * src[x * stride];
            }
          }
        }
        if (m.aligned) continue;
        for (int64_t y = 0; y < grid_h; ++y) {
          const auto yi = static_cast<size_t>(y);
          const float* r0 = sum + m.rows.i0[yi] * m.grid_w;
          const float* r1 = sum + m.rows.i1[yi] * m.grid_w;
          const float wy0 = m.rows.w0[yi], wy1 = m.rows.w1[yi];
          float* dst = out + y * grid_w;
          for (int64_t x = 0; x < grid_w; ++x) {
            const auto xi = static_cast<size_t>(x);
            const int64_t x0 = m.cols.i0[xi], x1 = m.cols.i1[xi];
            const float wx0 = m.cols.w0[xi], wx1 = m.cols.w1[xi];
            dst[x] += wy0 * (wx0 * r0[x0] + wx1 * r0[x1]) + wy1 * (wx0 * r1[x0] + wx1 * r1[x1]);
          }
        }
      }
    }
  });
  if (patch_shape) *patch_shape = {grid_h, grid_w};
  return planes.permute({0, 2, 3, 1}).reshape({batch * plane, dims});
}

at::Tensor reference_embedding(const std::vector<at::Tensor>& features, const PatchMaker& patch_maker,
                               const Preprocessing& preprocessing, const Aggregator& aggregator,
                               std::vector<int64_t>* patch_shape) {
  if (features.empty()) throw std::invalid_argument("reference_embedding: no layers");
  std::vector<at::Tensor> patches;
  std::vector<std::vector<int64_t>> grids;
  for (const auto& f : features) {
    auto [p, grid] = patch_maker.patchify(f);
    patches.push_back(p);
    grids.push_back(grid);
  }
  // Deeper layers are aligned to the first layer's patch grid after unfolding, by bilinear interpolation
  // of every (channel, kernel position) plane.
  const int64_t gh = grids[0][0], gw = grids[0][1];
  for (size_t i = 1; i < patches.size(); ++i) {
    if (grids[i] == grids[0]) continue;
    const at::Tensor& t = patches[i];  // [B, L, C, p, p]
    const int64_t b = t.size(0), c = t.size(2), p = t.size(3);
    at::Tensor planes = t.reshape({b, grids[i][0], grids[i][1], c, p, p}).permute({0, 3, 4, 5, 1, 2});
    // F.interpolate(size=(gh, gw), mode="bilinear", align_corners=False).
    planes = at::upsample_bilinear2d(planes.reshape({-1, 1, grids[i][0], grids[i][1]}), {gh, gw}, false);
    patches[i] = planes.reshape({b, c, p, p, gh, gw}).permute({0, 4, 5, 1, 2, 3}).reshape({b, gh * gw, c, p, p});
  }
  for (auto& p : patches) p = p.reshape({-1, p.size(2), p.size(3), p.size(4)});
  if (patch_shape) *patch_shape = grids[0];
  return aggregator.forward(preprocessing.forward(patches));
}

}  // namespace patchcore

#include "patchcore/memory_bank/greedy_coreset.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>

#include "coreset_points.h"
#include "patchcore/core/numeric.h"
#include "patchcore/core/parallel.h"
#include "patchcore/core/simd.h"
#include "patchcore/core/tensor_checks.h"

namespace patchcore {
namespace coreset {

using simd::horizontal_sum;
using simd::load8;
using simd::v8f;

namespace {

// 16 float lanes per row as two 8-float vectors (core/simd.h), so a distance has the same bits wherever it is
// computed.
// Dot products of R rows with `centre`. R rows at once only interleaves independent accumulators (more
// instruction-level parallelism); each row sees exactly the operations it would see alone.
template <int R>
__attribute__((always_inline)) inline void dot_rows(const float* const* rows, const float* centre, int64_t dim,
                                                    float* out) {
  v8f lo[R], hi[R];
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = v8f{};
  int64_t j = 0;
  for (; j + 16 <= dim; j += 16) {
    v8f c0, c1, a0, a1;
    load8(c0, centre + j);
    load8(c1, centre + j + 8);
    for (int r = 0; r < R; ++r) {
      load8(a0, rows[r] + j);
      load8(a1, rows[r] + j + 8);
      lo[r] += a0 * c0;
      hi[r] += a1 * c1;
    }
  }
  if (j < dim) {
    // Zero-padded tail: the padding lanes add exact zeros.
    float c[16] = {};
    std::memcpy(c, centre + j, static_cast<size_t>(dim - j) * sizeof(float));
    v8f c0, c1, a0, a1;
    load8(c0, c);
    load8(c1, c + 8);
    for (int r = 0; r < R; ++r) {
      float a[16] = {};
      std::memcpy(a, rows[r] + j, static_cast<size_t>(dim - j) * sizeof(float));
      load8(a0, a);
      load8(a1, a + 8);
      lo[r] += a0 * c0;
      hi[r] += a1 * c1;
    }
  }
  for (int r = 0; r < R; ++r) out[r] = horizontal_sum(lo[r] + hi[r]);
}

}  // namespace

PATCHCORE_SIMD_KERNEL void distance_kernel(const float* const* rows, const float* row_norms, int64_t count,
                                           const float* centre, float centre_norm, int64_t dim, float* out) {
  int64_t r = 0;
  for (; r + 4 <= count; r += 4) dot_rows<4>(rows + r, centre, dim, out + r);
  for (; r < count; ++r) dot_rows<1>(rows + r, centre, dim, out + r);
  for (r = 0; r < count; ++r) {
    const float v = (-2.0f * out[r] + row_norms[r]) + centre_norm;
    out[r] = std::sqrt(v > 0.0f ? v : 0.0f);
  }
}

PATCHCORE_SIMD_KERNEL void distances_from_point(const float* point, float point_norm, const float* const* rows,
                                                 const float* row_norms, int64_t count, int64_t dim, float* out) {
  // dot_rows with the roles swapped: a product is the same either way round and the lanes add in the same order.
  int64_t r = 0;
  for (; r + 4 <= count; r += 4) dot_rows<4>(rows + r, point, dim, out + r);
  for (; r < count; ++r) dot_rows<1>(rows + r, point, dim, out + r);
  for (r = 0; r < count; ++r) {
    const float v = (-2.0f * out[r] + point_norm) + row_norms[r];
    out[r] = std::sqrt(v > 0.0f ? v : 0.0f);
  }
}

PATCHCORE_SIMD_KERNEL void squared_norm_kernel(const float* const* rows, int64_t count, int64_t dim, float* out) {
  for (int64_t r = 0; r < count; ++r) dot_rows<1>(rows + r, rows[r], dim, out + r);
}

PATCHCORE_SIMD_KERNEL void projection_kernel(const float* x, int64_t count, int64_t in_dim, const float* w,
                                             int64_t out_dim, float* out) {
  int64_t i = 0;
  for (; i + 4 <= count; i += 4) {
    const float* rows[4] = {x + i * in_dim, x + (i + 1) * in_dim, x + (i + 2) * in_dim, x + (i + 3) * in_dim};
    for (int64_t k = 0; k < out_dim; ++k) {
      float d[4];
      dot_rows<4>(rows, w + k * in_dim, in_dim, d);
      for (int r = 0; r < 4; ++r) out[(i + r) * out_dim + k] = d[r];
    }
  }
  for (; i < count; ++i) {
    const float* row = x + i * in_dim;
    for (int64_t k = 0; k < out_dim; ++k) dot_rows<1>(&row, w + k * in_dim, in_dim, out + i * out_dim + k);
  }
}

Points prepare_points(const at::Tensor& projected, const char* who) {
  if (!projected.defined() || projected.dim() != 2 || projected.size(0) < 1 || projected.size(1) < 1 ||
      projected.scalar_type() != at::kFloat || !projected.device().is_cpu() || !projected.is_contiguous())
    throw std::invalid_argument(std::string(who) +
                                ": projected features must be a contiguous [N, dim] float32 CPU tensor with N, "
                                "dim >= 1, got " +
                                shape_string(projected));
  Points p;
  p.data = projected.data_ptr<float>();
  p.n = projected.size(0);
  p.dim = projected.size(1);
  p.rows.resize(static_cast<size_t>(p.n));
  for (int64_t i = 0; i < p.n; ++i) p.rows[i] = p.data + i * p.dim;
  p.norms.resize(static_cast<size_t>(p.n));
  const int64_t block = 4096;
  parallel_for((p.n + block - 1) / block, [&](int64_t t, int) {
    const int64_t b = t * block;
    squared_norm_kernel(&p.rows[b], std::min(block, p.n - b), p.dim, &p.norms[b]);
  });
  // Bounded norms keep every intermediate of the distance formula finite (|a.b| <= max norm), which the
  // pruning bounds rely on; non-finite features are caught here too.
  float max_norm = 0.0f;
  for (int64_t i = 0; i < p.n; ++i) {
    const float v = p.norms[i];
    if (!(v <= FLT_MAX / 8)) {
      std::ostringstream msg;
      msg << who << ": row " << i << " of the projected features is not finite or too large for float32 distances"
          << " (squared norm " << v << ")";
      throw std::invalid_argument(msg.str());
    }
    max_norm = std::max(max_norm, v);
  }
  // Rounding error of the float formula: each dot product term passes through at most m roundings
  // (product, dim/16 lane additions, the tail, the 4-level reduction), so |error(a.b)| <= m u (|a|^2+|b|^2)/2;
  // with both norms and the two final additions the squared distance is off by at most (2m + 6) u
  // (|a|^2 + |b|^2) <= (2m + 6) u * 2 max_norm. Doubled for the second-order terms. The absolute term covers
  // underflow.
  const double u = kFloatUnit;
  const double m = static_cast<double>((p.dim + 15) / 16 + 6);
  p.delta = 2.0 * (2.0 * m + 6.0) * u * 2.0 * static_cast<double>(max_norm) + 1e3 * static_cast<double>(FLT_MIN);
  return p;
}

void check_scores(const std::vector<float>& scores, const Points& p, int64_t count, const char* who) {
  if (static_cast<int64_t>(scores.size()) != p.n)
    throw std::invalid_argument(std::string(who) + ": got " + std::to_string(scores.size()) + " scores for " +
                                std::to_string(p.n) + " points");
  for (float s : scores)
    if (!std::isfinite(s)) throw std::invalid_argument(std::string(who) + ": initial scores must be finite");
  if (count < 0) throw std::invalid_argument(std::string(who) + ": selection count must be >= 0");
}

}  // namespace coreset

// ---- Initial scores. ----

namespace {

using coreset::Best;
using coreset::distance_kernel;
using coreset::Points;
using coreset::prepare_points;

void distances_to(const Points& p, int64_t point, float* out) {
  const int64_t block = 4096;
  parallel_for((p.n + block - 1) / block, [&](int64_t t, int) {
    const int64_t b = t * block;
    distance_kernel(&p.rows[b], &p.norms[b], std::min(block, p.n - b), p.rows[point], p.norms[point], p.dim, out + b);
  });
}

}  // namespace

std::vector<float> distances_to_point(const at::Tensor& projected, int64_t point) {
  const Points p = prepare_points(projected, "distances_to_point");
  if (point < 0 || point >= p.n)
    throw std::invalid_argument("distances_to_point: point " + std::to_string(point) + " is outside [0, " +
                                std::to_string(p.n) + ")");
  std::vector<float> out(static_cast<size_t>(p.n));
  distances_to(p, point, out.data());
  return out;
}

std::vector<float> mean_distance_to_points(const at::Tensor& projected, const std::vector<int64_t>& points) {
  const Points p = prepare_points(projected, "mean_distance_to_points");
  if (points.empty()) throw std::invalid_argument("mean_distance_to_points: no points given");
  for (int64_t s : points)
    if (s < 0 || s >= p.n)
      throw std::invalid_argument("mean_distance_to_points: point " + std::to_string(s) + " is outside [0, " +
                                  std::to_string(p.n) + ")");
  std::vector<float> sum(static_cast<size_t>(p.n), 0.0f);
  const int64_t block = 4096;
  const int64_t blocks = (p.n + block - 1) / block;
  std::vector<std::vector<float>> scratch(static_cast<size_t>(parallel_threads(blocks)), std::vector<float>(block));
  parallel_for(blocks, [&](int64_t t, int worker) {
    const int64_t b = t * block, len = std::min(block, p.n - b);
    float* d = scratch[worker].data();
    for (int64_t s : points) {
      distance_kernel(&p.rows[b], &p.norms[b], len, p.rows[s], p.norms[s], p.dim, d);
      for (int64_t i = 0; i < len; ++i) sum[b + i] += d[i];
    }
  });
  const float count = static_cast<float>(points.size());
  for (float& v : sum) v /= count;
  return sum;
}

std::vector<float> distance_matrix_row_norms(const at::Tensor& projected) {
  const Points p = prepare_points(projected, "distance_matrix_row_norms");
  std::vector<float> out(static_cast<size_t>(p.n));
  // A block of rows stays in cache while every column point passes by; each row's sum runs in column order.
  const int64_t block = 256;
  parallel_for((p.n + block - 1) / block, [&](int64_t t, int) {
    const int64_t b = t * block, len = std::min(block, p.n - b);
    float d[block];
    double acc[block] = {};
    for (int64_t j = 0; j < p.n; ++j) {
      distance_kernel(&p.rows[b], &p.norms[b], len, p.rows[j], p.norms[j], p.dim, d);
      for (int64_t i = 0; i < len; ++i) acc[i] += static_cast<double>(d[i]) * d[i];
    }
    for (int64_t i = 0; i < len; ++i) out[b + i] = static_cast<float>(std::sqrt(acc[i]));
  });
  return out;
}

// ---- The straightforward loop. ----

std::vector<int64_t> greedy_coreset_reference(const at::Tensor& projected, std::vector<float> scores, int64_t count) {
  const Points p = prepare_points(projected, "greedy_coreset_reference");
  coreset::check_scores(scores, p, count, "greedy_coreset_reference");
  std::vector<int64_t> selected;
  selected.reserve(static_cast<size_t>(count));
  const int64_t block = 4096;
  const int64_t blocks = (p.n + block - 1) / block;
  std::vector<Best> block_best(static_cast<size_t>(blocks));
  std::vector<std::vector<float>> scratch(static_cast<size_t>(parallel_threads(blocks)), std::vector<float>(block));
  Best best;
  for (int64_t i = 0; i < p.n; ++i)
    if (scores[i] > best.score) best = {scores[i], i};
  for (int64_t it = 0; it < count; ++it) {
    const int64_t c = best.index;
    selected.push_back(c);
    // One pass lowers every score and finds the next argmax (per block, then over blocks in order).
    parallel_for(blocks, [&](int64_t k, int worker) {
      const int64_t b = k * block, len = std::min(block, p.n - b);
      float* d = scratch[worker].data();
      distance_kernel(&p.rows[b], &p.norms[b], len, p.rows[c], p.norms[c], p.dim, d);
      Best local;
      for (int64_t i = 0; i < len; ++i) {
        float& s = scores[b + i];
        if (d[i] < s) s = d[i];
        if (s > local.score) local = {s, b + i};
      }
      block_best[k] = local;
    });
    best = Best{};
    for (const Best& b : block_best)
      if (coreset::better(b, best)) best = b;
  }
  return selected;
}

}  // namespace patchcore

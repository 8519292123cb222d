#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "coreset_points.h"
#include "patchcore/core/linalg.h"
#include "patchcore/core/numeric.h"
#include "patchcore/core/parallel.h"
#include "patchcore/core/quantized.h"
#include "patchcore/core/simd.h"
#include "patchcore/memory_bank/greedy_coreset.h"

namespace patchcore {

using coreset::Best;
using coreset::better;
using coreset::distances_from_point;
using coreset::Points;
using simd::lane_bits;
using simd::load8;
using simd::v8f;

// The straightforward loop (greedy_coreset.cpp) measures every point against every new centre, yet only the
// argmax has to be exact. Scores only fall, so a point's score is an upper bound on what it will be later: the
// fast loop keeps points in a priority queue by their score so far and brings a point up to date (measures it
// against the centres it has not seen) only when it reaches the top. It stops as soon as the point falls below the
// next one in the queue, and a point that has seen every centre and stays on top is the argmax. Most points fall
// far below the coreset's radius early and are never measured again.
//  - Unseen centres are taken newest first: the newest centres lie nearest the points still on top, so the score
//    falls below the next point's soonest. A point keeps its unseen centres as a few spans of selection order;
//    when there would be more, the two nearest spans merge and the centres between them are measured again,
//    which only repeats a min.
//  - Bounds, 32 centres at a time; only the centres that no bound rules out get the exact distance. Where the CPU
//    has 8-bit dot products, one quantized bound over every dimension (next_candidates_quantized). Elsewhere,
//    points and centres are expressed in the leading principal directions of the data (an orthonormal basis from
//    the covariance of a sample). For orthonormal rows P with complement Q, |z - c|^2 = |P(z - c)|^2 +
//    |Q(z - c)|^2 >= |Pz - Pc|^2 + (|Qz| - |Qc|)^2, so k coordinates plus the residual norm |Qz| bound the
//    distance from below, tighter as k grows; the bound is tried with k = 8, 16, 32, 64 in turn, each reusing the
//    last sum (next_candidates).
//  - A catch-up takes microseconds, too little to share out, so each round catches up the leading points of
//    the queue at once, each until it falls below the best point left in the queue.
//
// Exactness: min over the same distances does not depend on their order, so each score is, once every centre
// is seen, bit for bit the straightforward loop's. A centre is skipped only when its bound proves that the
// computed distance is >= the point's score. The proof covers the floats: Points::delta bounds the kernel's
// rounding of squared distances (computed distance >= s whenever the exact one is >= sqrt(s^2 + delta), up to
// 1 + kMargin for the sqrt roundings). For the float bounds, kEta * max |z| bounds the error of the stored
// coordinates and residual norms (computed in double from an orthonormalised basis, then rounded to float), and
// kBoundSlack the relative rounding of the float sums of squares that evaluate them; for the quantized bounds,
// QuantizedPoints::absolute bounds their float evaluation. skip_threshold folds it all into one squared value per
// point.
namespace {

constexpr double kMargin = 1e-6;
constexpr double kBoundSlack = 256.0 * kFloatUnit;  // float sums of at most ~70 squares, with room to spare
// Relative to max |z|: coordinates rounded to float are off by 2u, and residual norms come from a double
// difference off by ~3e-13 |z|^2, which the square root turns into ~6e-7 |z| per norm: ~1.2e-6 in all.
constexpr double kEta = 1e-5;
constexpr int64_t kLevelDims[] = {8, 16, 32, 64};
constexpr int64_t kPcaSamples = 8192;      // rows whose covariance gives the principal directions
constexpr int64_t kProjectionRows = 4096;  // rows per chunk when projecting onto them
// Spans of unseen centres kept per point. On tire and magnetic_tile features, 3 measure within 2% as many pairs
// as unlimited spans; 1 measures 20-25% more.
constexpr int kSpans = 3;
constexpr int kWindow = 4;           // groups of eight centres bounded at once
constexpr int kRoundPerThread = 16;  // points caught up per thread in a round: 4 to 64 measured, 16 fastest

constexpr int64_t kNone = std::numeric_limits<int64_t>::min();  // no centre left by the bounds

// What a bound's value can be off by: `eta` in the stored values (on the distance's scale), `slack` relative to the
// float sum, `absolute` on the squared scale; `delta` is Points::delta.
struct Margins {
  double delta = 0.0, eta = 0.0, slack = 0.0, absolute = 0.0;
};

// Squared lower bound at or above which a point with this score provably keeps it.
float skip_threshold(float score, const Margins& m) {
  const double s = score;
  const double t = (std::sqrt(s * s + m.delta) * (1.0 + kMargin) + m.eta) / (1.0 - m.slack);
  return round_up_to_float((t * t + m.absolute) * (1.0 + kMargin));
}

// The levels used for points of dimension `dim`.
std::vector<int64_t> level_dims(int64_t dim) {
  std::vector<int64_t> levels;
  for (int64_t k : kLevelDims)
    if (k < dim) levels.push_back(k);
  if (levels.empty()) levels.push_back(dim - 1);
  return levels;
}

// Values per row that each level stores: its new principal coordinates, then the residual norm.
std::vector<int64_t> level_widths(const std::vector<int64_t>& levels) {
  std::vector<int64_t> widths;
  for (size_t l = 0; l < levels.size(); ++l) widths.push_back(levels[l] - (l > 0 ? levels[l - 1] : 0) + 1);
  return widths;
}

// Every row's level values, [n][stride]: each level's new principal coordinates, then the residual norm after
// all coordinates so far. Returns max |z|^2.
double level_values(const Points& p, const at::Tensor& projected, const std::vector<int64_t>& levels,
                    std::vector<float>& out) {
  const int64_t coords = levels.back();
  at::Tensor basis_t;
  if (coords > 0) basis_t = principal_axes(projected, coords, kPcaSamples).axes.t();
  const int64_t stride = coords + static_cast<int64_t>(levels.size());
  out.assign(static_cast<size_t>(p.n * stride), 0.0f);
  double max_norm = 0.0;
  for (int64_t b = 0; b < p.n; b += kProjectionRows) {
    const int64_t e = std::min(p.n, b + kProjectionRows);
    at::Tensor pc;
    if (coords > 0) pc = projected.slice(0, b, e).to(at::kDouble).mm(basis_t).contiguous();
    for (int64_t i = b; i < e; ++i) {
      const float* row = p.rows[i];
      double norm = 0.0;
      for (int64_t a = 0; a < p.dim; ++a) norm += static_cast<double>(row[a]) * row[a];
      max_norm = std::max(max_norm, norm);
      const double* c = coords > 0 ? pc.data_ptr<double>() + (i - b) * coords : nullptr;
      double captured = 0.0;
      float* v = out.data() + i * stride;
      for (size_t l = 0, j = 0; l < levels.size(); ++l) {
        for (; static_cast<int64_t>(j) < levels[l]; ++j) {
          captured += c[j] * c[j];
          *v++ = static_cast<float>(c[j]);
        }
        *v++ = static_cast<float>(std::sqrt(std::max(0.0, norm - captured)));
      }
    }
  }
  return max_norm;
}

// How the bound kernel reads the level values: `widths` per level, the point's values back to back and each
// group of eight centres as [stride][8].
struct Levels {
  const int64_t* widths;
  int64_t count;
  int64_t stride;
};

// Bounds of the centres [begin, end) against one point, newest first, kWindow groups of eight at a time for
// independent sums: returns the first centre of the first window (the newest) with a centre whose bound over every
// level stays below `threshold`, with the lanes of those centres in bits of *found counted from it, or kNone when
// there is none.
PATCHCORE_SIMD_KERNEL int64_t next_candidates(const Levels& levels, const float* groups, const float* point,
                                              float threshold, int64_t begin, int64_t end, uint32_t* found) {
  const int64_t lo = begin / 8, hi = (end + 7) / 8;
  const uint32_t live_lo = 0xFFu << (begin - 8 * lo) & 0xFFu, live_hi = 0xFFu >> (8 * hi - end);
  const v8f zero = {};
  for (int64_t w = hi - kWindow; w > lo - kWindow; w -= kWindow) {
    uint32_t alive[kWindow], any = 0;
    const float* x[kWindow];
    for (int h = 0; h < kWindow; ++h) {
      const int64_t g = w + h;
      alive[h] = g < lo ? 0u : 0xFFu;
      if (g == hi - 1) alive[h] &= live_hi;
      if (g == lo) alive[h] &= live_lo;
      any |= alive[h];
      // Groups below lo are never read: their lanes are dead, so they read group hi - 1 instead.
      x[h] = groups + (g < lo ? hi - 1 : g) * levels.stride * 8;
    }
    const float* c = point;
    static_assert(kWindow == 4, "the sums below are written out for four groups");
    v8f acc0 = zero, acc1 = zero, acc2 = zero, acc3 = zero, d0, d1, d2, d3;
    for (int64_t l = 0; l < levels.count && any != 0; ++l) {
      const int64_t width = levels.widths[l];
      // Four independent sums, one per group (any order is fine for a bound).
      for (int64_t k = 0; k + 1 < width; ++k) {
        load8(d0, x[0] + k * 8);
        load8(d1, x[1] + k * 8);
        load8(d2, x[2] + k * 8);
        load8(d3, x[3] + k * 8);
        d0 -= c[k];
        d1 -= c[k];
        d2 -= c[k];
        d3 -= c[k];
        acc0 += d0 * d0;
        acc1 += d1 * d1;
        acc2 += d2 * d2;
        acc3 += d3 * d3;
      }
      const int64_t r = width - 1;
      load8(d0, x[0] + r * 8);
      load8(d1, x[1] + r * 8);
      load8(d2, x[2] + r * 8);
      load8(d3, x[3] + r * 8);
      d0 -= c[r];
      d1 -= c[r];
      d2 -= c[r];
      d3 -= c[r];
      alive[0] &= lane_bits(acc0 + d0 * d0 < threshold);
      alive[1] &= lane_bits(acc1 + d1 * d1 < threshold);
      alive[2] &= lane_bits(acc2 + d2 * d2 < threshold);
      alive[3] &= lane_bits(acc3 + d3 * d3 < threshold);
      any = alive[0] | alive[1] | alive[2] | alive[3];
      for (int h = 0; h < kWindow; ++h) x[h] += width * 8;
      c += width;
    }
    if (any != 0) {
      *found = 0;
      for (int h = 0; h < kWindow; ++h) *found |= alive[h] << (8 * h);
      return 8 * w;
    }
  }
  return kNone;
}

// The quantized bounds, where the CPU has 8-bit dot products: every point centred on the mean and held in 8 bits over
// all its dimensions (core/quantized.h). For centred a and b, |a - b|^2 = |a|^2 + |b|^2 - 2 a.b, and with the
// quantization's error term on a.b this bounds the whole distance, where the float bound leaves all but its leading
// principal coordinates to the residual norms: on magnetic_tile's projected features, with a point's distance to its
// nearest of 15,680 random centres as its score, 0.01% of the pairs pass it against 0.09% for the float bound over
// 64 coordinates (at 1.5 times the score, 0.6% and 3.2%), and it takes a sixteenth of the instructions.
enum QuantizedTerm { kSquared, kScale, kNorm, kLength, kError, kQuantizedTerms };

struct QuantizedPoints {
  int64_t steps = 0;             // codes per point / 4, the dimensions padded to a multiple of 4 with code 0
  std::vector<int32_t> codes;    // [n][steps], four signed codes per int32
  std::vector<int32_t> offsets;  // 128 sum(q~) per point: what the centres' unsigned codes add to each sum
  std::vector<float> terms;      // [n][kQuantizedTerms]: |a|^2, s, then |a|, |s a~| and |a - s a~| rounded up
  // What the float evaluation of the bound and the centring in float can be off by, on the squared scale.
  double absolute = 0.0;
};

// Whether the default bounds are the quantized ones: where the CPU has 8-bit products, and for dimensions whose sums
// of products (at most dim x 255 x 127 with the centres' offset) fit int32 by far.
bool uses_quantized_bounds(int64_t dim) { return native_quantized_products() && dim <= 4096; }

QuantizedPoints quantize_points(const Points& p) {
  QuantizedPoints q;
  q.steps = (p.dim + 3) / 4;
  q.codes.assign(static_cast<size_t>(p.n * q.steps), 0);
  q.offsets.resize(static_cast<size_t>(p.n));
  q.terms.resize(static_cast<size_t>(p.n * kQuantizedTerms));
  std::vector<double> sum(static_cast<size_t>(p.dim), 0.0);
  for (int64_t i = 0; i < p.n; ++i)
    for (int64_t j = 0; j < p.dim; ++j) sum[j] += p.rows[i][j];
  std::vector<float> mean(static_cast<size_t>(p.dim));
  for (int64_t j = 0; j < p.dim; ++j) mean[j] = static_cast<float>(sum[j] / static_cast<double>(p.n));
  constexpr int64_t kChunk = 1024;
  std::vector<float> largest(static_cast<size_t>((p.n + kChunk - 1) / kChunk), 0.0f);
  parallel_for(static_cast<int64_t>(largest.size()), [&](int64_t chunk, int) {
    std::vector<float> centred(static_cast<size_t>(p.dim));
    for (int64_t i = chunk * kChunk; i < std::min(p.n, (chunk + 1) * kChunk); ++i) {
      for (int64_t j = 0; j < p.dim; ++j) centred[j] = p.rows[i][j] - mean[j];
      auto* bytes = reinterpret_cast<int8_t*>(q.codes.data() + i * q.steps);
      const Quantized c =
          quantize(centred.data(), p.dim, [&](int64_t j, int32_t code) { bytes[j] = static_cast<int8_t>(code); });
      float* t = q.terms.data() + i * kQuantizedTerms;
      t[kSquared] = static_cast<float>(c.squared);
      t[kScale] = c.scale;
      t[kNorm] = c.norm;
      t[kLength] = c.length;
      t[kError] = c.error;
      q.offsets[i] = 128 * c.sum;
      largest[chunk] = std::max({largest[chunk], c.norm, c.length, c.error});
    }
  });
  // With T the largest of those lengths, every term of |a|^2 + |b|^2 - 2 (s_a s_b (a~ . b~) + |a - s_a a~| |b| +
  // |s_a a~| |b - s_b b~|) is at most 2 T^2, so its float evaluation (8 roundings, the squares' own and the int sum's
  // conversion) is off by less than 24 u T^2; centring in float moves each point by at most u |a|, the distance by
  // 2 u T, its square by 8 u T^2. 128 u T^2 covers both with room to spare.
  const double t = *std::max_element(largest.begin(), largest.end());
  q.absolute = 128.0 * kFloatUnit * t * t;
  return q;
}

#if defined(PATCHCORE_VNNI_KERNEL)
// The lanes of group g whose centres lie in [begin, end).
inline uint32_t group_lanes(int64_t g, int64_t begin, int64_t end) {
  const int64_t from = std::max<int64_t>(begin - 16 * g, 0), to = std::min<int64_t>(end - 16 * g, 16);
  return from >= to ? 0u : (0xFFFFu >> (16 - (to - from))) << from;
}

// The lanes of centre group g (`terms` as Centres keeps them) whose quantized bound against the point, from the sums
// of products `sum`, stays below `bar`.
__attribute__((always_inline)) PATCHCORE_VNNI_KERNEL inline uint32_t passing_lanes(__m512i sum, int32_t offset,
                                                                                   const float* point_terms,
                                                                                   const float* terms, int64_t g,
                                                                                   __m512 bar) {
  constexpr int64_t lanes = kQuantizedLanes;
  const float* t = terms + g * kQuantizedTerms * lanes;
  const __m512 bound =
      quantized_bound(sum, offset, point_terms[kSquared], point_terms[kScale], point_terms[kError],
                      point_terms[kLength], _mm512_loadu_ps(t + kSquared * lanes), _mm512_loadu_ps(t + kScale * lanes),
                      _mm512_loadu_ps(t + kNorm * lanes), _mm512_loadu_ps(t + kError * lanes));
  return static_cast<uint32_t>(_mm512_cmp_ps_mask(bound, bar, _CMP_LT_OQ));
}

// next_candidates with the quantized bounds, two groups of 16 centres at a time (`codes` and `terms` as
// Centres keeps them), each group's sums in two chains.
PATCHCORE_VNNI_KERNEL int64_t next_candidates_quantized(const uint8_t* codes, const float* terms, int64_t steps,
                                                        const int32_t* point, const float* point_terms, int32_t offset,
                                                        float threshold, int64_t begin, int64_t end, uint32_t* found) {
  constexpr int64_t lanes = kQuantizedLanes;
  const int64_t lo = begin / lanes, hi = (end + lanes - 1) / lanes;
  const __m512 bar = _mm512_set1_ps(threshold);
  for (int64_t g = hi - 2; g > lo - 2; g -= 2) {
    const uint32_t live = group_lanes(g, begin, end) | group_lanes(g + 1, begin, end) << 16;
    // A group below lo is never read: its lanes are dead, so it reads group g + 1 instead.
    const int64_t first = g < lo ? g + 1 : g;
    const uint8_t* a = codes + first * steps * lanes * 4;
    const uint8_t* b = codes + (g + 1) * steps * lanes * 4;
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, b0 = a0, b1 = a0;
    int64_t k = 0;
    for (; k + 1 < steps; k += 2) {
      a0 = dpbusd(a0, _mm512_loadu_si512(a + k * lanes * 4), point + k);
      b0 = dpbusd(b0, _mm512_loadu_si512(b + k * lanes * 4), point + k);
      a1 = dpbusd(a1, _mm512_loadu_si512(a + (k + 1) * lanes * 4), point + k + 1);
      b1 = dpbusd(b1, _mm512_loadu_si512(b + (k + 1) * lanes * 4), point + k + 1);
    }
    if (k < steps) {
      a0 = dpbusd(a0, _mm512_loadu_si512(a + k * lanes * 4), point + k);
      b0 = dpbusd(b0, _mm512_loadu_si512(b + k * lanes * 4), point + k);
    }
    const uint32_t pass =
        live & (passing_lanes(_mm512_add_epi32(a0, a1), offset, point_terms, terms, first, bar) |
                passing_lanes(_mm512_add_epi32(b0, b1), offset, point_terms, terms, g + 1, bar) << 16);
    if (pass != 0) {
      *found = pass;
      return lanes * g;
    }
  }
  return kNone;
}
#endif

// Centres [begin, end) of the selection order that a point has not seen.
struct Span {
  int32_t begin;
  int32_t end;
};

// What the loop keeps per point, in one place: the score so far, its skip_threshold, and the unseen centres as a
// few spans, ascending and disjoint, newest last, plus every centre from `seen_until` on.
struct PointState {
  float score;
  float threshold;
  int32_t seen_until = 0;
  int32_t spans = 0;
  Span span[kSpans];

  void add_span(Span s) {
    if (spans > 0 && span[spans - 1].end == s.begin) {
      span[spans - 1].end = s.end;
      return;
    }
    if (spans == kSpans) {  // merge the two spans with the fewest seen centres between them
      int best = 0;
      for (int k = 1; k + 1 < spans; ++k)
        if (span[k + 1].begin - span[k].end < span[best + 1].begin - span[best].end) best = k;
      span[best].end = span[best + 1].end;
      for (int k = best + 1; k + 1 < spans; ++k) span[k] = span[k + 1];
      --spans;
    }
    span[spans++] = s;
  }
};

// The selected centres in selection order, so that a point's pass over them reads contiguous memory: their rows and
// norms for the exact distances and, for the bounds, either their level values, eight per group side by side, or
// their codes and terms, 16 per group as core/quantized.h lays them out.
class Centres {
 public:
  Centres(const Points& p, int64_t stride, const QuantizedPoints* quantized, int64_t capacity)
      : p_(p), stride_(stride), quantized_(quantized) {
    if (quantized_ != nullptr) {
      const int64_t groups = (capacity + kQuantizedLanes - 1) / kQuantizedLanes;
      codes_.assign(static_cast<size_t>(groups * quantized_->steps * kQuantizedLanes * 4), 128);
      terms_.assign(static_cast<size_t>(groups * kQuantizedTerms * kQuantizedLanes), 0.0f);
    } else {
      groups_.assign(static_cast<size_t>((capacity + 7) / 8 * stride * 8), 0.0f);
    }
    rows_.reserve(static_cast<size_t>(capacity * p.dim));
    norms_.reserve(static_cast<size_t>(capacity));
  }
  // `values`: the point's level values, for the float bounds.
  void append(int64_t point, const float* values) {
    const int64_t c = size();
    if (quantized_ != nullptr) {
      constexpr int64_t lanes = kQuantizedLanes;
      const int64_t g = c / lanes, lane = c % lanes, steps = quantized_->steps;
      const auto* from = reinterpret_cast<const int8_t*>(quantized_->codes.data() + point * steps);
      uint8_t* to = codes_.data() + g * steps * lanes * 4;
      for (int64_t k = 0; k < steps * 4; ++k) to[unsigned_code_at(k, lane)] = static_cast<uint8_t>(from[k] + 128);
      for (int64_t t = 0; t < kQuantizedTerms; ++t)
        terms_[static_cast<size_t>((g * kQuantizedTerms + t) * lanes + lane)] =
            quantized_->terms[static_cast<size_t>(point * kQuantizedTerms + t)];
    } else {
      float* group = groups_.data() + (c / 8) * stride_ * 8;
      for (int64_t k = 0; k < stride_; ++k) group[k * 8 + c % 8] = values[k];
    }
    rows_.insert(rows_.end(), p_.rows[point], p_.rows[point] + p_.dim);
    norms_.push_back(p_.norms[point]);
  }
  int64_t size() const { return static_cast<int64_t>(norms_.size()); }
  const float* groups() const { return groups_.data(); }
  const uint8_t* codes() const { return codes_.data(); }
  const float* terms() const { return terms_.data(); }
  const float* row(int64_t c) const { return rows_.data() + c * p_.dim; }
  float norm(int64_t c) const { return norms_[c]; }

 private:
  const Points& p_;
  int64_t stride_;
  const QuantizedPoints* quantized_;
  std::vector<float> groups_;
  std::vector<uint8_t> codes_;
  std::vector<float> terms_;
  std::vector<float> rows_;
  std::vector<float> norms_;
};

// Per thread: room for the candidates of one window, and counts.
struct Scratch {
  const float* rows[8 * kWindow];
  float norms[8 * kWindow];
  float distances[8 * kWindow];
  GreedyStats stats;
};

// The points by (score, row), best first as `better` orders them. A radix heap: the points the loop takes next
// mostly come from one small bucket, and a push appends to a bucket, where a binary heap over every point walks a
// path of cache misses per push and pop while the loop's other threads wait.
// It needs every entry pushed to be no better than the last one it took out, but a caught-up point can stay
// above the rest: such entries wait in `ahead_`, a binary heap of at most a round's points.
class PointQueue {
 public:
  explicit PointQueue(const std::vector<float>& scores) {
    for (size_t i = 0; i < scores.size(); ++i) push(Best{scores[i], static_cast<int64_t>(i)});
  }
  bool empty() const { return size_ == 0; }
  Best top() { return entry(lowest_key()); }
  Best pop() {
    const uint64_t k = lowest_key();
    if (!ahead_.empty()) {
      std::pop_heap(ahead_.begin(), ahead_.end(), std::greater<>{});
      ahead_.pop_back();
    } else {
      buckets_[0].pop_back();
    }
    --size_;
    return entry(k);
  }
  void push(Best b) {
    const uint64_t k = key(b);
    if (k < last_) {
      ahead_.push_back(k);
      std::push_heap(ahead_.begin(), ahead_.end(), std::greater<>{});
    } else {
      buckets_[bucket(k)].push_back(k);
    }
    ++size_;
  }

 private:
  // Lower keys are better: the score's bits in an order that follows the float's (-0 taken as +0), inverted,
  // then the row. Rows fit 32 bits (checked by the caller).
  static uint64_t key(Best b) {
    uint32_t u;
    const float score = b.score + 0.0f;
    std::memcpy(&u, &score, sizeof u);
    const uint32_t ordered = (u & 0x80000000u) != 0 ? ~u : u | 0x80000000u;
    return static_cast<uint64_t>(~ordered) << 32 | static_cast<uint64_t>(b.index);
  }
  static Best entry(uint64_t k) {
    const auto ordered = ~static_cast<uint32_t>(k >> 32);
    const uint32_t u = (ordered & 0x80000000u) != 0 ? ordered & 0x7FFFFFFFu : ~ordered;
    float score;
    std::memcpy(&score, &u, sizeof score);
    return Best{score, static_cast<int64_t>(k & 0xFFFFFFFFu)};
  }
  // Bucket b > 0 holds the keys whose highest bit that differs from last_ is bit b - 1; bucket 0, last_ itself.
  int bucket(uint64_t k) const { return k == last_ ? 0 : 64 - __builtin_clzll(k ^ last_); }
  uint64_t lowest_key() {
    if (!ahead_.empty()) return ahead_.front();
    if (buckets_[0].empty()) {  // the lowest key moves to bucket 0, the rest of its bucket to lower buckets
      int b = 1;
      while (buckets_[b].empty()) ++b;
      std::vector<uint64_t>& from = buckets_[b];
      last_ = *std::min_element(from.begin(), from.end());
      for (uint64_t k : from) buckets_[bucket(k)].push_back(k);
      // A bucket empties only here, so releasing a large one keeps every bucket within twice its size.
      if (from.capacity() > kKeptCapacity) std::vector<uint64_t>().swap(from);
      from.clear();
    }
    return last_;
  }

  static constexpr size_t kKeptCapacity = 4096;
  std::vector<uint64_t> buckets_[65];
  uint64_t last_ = 0;  // no key in the buckets is lower
  std::vector<uint64_t> ahead_;
  size_t size_ = 0;
};

}  // namespace

int64_t greedy_coreset_fast_bytes_per_row(int64_t dim, double percentage) {
  const std::vector<int64_t> levels = level_dims(dim);
  // What the bounds read of every point and of every centre again: its codes, offset and terms (quantized, the
  // default where the CPU has 8-bit products) or its level values.
  const double bound_bytes = uses_quantized_bounds(dim) ? (dim + 3) / 4 * 4 + 4.0 + 4.0 * kQuantizedTerms
                                                        : 4.0 * (levels.back() + static_cast<int64_t>(levels.size()));
  // Per selection a centre's bound values and row; per point its state, queue key (room for two: a bucket holds at
  // most twice its keys), row pointer, norm and the score passed in.
  const double per_point = bound_bytes + (bound_bytes + 4.0 * dim + 4) * std::max(0.0, percentage) +
                           sizeof(PointState) + 2 * sizeof(uint64_t) + 8 + 4 + 4;
  return static_cast<int64_t>(std::ceil(per_point));
}

std::vector<int64_t> greedy_coreset_fast(const at::Tensor& projected, std::vector<float> scores, int64_t count,
                                         GreedyStats* stats, CoresetBounds bounds) {
  const Points p = coreset::prepare_points(projected, "greedy_coreset_fast");
  coreset::check_scores(scores, p, count, "greedy_coreset_fast");
  if (p.n > (int64_t{1} << 32))  // PointQueue keeps a row in 32 bits
    throw std::invalid_argument("greedy_coreset_fast: at most 2^32 rows, got " + std::to_string(p.n));
  GreedyStats total;
  std::vector<int64_t> selected;
  if (count > 0) {
    selected.reserve(static_cast<size_t>(count));
    const bool quantized = bounds == CoresetBounds::kQuantized && uses_quantized_bounds(p.dim);
    const std::vector<int64_t> level_ends = level_dims(p.dim);
    const std::vector<int64_t> widths = level_widths(level_ends);
    const Levels levels{widths.data(), static_cast<int64_t>(widths.size()),
                        level_ends.back() + static_cast<int64_t>(widths.size())};
    std::vector<float> values;
    QuantizedPoints eight_bit;
    Margins margins;
    margins.delta = p.delta;
    if (quantized) {
      eight_bit = quantize_points(p);
      margins.absolute = eight_bit.absolute;
    } else {
      margins.eta = kEta * std::sqrt(level_values(p, projected, level_ends, values)) + 1e-30;
      margins.slack = kBoundSlack;
    }

    std::vector<PointState> state(static_cast<size_t>(p.n));
    for (int64_t i = 0; i < p.n; ++i) {
      state[i].score = scores[i];
      state[i].threshold = skip_threshold(scores[i], margins);
    }
    PointQueue queue(scores);
    scores = std::vector<float>();
    Centres centres(p, levels.stride, quantized ? &eight_bit : nullptr, count);
    const int threads = parallel_threads(kRoundPerThread * num_threads());
    std::vector<Scratch> scratch(static_cast<size_t>(threads));

    // Measures point i against the centres it has not seen, newest first, until it has seen them all or falls
    // below `next`.
    const auto catch_up = [&](int64_t i, const Best& next, Scratch& sc) {
      ++sc.stats.catch_ups;
      PointState& st = state[i];
      const auto selections = static_cast<int32_t>(centres.size());
      if (st.seen_until < selections) st.add_span(Span{st.seen_until, selections});
      st.seen_until = selections;
      while (st.spans > 0) {
        Span& s = st.span[st.spans - 1];
        uint32_t lanes = 0;
        int64_t first;
#if defined(PATCHCORE_VNNI_KERNEL)
        if (quantized)
          first = next_candidates_quantized(
              centres.codes(), centres.terms(), eight_bit.steps, eight_bit.codes.data() + i * eight_bit.steps,
              eight_bit.terms.data() + i * kQuantizedTerms, eight_bit.offsets[i], st.threshold, s.begin, s.end, &lanes);
        else
#endif
          first = next_candidates(levels, centres.groups(), values.data() + i * levels.stride, st.threshold, s.begin,
                                  s.end, &lanes);
        const int64_t done_from = first == kNone ? s.begin : std::max<int64_t>(s.begin, first);
        sc.stats.lower_bounds += s.end - done_from;
        s.end = static_cast<int32_t>(done_from);
        if (s.end == s.begin) --st.spans;
        int64_t found = 0;
        for (; lanes != 0; lanes &= lanes - 1) {
          const int64_t c = first + __builtin_ctz(lanes);
          sc.rows[found] = centres.row(c);
          sc.norms[found] = centres.norm(c);
          ++found;
        }
        if (found == 0) continue;
        distances_from_point(p.rows[i], p.norms[i], sc.rows, sc.norms, found, p.dim, sc.distances);
        sc.stats.exact_distances += found;
        const float old = st.score;
        for (int64_t k = 0; k < found; ++k) st.score = std::min(st.score, sc.distances[k]);
        if (st.score < old) {
          st.threshold = skip_threshold(st.score, margins);
          if (!better(Best{st.score, i}, next)) return;
        }
      }
    };

    // Starts fetching what a catch-up of point i reads first. The points of a round lie all over memory, and their
    // misses cost the loop a sixth of its time on magnetic_tile. Inlined: GCC deems a function of prefetches alone
    // free of effects and drops its calls.
    const auto fetch = [&](int64_t i) __attribute__((always_inline)) {
      __builtin_prefetch(&state[i]);
      __builtin_prefetch(&p.norms[i]);
      if (quantized) {
        for (int64_t k = 0; k < eight_bit.steps; k += 16)
          __builtin_prefetch(eight_bit.codes.data() + i * eight_bit.steps + k);
        __builtin_prefetch(eight_bit.terms.data() + i * kQuantizedTerms);
      } else {
        for (int64_t k = 0; k < levels.stride; k += 16) __builtin_prefetch(values.data() + i * levels.stride + k);
      }
      for (int64_t k = 0; k < p.dim; k += 16) __builtin_prefetch(p.data + i * p.dim + k);
    };
    std::vector<Best> round;
    while (static_cast<int64_t>(selected.size()) < count) {
      const Best top = queue.top();
      const PointState& st = state[top.index];
      if (st.spans == 0 && st.seen_until == centres.size()) {  // exact and above every upper bound: the argmax
        selected.push_back(top.index);
        centres.append(top.index, quantized ? nullptr : values.data() + top.index * levels.stride);
        continue;
      }
      // A round catches up the leading points at once, each until it falls below the best point outside it.
      round.clear();
      // Each thread's first point is fetched here; every catch-up then fetches the point `threads` places after
      // its own, which the threads take about when it is done. Fetching the whole round here, the other threads
      // waited for this loop's misses.
      for (int64_t k = 0; k < kRoundPerThread * threads && !queue.empty(); ++k) {
        round.push_back(queue.pop());
        if (k < threads) fetch(round.back().index);
      }
      const Best next = queue.empty() ? Best{} : queue.top();
      // The next point is most often caught up in the next round.
      if (!queue.empty()) fetch(next.index);
      parallel_for(
          static_cast<int64_t>(round.size()),
          [&](int64_t k, int worker) {
            if (k + threads < static_cast<int64_t>(round.size())) fetch(round[k + threads].index);
            catch_up(round[k].index, next, scratch[worker]);
          },
          threads);
      for (const Best& b : round) queue.push(Best{state[b.index].score, b.index});
    }
    for (const Scratch& sc : scratch) {
      total.exact_distances += sc.stats.exact_distances;
      total.lower_bounds += sc.stats.lower_bounds;
      total.catch_ups += sc.stats.catch_ups;
    }
  }
  if (stats) *stats = total;
  return selected;
}
}  // namespace patchcore

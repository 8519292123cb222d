#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "patchcore/core/parallel.h"
#include "patchcore/core/simd.h"
#include "pruning_index.h"

namespace patchcore::pruning {
namespace {

using simd::horizontal_sum;
using simd::lane_bits;
using simd::load8;
using simd::store8;
using simd::v8f;
using simd::v8i;

// Consecutive queries in one work item: two rows of a 28x28 patch grid. Items of one row read each cell's rows
// twice as often; items of four rows leave too few items to balance the threads.
constexpr int64_t kChunk = 56;
constexpr int64_t kGroup = 4;  // blocks whose first-tier bounds are computed together
// The dense search: a first tier bounded for every slot at once, then refined query by query. It costs about as much
// on every bank; the cell walk costs less where it refines fewer than about a tenth of the rows (tire: 2%,
// magnetic_tile: 42%). In float the first tier is the second tier's axes, one matrix product per block of queries
// (16 MB of dot products for 256 queries and 16,464 slots), refined kTask queries per task. Blocks of 256 queries
// rather than 128 cost magnetic_tile 8 to 12% less: OpenBLAS copies the slots' coordinates into its own layout once
// per product. Quantized, it is the third tier's axes, kQuantizedTask queries per pass over the quantized rows.
constexpr int64_t kQueryBlock = 256;
constexpr int64_t kTask = 8;
constexpr int64_t kQuantizedTask = 16;  // one 512-bit sum per query and group of slots: 16 of the 32 registers
constexpr int64_t kPrefetchAhead = 4;   // slots whose refined coordinates the dense search fetches ahead
constexpr double kDenseShare = 0.1;
constexpr int64_t kSampledItems = 2;  // items of queries the cell walk searches first, to choose between the two
constexpr float kInf = std::numeric_limits<float>::infinity();

// sum((a - b)^2) over n floats in 16 lanes. Every term is non-negative, so the relative error is at most
// relative_error_of_sum(n). Inlined into each clone of its callers, so that it is compiled for their target.
inline __attribute__((always_inline)) float sum_of_squared_differences(const float* a, const float* b, int64_t n) {
  v8f lo{}, hi{};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    v8f a0, a1, b0, b1;
    load8(a0, a + i);
    load8(a1, a + i + 8);
    load8(b0, b + i);
    load8(b1, b + i + 8);
    const v8f d0 = a0 - b0, d1 = a1 - b1;
    lo += d0 * d0;
    hi += d1 * d1;
  }
  float tail = 0.f;
  for (; i < n; ++i) {
    const float d = a[i] - b[i];
    tail += d * d;
  }
  return horizontal_sum(lo + hi) + tail;
}

PATCHCORE_SIMD_KERNEL float squared_distance(const float* a, const float* b, int64_t n) {
  return sum_of_squared_differences(a, b, n);
}

// First-tier bounds of a query against the blocks of 8 rows listed in `ids` (`count` of them, a multiple of
// kGroup): |q|^2 + |r|^2 - 2 q.r over the leading axes plus the squared difference of the remaining norms.
// → masks[i], a bit for each row of block ids[i] whose bound is at most `threshold`. The axes of a block are
// interleaved, so one broadcast query coordinate times one load serves 8 rows and the 8 dot products need no
// horizontal sums. The blocks of a group accumulate in independent chains, which keeps the FMA units busy
// where one chain would wait on each add's latency.
PATCHCORE_SIMD_KERNEL void first_tier(const float* blocks, const float* norms, const float* tails, const int32_t* ids,
                                      int64_t count, int64_t axes, const float* q, float q_norm, float q_tail,
                                      float threshold, uint8_t* masks) {
  static_assert(kGroup == 4, "one accumulator per block of a group");
  const int64_t stride = axes * kLanes;
  auto finish = [&](int64_t i, const v8f& dot) {
    v8f rn, rt;
    load8(rn, norms + ids[i] * kLanes);
    load8(rt, tails + ids[i] * kLanes);
    const v8f d = q_tail - rt;
    masks[i] = static_cast<uint8_t>(lane_bits(((q_norm + rn) - 2.0f * dot) + d * d <= threshold));
  };
  for (int64_t i = 0; i < count; i += kGroup) {
    const float* b0 = blocks + ids[i] * stride;
    const float* b1 = blocks + ids[i + 1] * stride;
    const float* b2 = blocks + ids[i + 2] * stride;
    const float* b3 = blocks + ids[i + 3] * stride;
    v8f acc0{}, acc1{}, acc2{}, acc3{};
    for (int64_t j = 0; j < axes; ++j) {
      v8f r0, r1, r2, r3;
      load8(r0, b0 + j * kLanes);
      load8(r1, b1 + j * kLanes);
      load8(r2, b2 + j * kLanes);
      load8(r3, b3 + j * kLanes);
      const float qj = q[j];
      acc0 += qj * r0;
      acc1 += qj * r1;
      acc2 += qj * r2;
      acc3 += qj * r3;
    }
    finish(i, acc0);
    finish(i + 1, acc1);
    finish(i + 2, acc2);
    finish(i + 3, acc3);
  }
}

// Box bounds of a query against 8 blocks at once, one per lane: the squared distance from the query's
// (leading axes, tail) point to each block's bounding box of its rows' points. → a bit per block whose bound is
// at most `threshold`. Lanes without a block have an empty box (low +inf, high -inf), whose bound is infinite:
// it passes an infinite threshold, so callers mask those lanes.
// The box holds each row's point, so the distance to it is at most the row's bound over these axes, and it
// moves by at most the query's representation error, like every tier's bound. Its float rounding is at most
// (axes / 2 + 5) units relative, two chains of non-negative terms.
PATCHCORE_SIMD_KERNEL uint32_t box_bounds(const float* low, const float* high, const float* tail_low,
                                          const float* tail_high, int64_t axes, const float* q, float q_tail,
                                          float threshold) {
  const v8f zero{};
  // Through a reference: a vector return value would change the ABI of the default clone.
  auto gap = [&](const float* lo, const float* hi, float x, v8f& g) {
    v8f l, h;
    load8(l, lo);
    load8(h, hi);
    const v8f below = l - x, above = x - h;
    g = below > above ? below : above;
    g = g > zero ? g : zero;
  };
  v8f acc0{}, acc1{}, g0, g1;
  int64_t j = 0;
  for (; j + 2 <= axes; j += 2) {
    gap(low + j * kLanes, high + j * kLanes, q[j], g0);
    gap(low + (j + 1) * kLanes, high + (j + 1) * kLanes, q[j + 1], g1);
    acc0 += g0 * g0;
    acc1 += g1 * g1;
  }
  if (j < axes) {
    gap(low + j * kLanes, high + j * kLanes, q[j], g0);
    acc0 += g0 * g0;
  }
  gap(tail_low, tail_high, q_tail, g0);
  return lane_bits((acc0 + acc1) + g0 * g0 <= threshold);
}

// |q - centre|^2 over the leading axes for 8 cells at once, one per lane, for `groups` groups of 8 interleaved
// centres → out[8 * groups]. Each lane sums in 4 chains of at most axes / 4 + 3 terms, so the relative error
// stays below relative_error_of_sum(axes) for the up to 32 first-tier axes.
PATCHCORE_SIMD_KERNEL void centre_distances(const float* centres, int64_t groups, int64_t axes, const float* q,
                                            float* out) {
  for (int64_t g = 0; g < groups; ++g) {
    const float* group = centres + g * axes * kLanes;
    v8f acc0{}, acc1{}, acc2{}, acc3{}, c0, c1, c2, c3;
    int64_t j = 0;
    for (; j + 4 <= axes; j += 4) {
      load8(c0, group + j * kLanes);
      load8(c1, group + (j + 1) * kLanes);
      load8(c2, group + (j + 2) * kLanes);
      load8(c3, group + (j + 3) * kLanes);
      c0 = q[j] - c0;
      c1 = q[j + 1] - c1;
      c2 = q[j + 2] - c2;
      c3 = q[j + 3] - c3;
      acc0 += c0 * c0;
      acc1 += c1 * c1;
      acc2 += c2 * c2;
      acc3 += c3 * c3;
    }
    for (; j < axes; ++j) {
      load8(c0, group + j * kLanes);
      c0 = q[j] - c0;
      acc0 += c0 * c0;
    }
    store8(out + g * kLanes, (acc0 + acc1) + (acc2 + acc3));
  }
}

// What the refinement reads of the bank, per slot.
struct RefineTiers {
  const float* coordinates;  // [slots, width]
  int64_t width;
  const float* tails[kTiers];  // per tier [slots]
  int64_t axes[kTiers];
  const int64_t* row_of_slot;
};

// A row that passed every tier, waiting for its exact distance.
struct Candidate {
  float bound;
  int64_t row;
  bool operator<(const Candidate& o) const { return bound > o.bound; }  // std's max-heap → lowest bound on top
};

// Slot s's bound extended past tier `tier` (0: from nothing), given `sum`, the squared differences of the tier's
// coordinates, and `bound`, that plus the squared difference of the norms beyond them: tier by tier while the bound
// stays within `threshold`, the squared differences of the tier's further coordinates and of the norms beyond them.
inline __attribute__((always_inline)) float extended_bound(const RefineTiers& bank, int64_t s, int tier, float sum,
                                                           float bound, const float* q, const float* q_tails,
                                                           float threshold) {
  const float* rc = bank.coordinates + s * bank.width;
  for (int64_t t = tier + 1, done = tier == 0 ? 0 : bank.axes[tier]; t < kTiers && bound <= threshold; ++t) {
    if (bank.axes[t] == bank.axes[t - 1]) continue;
    sum += sum_of_squared_differences(q + done, rc + done, bank.axes[t] - done);
    done = bank.axes[t];
    const float rest = q_tails[t] - bank.tails[t][s];
    bound = sum + rest * rest;
  }
  return bound;
}

// The rows whose first-tier bits are set in masks[i] for block ids[i], i < count, refined over the axes of each
// later tier: the squared difference of those coordinates plus that of the remaining norms. Appends the rows
// whose bounds stay at most `threshold` to `candidates`; returns how many rows it refined. One function per
// target, so the distances inline: a call per row and tier cost a third of the refinement.
PATCHCORE_SIMD_KERNEL int64_t refine(const RefineTiers& bank, const int32_t* ids, const uint8_t* masks, size_t count,
                                     const float* q, const float* q_tails, float threshold,
                                     std::vector<Candidate>& candidates) {
  int64_t refined = 0;
  for (size_t b = 0; b < count; ++b)
    for (uint32_t m = masks[b]; m != 0; m &= m - 1) {
      const int64_t s = ids[b] * kLanes + __builtin_ctz(m);
      // Padding slots have an infinite bound, which passes while fewer than k rows are found.
      if (bank.row_of_slot[s] < 0) continue;
      ++refined;
      const float bound = extended_bound(bank, s, 0, 0.f, 0.f, q, q_tails, threshold);
      if (bound <= threshold) candidates.push_back({bound, bank.row_of_slot[s]});
    }
  return refined;
}

// Dense first-tier bounds of one query against n slots in float: |q|^2 + |r|^2 - 2 q.r over the leading axes, given
// the dot products, plus the squared difference of the remaining norms. → bounds[n].
PATCHCORE_SIMD_KERNEL void dense_bounds(const float* dots, const float* norms, const float* tails, int64_t n,
                                        float q_norm, float q_tail, float* bounds) {
  int64_t r = 0;
  for (; r + kLanes <= n; r += kLanes) {
    v8f dot, rn, rt;
    load8(dot, dots + r);
    load8(rn, norms + r);
    load8(rt, tails + r);
    const v8f rest = q_tail - rt;
    store8(bounds + r, ((q_norm + rn) - 2.0f * dot) + rest * rest);
  }
  for (; r < n; ++r) {
    const float rest = q_tail - tails[r];
    bounds[r] = ((q_norm + norms[r]) - 2.0f * dots[r]) + rest * rest;
  }
}

// → lowest[kLanes], the slot with the lowest of the n bounds among those of each lane (slot % kLanes), or -1: the
// lowest bound of all is one of them.
PATCHCORE_SIMD_KERNEL void lowest_of_lanes(const float* bounds, int64_t n, int32_t* lowest) {
  v8f best = v8f{} + kInf;
  v8i best_slot = v8i{} - 1, slot = {0, 1, 2, 3, 4, 5, 6, 7};
  int64_t r = 0;
  for (; r + kLanes <= n; r += kLanes, slot += static_cast<int32_t>(kLanes)) {
    v8f b;
    load8(b, bounds + r);
    const v8i lower = b < best;
    best = lower ? b : best;
    best_slot = lower ? slot : best_slot;
  }
  std::memcpy(lowest, &best_slot, sizeof best_slot);
  for (; r < n; ++r) {
    int32_t& lane = lowest[r % kLanes];
    if (bounds[r] < (lane < 0 ? kInf : bounds[lane])) lane = static_cast<int32_t>(r);
  }
}

// Up to kQuantizedTask queries of the quantized dense tier (PruningIndex::quantized_rows): per query its codes
// q~ = round(c / s) over the tier's axes, four to an int32, its scale s, |c|^2, |c - s q~| and |s q~| (both rounded
// up), its tail, and 128 * sum(q~), which the rows' offset of 128 adds to each sum of products.
struct QuantizedQueries {
  // [quantized_axes / 4][kQuantizedTask], step by step: the 16 products of a step then read their codes through one
  // register, where 16 pointers, one per query, would not fit in the integer registers beside the loop's own.
  std::vector<int32_t> codes;
  float scale[kQuantizedTask], norm[kQuantizedTask], error[kQuantizedTask], length[kQuantizedTask],
      tail[kQuantizedTask];
  int32_t offset[kQuantizedTask];
};

#if defined(PATCHCORE_VNNI_KERNEL)
// Quantized dense bounds of kQuantizedTask queries against every slot: → bounds[i * stride + slot], quantized_bound
// plus the tails' term. Its float roundings are those of the float tier's, a few units of (|q| + |r|)^2.
PATCHCORE_VNNI_KERNEL void quantized_bounds(const PruningIndex& p, const QuantizedQueries& q, float* bounds,
                                            int64_t stride) {
  constexpr int64_t lanes = kQuantizedLanes;
  const int64_t steps = p.quantized_axes / 4, groups = p.quantized_groups();
  const int32_t* codes = q.codes.data();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* rows = p.quantized_rows.data() + g * steps * lanes * 4;
    __m512i sums[kQuantizedTask];
    for (auto& sum : sums) sum = _mm512_setzero_si512();
    for (int64_t k = 0; k < steps; ++k) {
      const __m512i row = _mm512_loadu_si512(rows + k * lanes * 4);
      const int32_t* step = codes + k * kQuantizedTask;
#pragma GCC unroll 16
      for (int64_t i = 0; i < kQuantizedTask; ++i) sums[i] = dpbusd(sums[i], row, step + i);
    }
    const float* terms = p.quantized_terms.data() + g * kQuantizedTerms * lanes;
    const __m512 scale = _mm512_loadu_ps(terms + kScale * lanes), norm = _mm512_loadu_ps(terms + kNorm * lanes),
                 length = _mm512_loadu_ps(terms + kLength * lanes), error = _mm512_loadu_ps(terms + kError * lanes),
                 tail = _mm512_loadu_ps(terms + kTail * lanes);
#pragma GCC unroll 16
    for (int64_t i = 0; i < kQuantizedTask; ++i) {
      const __m512 head = quantized_bound(sums[i], q.offset[i], q.norm[i], q.scale[i], q.error[i], q.length[i], norm,
                                          scale, length, error);
      const __m512 rest = _mm512_sub_ps(_mm512_set1_ps(q.tail[i]), tail);
      _mm512_storeu_ps(bounds + i * stride + g * lanes, _mm512_add_ps(head, _mm512_mul_ps(rest, rest)));
    }
  }
}
#endif

// For each set of passing lanes (bit l for lane l), the passing lanes first, in order.
struct LanePacks {
  int32_t order[256][kLanes];
  constexpr LanePacks() : order{} {
    for (int bits = 0; bits < 256; ++bits) {
      int at = 0;
      for (int lane = 0; lane < kLanes; ++lane)
        if (bits & (1 << lane)) order[bits][at++] = lane;
    }
  }
};
constexpr LanePacks kLanePacks;

// The slots whose bound is at most `threshold`, in slot order → slots; returns how many. Without branches: whether a
// slot passes is unpredictable. Each 8 slots are written whole, the passing ones first (their lanes from a table,
// plus the first slot), and the count advances past those only; the writes stay within slots[n].
PATCHCORE_SIMD_KERNEL int64_t slots_within(const float* bounds, int64_t n, float threshold, int32_t* slots) {
  int64_t count = 0, r = 0;
  for (; r + kLanes <= n; r += kLanes) {
    v8f b;
    load8(b, bounds + r);
    const uint32_t pass = lane_bits(b <= threshold);
    v8i packed;
    std::memcpy(&packed, kLanePacks.order[pass], sizeof packed);
    packed += static_cast<int32_t>(r);
    std::memcpy(slots + count, &packed, sizeof packed);
    count += __builtin_popcount(pass);
  }
  for (; r < n; ++r) {
    slots[count] = static_cast<int32_t>(r);
    count += bounds[r] <= threshold ? 1 : 0;
  }
  return count;
}

// Asks for the cache lines of [data, data + bytes) to be fetched.
inline void prefetch(const float* data, size_t bytes) {
  const char* begin = reinterpret_cast<const char*>(data);
  for (size_t at = 0; at < bytes; at += 64) __builtin_prefetch(begin + at);
}

// The dense search's refinement of a slot past the dense tier `tier`, whose bound (`bound`) carries that tier's error.
PATCHCORE_SIMD_KERNEL float dense_refined_bound(const RefineTiers& bank, int64_t slot, int tier, float bound,
                                                const float* q, const float* q_tails, float threshold) {
  const float rest = q_tails[tier] - bank.tails[tier][slot];
  return extended_bound(bank, slot, tier, bound - rest * rest, bound, q, q_tails, threshold);
}

// A slot's bound over every tier computed in float from its coordinates, without the dense tier's error.
PATCHCORE_SIMD_KERNEL float refined_bound(const RefineTiers& bank, int64_t slot, const float* q, const float* q_tails,
                                          float threshold) {
  return extended_bound(bank, slot, 0, 0.f, 0.f, q, q_tails, threshold);
}

struct Neighbour {
  float distance;
  int64_t row;
  bool operator<(const Neighbour& o) const { return distance < o.distance || (distance == o.distance && row < o.row); }
};

// The state of one query's search.
struct Query {
  const float* features;  // as given, [d]
  const float* coords;    // rotated, [width]
  double norm = 0.0;      // centred
  float first_norm = 0.f, box_tail = 0.f, tails[kTiers] = {};
  double slack = 0.0, first_absolute = 0.0;
  float first_threshold = kInf, refine_threshold = kInf;
  double reach2 = std::numeric_limits<double>::infinity();  // square of the reach the thresholds encode
  std::vector<Neighbour> best;                              // max-heap of the k best so far
  int64_t seed_cell = 0;
};

// What every worker of one search call reads: the index, the queries and the rounding margins.
struct Search {
  const PruningIndex& p;
  int64_t k;
  const float* rows;           // queries as given, [nq, d]
  const float* centred;        // minus the bank's mean, [nq, d]
  const float* coords;         // rotated, [nq, width]
  int64_t width;               // of the rotation: the tiers beyond it are not used
  int64_t levels[kTiers + 1];  // the index's tail levels, clamped to width
  int64_t nq;
  float* out_distances;  // [nq, k]
  int64_t* out_indices;  // [nq, k]
  RefineTiers tiers;
  // Float GEMM of length d: at most (d + 2) units per coordinate relative to |x|, plus rounding the basis.
  double coordinate_error_factor;
  double exact_error, refine_error;
  // Also covers the cell bounds: their float |q - centre|^2 is off by at most relative_error_of_sum(first),
  // which moves gap^2 by at most that times (|q| + |centre|)^2, within first_absolute. And the box bounds:
  // (box_axes / 2 + 5) units relative, below (first + 8) as box_axes <= first.
  double first_error;
  // The dense first tier's |q|^2 + |r|^2 - 2 q.r: in float over axes[1], the dot product, in whatever order the
  // matrix product sums it, is off by at most axes[1] units of |q| |r|; quantized, it is off by the quantization,
  // which the bound subtracts, and two roundings. The norms, the tail term, the sums, and taking the tail term off
  // again to refine, by a few units of (|q| + |r|)^2 each: all of it within dense_error (|q| + dense_reach)^2.
  double dense_error;

  Search(const PruningIndex& index, int64_t neighbours, const at::Tensor& queries, const at::Tensor& centred_queries,
         const at::Tensor& rotated, at::Tensor& distances, at::Tensor& indices)
      : p(index),
        k(neighbours),
        rows(queries.data_ptr<float>()),
        centred(centred_queries.data_ptr<float>()),
        coords(rotated.data_ptr<float>()),
        width(rotated.size(1)),
        nq(queries.size(0)),
        out_distances(distances.data_ptr<float>()),
        out_indices(indices.data_ptr<int64_t>()),
        tiers{index.coordinates.data(), index.width(), {}, {}, index.row_of_slot.data()},
        coordinate_error_factor(std::sqrt(static_cast<double>(rotated.size(1))) * ((index.dim + 2) * 1.01 + 1.0) *
                                kFloatUnit),
        exact_error(relative_error_of_sum(index.dim) + 2.0 * kFloatUnit),
        refine_error(relative_error_of_sum(index.width()) + 4.0 * kFloatUnit),
        first_error(std::max((index.axes[0] + 8) * kFloatUnit * 1.01, relative_error_of_sum(index.axes[0]))),
        dense_error((index.axes[1] + 24) * kFloatUnit * 1.01) {
    for (int t = 0; t < kTiers; ++t) {
      tiers.tails[t] = index.tails[t].data();
      tiers.axes[t] = std::min(index.axes[t], width);  // a tier of no further axes is passed over
    }
    for (int t = 0; t <= kTiers; ++t) levels[t] = std::min(index.tail_levels[t], width);
  }
};

// One worker's searches, work item by work item, with its scratch reused between them.
class Searcher {
 public:
  explicit Searcher(const Search& search)
      : s_(&search),
        p_(search.p),
        cell_count_(static_cast<int64_t>(search.p.cells.size())),
        queries_(static_cast<size_t>(kChunk)),
        cell_bounds_(static_cast<size_t>(kChunk * cell_count_)),
        cell_order_(static_cast<size_t>(cell_count_)),
        to_centres_(static_cast<size_t>((cell_count_ + kLanes - 1) / kLanes * kLanes)) {}

  // A work item is two rows of the patch grid (`ids`, at most kChunk queries). Its queries look alike and need
  // mostly the same cells, so the cells are visited in one order for all of them and each cell's rows are read from
  // memory once for the whole item rather than once per query. The walk gives up once it has refined more than
  // `budget` rows, leaving the item's results unwritten, and says whether it finished.
  bool search_item(const int64_t* ids, int64_t count, int64_t budget = std::numeric_limits<int64_t>::max()) {
    const int64_t refined_before = refined;
    for (int64_t i = 0; i < count; ++i) {
      start(queries_[i], ids[i], cell_bounds_.data() + i * cell_count_);
      // The cell with the nearest centre first: it most often holds the nearest row, so the threshold is tight
      // before the shared walk. (The cell with the lowest bound favours wide cells, which hold it less often.)
      visit(queries_[i], queries_[i].seed_cell);
    }
    // Cells by their lowest bound over the item's queries. Once that exceeds every query's threshold, no later
    // cell can hold a neighbour of any of them.
    for (int64_t ci = 0; ci < cell_count_; ++ci) {
      float lowest = kInf;
      for (int64_t i = 0; i < count; ++i) lowest = std::min(lowest, cell_bounds_[i * cell_count_ + ci]);
      cell_order_[ci] = {lowest, ci};
    }
    std::sort(cell_order_.begin(), cell_order_.end());
    for (const auto& [lowest, ci] : cell_order_) {
      float loosest = 0.f;
      for (int64_t i = 0; i < count; ++i) loosest = std::max(loosest, queries_[i].first_threshold);
      if (lowest > loosest) break;
      if (refined - refined_before > budget) return false;
      for (int64_t i = 0; i < count; ++i) {
        Query& query = queries_[i];
        if (ci == query.seed_cell || cell_bounds_[i * cell_count_ + ci] > query.first_threshold) continue;
        visit(query, ci);
      }
    }
    for (int64_t i = 0; i < count; ++i) finish(queries_[i], ids[i]);
    return true;
  }

  // Query qi (started) by the dense search, given its bounds from the dense tier `tier` for every slot, which it
  // overwrites. The k lowest bounds, which most often hold the nearest rows, get their exact distances first; the
  // slots within the threshold they set are then refined, and those that stay within it get their exact distances
  // lowest bound first, as in the walk's cells: on magnetic_tile that computes 16 exact distances per query where
  // taking them in slot order computes 32.
  void search_dense(Query& query, int64_t qi, float* bounds, int tier) {
    const int64_t n = p_.slots, width = p_.width();
    const double absolute = s_->dense_error * std::pow(query.norm + query.slack + p_.dense_reach, 2.0);
    int32_t lowest[kLanes];
    lowest_of_lanes(bounds, n, lowest);
    // The lowest bound of each lane, lowest first; the first is the lowest of all, and most often the nearest row's.
    std::sort(lowest, lowest + kLanes, [&](int32_t a, int32_t b) {
      if (a < 0 || b < 0) return b < 0 && a >= 0;
      return bounds[a] < bounds[b] || (bounds[a] == bounds[b] && a < b);
    });
    for (int64_t i = 0; i < std::min(s_->k, kLanes) && lowest[i] >= 0; ++i) {
      // Not refined again below: NaN passes no threshold, not even the infinite one of fewer than k rows.
      bounds[lowest[i]] = std::numeric_limits<float>::quiet_NaN();
      consider(query, p_.row_of_slot[lowest[i]]);
    }
    // Thresholds for these bounds: they carry the first tier's absolute error.
    auto threshold = [&](double relative) { return round_up_to_float(query.reach2 * (1.0 + relative) + absolute); };
    const float first_threshold = threshold(s_->dense_error), refine_threshold = threshold(s_->refine_error);
    dense_passing_.resize(static_cast<size_t>(n));
    const int64_t count = slots_within(bounds, n, first_threshold, dense_passing_.data());
    const float* q = query.coords;
    // The slots left are read all over the coordinates: fetching a few slots ahead hides most of the memory latency.
    const int64_t refined_from = p_.axes[tier];
    const size_t refined_bytes = static_cast<size_t>(p_.axes[tier + 1] - refined_from) * sizeof(float);
    candidates_.clear();
    for (int64_t i = 0; i < count; ++i) {
      if (i + kPrefetchAhead < count)
        prefetch(p_.coordinates.data() + dense_passing_[i + kPrefetchAhead] * width + refined_from, refined_bytes);
      const int64_t slot = dense_passing_[i];
      if (dense_refined_bound(s_->tiers, slot, tier, bounds[slot], q, query.tails, refine_threshold) > refine_threshold)
        continue;
      // The dense tier's error, quantization included, stays in that bound: the same bound in float is tighter.
      const float bound = refined_bound(s_->tiers, slot, q, query.tails, query.refine_threshold);
      if (bound <= query.refine_threshold) candidates_.push_back({bound, p_.row_of_slot[slot]});
    }
    refined += count;
    consider_candidates(query);
    finish(query, qi);
  }

  // Queries [begin, end) (at most kTask) by the dense search in float, given their dot products with every slot over
  // the second tier's axes, `dots` rows apart; `done` says which queries the walk has searched.
  void search_dense_float(int64_t begin, int64_t end, const float* dots, int64_t stride, const char* done) {
    const int64_t n = p_.slots, axes = p_.axes[1];
    bounds_.resize(static_cast<size_t>(n));
    for (int64_t qi = begin; qi < end; ++qi) {
      if (done[qi]) continue;
      Query& query = queries_[0];
      start_query(query, qi);
      double q_norm = 0.0;
      for (int64_t j = 0; j < axes; ++j) q_norm += static_cast<double>(query.coords[j]) * query.coords[j];
      dense_bounds(dots + (qi - begin) * stride, p_.dense_norms.data(), p_.tails[1].data(), n,
                   static_cast<float>(q_norm), query.tails[1], bounds_.data());
      search_dense(query, qi, bounds_.data(), 1);
    }
  }

#if defined(PATCHCORE_VNNI_KERNEL)
  // Queries [begin, end) (at most kQuantizedTask) by the dense search on the quantized tier; `done` says which
  // queries the walk has searched.
  void search_dense_quantized(int64_t begin, int64_t end, const char* done) {
    const int64_t stride = p_.quantized_groups() * kQuantizedLanes, axes = p_.axes[2];
    const int64_t steps = p_.quantized_axes / 4;
    bounds_.resize(static_cast<size_t>(kQuantizedTask * stride));
    QuantizedQueries& q = quantized_;
    q.codes.assign(static_cast<size_t>(kQuantizedTask * steps), 0);
    for (int64_t i = 0; i < kQuantizedTask; ++i) {
      q.scale[i] = 1.0f;
      q.norm[i] = q.error[i] = q.length[i] = q.tail[i] = 0.0f;
      q.offset[i] = 0;
      const int64_t qi = begin + i;
      if (qi >= end || done[qi]) continue;
      start_query(queries_[i], qi);
      auto* bytes = reinterpret_cast<int8_t*>(q.codes.data());
      const Quantized quantized = quantize(queries_[i].coords, axes, [&](int64_t a, int32_t code) {
        bytes[((a / 4) * kQuantizedTask + i) * 4 + a % 4] = static_cast<int8_t>(code);
      });
      q.scale[i] = quantized.scale;
      q.norm[i] = static_cast<float>(quantized.squared);
      q.error[i] = quantized.error;
      q.length[i] = quantized.length;
      q.tail[i] = queries_[i].tails[2];
      q.offset[i] = 128 * quantized.sum;
    }
    quantized_bounds(p_, q, bounds_.data(), stride);
    for (int64_t qi = begin; qi < end; ++qi)
      if (!done[qi]) search_dense(queries_[qi - begin], qi, bounds_.data() + (qi - begin) * stride, 2);
  }
#endif

  // Serves `search`, the same queries with the same index, from now on: the dense search's own rotation and tiers.
  void switch_to(const Search& search) { s_ = &search; }

  int64_t refined = 0;  // rows whose first-tier bound did not exclude them
  int64_t exact = 0;    // rows whose exact distance was computed

 private:
  // Prepares query qi: its features, coordinates, norm, tails and error margins.
  void start_query(Query& query, int64_t qi) {
    const int64_t d = p_.dim, first = p_.axes[0];
    query.features = s_->rows + qi * d;
    query.coords = s_->coords + qi * s_->width;
    const float* xc = s_->centred + qi * d;
    const float* c = query.coords;
    double squared = 0.0;
    for (int64_t j = 0; j < d; ++j) squared += static_cast<double>(xc[j]) * xc[j];
    query.norm = std::sqrt(squared);
    const double coordinate_error = s_->coordinate_error_factor * query.norm;
    float level_tails[kTiers + 1];
    const double worst_tail =
        tails_beyond(c, squared, d, s_->levels, level_tails, query.norm, coordinate_error, kFloatUnit);
    query.box_tail = level_tails[0];
    std::copy(level_tails + 1, level_tails + kTiers + 1, query.tails);
    double first_norm = 0.0;
    for (int64_t j = 0; j < first; ++j) first_norm += static_cast<double>(c[j]) * c[j];
    query.first_norm = static_cast<float>(first_norm);
    // + 2 units of the norm: centring the query in float moves it by at most one.
    query.slack = (coordinate_error + 2.0 * kFloatUnit * query.norm + worst_tail) * 1.01 + p_.row_error;
    query.first_absolute = s_->first_error * std::pow(std::sqrt(first_norm) + p_.first_tier_norm, 2.0);
    query.first_threshold = query.refine_threshold = kInf;
    query.reach2 = std::numeric_limits<double>::infinity();
    query.best.clear();
    query.best.reserve(static_cast<size_t>(s_->k));
  }

  // Writes query qi's k best, nearest first.
  void finish(Query& query, int64_t qi) {
    std::vector<Neighbour>& best = query.best;
    std::sort_heap(best.begin(), best.end());
    for (int64_t j = 0; j < s_->k; ++j) {
      s_->out_distances[qi * s_->k + j] = best[j].distance;
      s_->out_indices[qi * s_->k + j] = best[j].row;
    }
  }

  // Prepares query qi for the cell walk: start_query, the bound of every cell (into row_bounds), and the cell with
  // the nearest centre as its seed.
  void start(Query& query, int64_t qi, float* row_bounds) {
    start_query(query, qi);
    const int64_t first = p_.axes[0];
    const float* c = query.coords;
    // Bound of every cell: |q - centre| - radius over the first-tier axes, and the gap between the query's tail
    // and the cell's range of tails.
    double nearest = kInf;
    centre_distances(p_.centres.data(), (cell_count_ + kLanes - 1) / kLanes, first, c, to_centres_.data());
    for (int64_t ci = 0; ci < cell_count_; ++ci) {
      const Cell& cell = p_.cells[ci];
      const double to_centre = to_centres_[ci];
      const double gap = std::max(0.0, std::sqrt(to_centre) - cell.radius);
      const double tail_gap = std::max({0.0, static_cast<double>(cell.tail_low) - query.tails[0],
                                        static_cast<double>(query.tails[0]) - cell.tail_high});
      row_bounds[ci] = static_cast<float>(gap * gap + tail_gap * tail_gap);
      if (to_centre < nearest) {
        nearest = to_centre;
        query.seed_cell = ci;
      }
    }
  }

  // Every row of one cell against one query: first-tier bounds for all, then the refined bounds for those that
  // pass. Rows that pass every tier get their exact distance lowest bound first: each one found can only lower
  // the threshold, so the rows whose bound it then exceeds never need their 4 KiB read from the bank. With the
  // seed cell first, this computes about 9.6 exact distances per query on tire, where taking rows in slot order
  // computes 36.
  void visit(Query& query, int64_t ci) {
    const Cell& cell = p_.cells[ci];
    const int64_t blocks = (cell.end - cell.begin) / kLanes, first_block = cell.begin / kLanes;
    const int64_t box_axes = p_.box_axes;
    passing_.clear();
    for (int64_t g = 0; g * kLanes < blocks; ++g) {
      const int64_t box = cell.box_group + g;
      // Lanes past the cell's last block hold empty boxes, which pass an infinite threshold.
      const uint32_t lanes = (1u << std::min(kLanes, blocks - g * kLanes)) - 1;
      for (uint32_t bits =
               lanes & box_bounds(p_.box_low.data() + box * box_axes * kLanes,
                                  p_.box_high.data() + box * box_axes * kLanes, p_.box_tail_low.data() + box * kLanes,
                                  p_.box_tail_high.data() + box * kLanes, box_axes, query.coords, query.box_tail,
                                  query.first_threshold);
           bits != 0; bits &= bits - 1)
        passing_.push_back(static_cast<int32_t>(first_block + g * kLanes + __builtin_ctz(bits)));
    }
    if (passing_.empty()) return;
    const size_t count = passing_.size();
    passing_.resize((count + kGroup - 1) / kGroup * kGroup, static_cast<int32_t>(p_.padding_block));
    masks_.resize(passing_.size());
    first_tier(p_.blocks.data(), p_.norms.data(), p_.tails[0].data(), passing_.data(),
               static_cast<int64_t>(passing_.size()), p_.axes[0], query.coords, query.first_norm, query.tails[0],
               query.first_threshold, masks_.data());
    candidates_.clear();
    refined += refine(s_->tiers, passing_.data(), masks_.data(), count, query.coords, query.tails,
                      query.refine_threshold, candidates_);
    consider_candidates(query);
  }

  // The exact distances of the candidates, lowest bound first, while their bounds stay within the threshold, which
  // each one can lower.
  void consider_candidates(Query& query) {
    std::make_heap(candidates_.begin(), candidates_.end());
    while (!candidates_.empty() && candidates_.front().bound <= query.refine_threshold) {
      const int64_t row = candidates_.front().row;
      std::pop_heap(candidates_.begin(), candidates_.end());
      candidates_.pop_back();
      consider(query, row);
    }
  }

  // Row r's exact distance to the query, kept if it is among the k best so far. A row can be skipped when its
  // bound, less the bound's rounding, exceeds the square of (the k-th distance's largest true value + both
  // vectors' representation errors), which the thresholds encode.
  void consider(Query& query, int64_t r) {
    ++exact;
    const int64_t d = p_.dim;
    const Neighbour candidate{squared_distance(query.features, p_.rows + r * d, d), r};
    std::vector<Neighbour>& best = query.best;
    if (static_cast<int64_t>(best.size()) < s_->k) {
      best.push_back(candidate);
      std::push_heap(best.begin(), best.end());
    } else if (candidate < best.front()) {
      std::pop_heap(best.begin(), best.end());
      best.back() = candidate;
      std::push_heap(best.begin(), best.end());
    } else {
      return;
    }
    if (static_cast<int64_t>(best.size()) < s_->k) return;
    const double reach = std::sqrt(best.front().distance * (1.0 + s_->exact_error)) + query.slack;
    query.reach2 = reach * reach;
    query.refine_threshold = round_up_to_float(reach * reach * (1.0 + s_->refine_error));
    query.first_threshold = round_up_to_float(reach * reach * (1.0 + s_->first_error) + query.first_absolute);
  }

  const Search* s_;
  const PruningIndex& p_;
  int64_t cell_count_;
  std::vector<Query> queries_;
  std::vector<float> cell_bounds_;  // [query, cell]
  std::vector<std::pair<float, int64_t>> cell_order_;
  std::vector<float> to_centres_;
  std::vector<int32_t> passing_;  // blocks of a cell whose box passed, then padding to a whole group
  std::vector<uint8_t> masks_;
  std::vector<Candidate> candidates_;  // min-heap by bound
  std::vector<float> bounds_;          // the dense search's bounds, [queries of a task][slots]
  QuantizedQueries quantized_;
  std::vector<int32_t> dense_passing_;  // the slots its first tier passes, [slots]
};

}  // namespace

std::pair<at::Tensor, at::Tensor> search(const PruningIndex& p, int64_t k, const at::Tensor& queries, int max_threads,
                                         bool quantized_products, SearchHistory* history, SearchCounts* counts) {
  if (!all_finite(queries.data_ptr<float>(), queries.numel()))
    throw std::invalid_argument("ExactPrunedNN: query features contain NaN or infinite values");
  const int64_t nq = queries.size(0);
  const at::Tensor centred = (queries - p.mean).contiguous();
  // The cell walk over a few items of queries spread evenly over the call measures how well the cells prune this
  // bank for them: where it refines more than kDenseShare of the rows per query, the dense search costs less. A
  // sampled item stops at that share, so that a bank the cells prune poorly costs little walking, and the dense
  // search takes the rest of the call when at least half of the sampled items stopped; the queries of the items that
  // finished keep their results. The samples are spread rather than contiguous: the cells prune an image's top rows
  // better than the rest, and a contiguous item in the middle of a call of 4 or 8 images is such rows (magnetic_tile
  // then kept the walk, 4 times slower there, for every call).
  // Where the bank's calls keep choosing the dense search, the sample, which that search then repeats, is spared
  // (SearchHistory): on magnetic_tile it costs about an eighth of a call.
  const int64_t call = history ? history->calls.fetch_add(1, std::memory_order_relaxed) : 0;
  const bool trusted = history &&
                       history->dense_in_a_row.load(std::memory_order_relaxed) >= SearchHistory::kTrustedChoices &&
                       call % SearchHistory::kResampleEvery != 0;
  // The walk leaves few rows to its last tier, so it stops a tier short and rotates the queries to fewer axes: on
  // tire the wider rotation cost more than the exact distances it spared. A call that takes the dense search at
  // once rotates them to every axis in one product.
  const int64_t walk_width = p.axes[kTiers - 2];
  const at::Tensor rotated =
      centred.mm(p.basis.slice(1, 0, trusted ? p.width() : walk_width)).contiguous();  // float GEMM
  at::Tensor distances = at::empty({nq, k}, at::kFloat);
  at::Tensor indices = at::empty({nq, k}, at::kLong);
  const Search search(p, k, queries, centred, rotated, distances, indices);
  const int64_t chunks = (nq + kChunk - 1) / kChunk;
  std::vector<Searcher> searchers(static_cast<size_t>(parallel_threads(std::max(chunks, nq / kTask), max_threads)),
                                  Searcher(search));
  const int64_t sampled = trusted ? 0 : std::min(nq, kSampledItems);
  const int64_t sample_size = sampled > 0 ? std::min(kChunk, nq / sampled) : 0;
  auto share = [&](int64_t queries) {
    return static_cast<int64_t>(kDenseShare * static_cast<double>(queries) * static_cast<double>(p.count));
  };
  std::vector<char> done(static_cast<size_t>(nq), 0);  // per query: searched by the walk
  std::vector<char> finished(static_cast<size_t>(sampled), 0);
  parallel_for(
      sampled,
      [&](int64_t i, int worker) {
        // Item i holds every sampled-th query of an even spacing of the call, starting at its i-th.
        std::vector<int64_t> ids(static_cast<size_t>(sample_size));
        for (int64_t j = 0; j < sample_size; ++j) ids[j] = (j * sampled + i) * nq / (sample_size * sampled);
        finished[i] = searchers[worker].search_item(ids.data(), sample_size, share(sample_size));
        if (finished[i])
          for (int64_t q : ids) done[q] = 1;
      },
      max_threads);
  int64_t stopped = 0;
  for (int64_t i = 0; i < sampled; ++i) stopped += finished[i] ? 0 : 1;
  const bool dense = 2 * stopped >= sampled;
  if (history && !trusted) {
    if (dense)
      history->dense_in_a_row.fetch_add(1, std::memory_order_relaxed);
    else
      history->dense_in_a_row.store(0, std::memory_order_relaxed);
  }
  const auto counted = [&] {
    if (counts) {
      if (dense) counts->dense += nq - std::count(done.begin(), done.end(), 1);
      for (const Searcher& searcher : searchers) {
        counts->refined += searcher.refined;
        counts->exact += searcher.exact;
      }
    }
    return std::make_pair(distances, indices);
  };
  if (!dense) {
    parallel_for(
        chunks,
        [&](int64_t chunk, int worker) {
          int64_t ids[kChunk], count = 0;
          for (int64_t q = chunk * kChunk; q < std::min(nq, (chunk + 1) * kChunk); ++q)
            if (!done[q]) ids[count++] = q;
          if (count > 0) searchers[worker].search_item(ids, count);
        },
        max_threads);
  } else {
    const int64_t width = rotated.size(1);
    const at::Tensor all_axes =
        width == p.width() ? rotated : at::cat({rotated, centred.mm(p.basis.slice(1, width, p.width()))}, 1).contiguous();
    const Search dense_search(p, k, queries, centred, all_axes, distances, indices);
    for (Searcher& searcher : searchers) searcher.switch_to(dense_search);
#if defined(PATCHCORE_VNNI_KERNEL)
    if (quantized_products && !p.quantized_rows.empty()) {
      parallel_for((nq + kQuantizedTask - 1) / kQuantizedTask,
                   [&](int64_t task, int worker) {
                     const int64_t begin = task * kQuantizedTask;
                     searchers[worker].search_dense_quantized(begin, std::min(nq, begin + kQuantizedTask), done.data());
                   },
                   max_threads);
      return counted();
    }
#endif
    const at::Tensor left = rotated.slice(1, 0, p.axes[1]);
    const at::Tensor right = at::from_blob(const_cast<float*>(p.coordinates.data()), {p.slots, p.width()}, at::kFloat)
                                 .slice(1, 0, p.axes[1])
                                 .t();
    at::Tensor dots = at::empty({std::min(nq, kQueryBlock), p.slots}, at::kFloat);
    for (int64_t begin = 0; begin < nq; begin += kQueryBlock) {
      const int64_t end = std::min(nq, begin + kQueryBlock);
      at::Tensor block = dots.slice(0, 0, end - begin);
      at::mm_out(block, left.slice(0, begin, end), right);
      parallel_for((end - begin + kTask - 1) / kTask,
                   [&](int64_t task, int worker) {
                     const int64_t first = begin + task * kTask;
                     searchers[worker].search_dense_float(first, std::min(end, first + kTask),
                                                          block.data_ptr<float>() + (first - begin) * p.slots, p.slots,
                                                          done.data());
                   },
                   max_threads);
    }
  }
  return counted();
}

}  // namespace patchcore::pruning

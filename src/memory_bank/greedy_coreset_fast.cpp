#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <queue>
#include <utility>
#include <vector>

#include "coreset_points.h"
#include "patchcore/core/linalg.h"
#include "patchcore/core/numeric.h"
#include "patchcore/core/parallel.h"
#include "patchcore/core/simd.h"
#include "patchcore/memory_bank/greedy_coreset.h"

namespace patchcore {

using coreset::Best;
using coreset::better;
using coreset::distance_kernel;
using coreset::Points;
using simd::lane_bits;
using simd::load8;
using simd::v8f;

// The straightforward loop (greedy_coreset.cpp) measures every point against every new centre, yet a score only drops
// when the new centre lands inside the point's current radius (for PatchCore features about 0.3% of the points per
// selection). The fast loop rules points out with cheap lower bounds on their distance to the new centre and
// computes the exact distance (same kernel, same bits) only for the others:
//  - Points are expressed in the leading principal directions of the data (an orthonormal basis from the
//    covariance of a sample). For orthonormal rows P with complement Q, |z - c|^2 = |P(z - c)|^2 + |Q(z - c)|^2
//    >= |Pz - Pc|^2 + (|Qz| - |Qc|)^2, so k coordinates plus the residual norm |Qz| bound the distance from
//    below, tighter as k grows; the bound is tried with k = 8, 16, 32, 64 in turn, each reusing the last sum,
//    on eight points at a time.
//  - Points are ordered along a k-d tree of their first-level values (kd_order). Each leaf block, and each group of
//  eight
//    slots in it, keeps its bounding box and the largest threshold of its points, so one box distance rules out
//    a whole block or group.
//  - The argmax is a max-tree over the blocks' best points, (score, row) ordered so ties go to the first row.
//  - Each pass over the data serves a batch of speculated centres (see greedy_coreset_fast).
//
// Exactness: a point is skipped only when its bound proves that the computed distance is >= its score, so
// min(score, distance) keeps the score bit for bit and both loops select the same rows. The proof covers the
// floats: Points::delta bounds the kernel's rounding of squared distances (computed distance >= s whenever the
// exact one is >= sqrt(s^2 + delta), up to 1 + kMargin for the sqrt roundings); kEta * max |z| bounds the error
// of the stored coordinates and residual norms (computed in double from an orthonormalised basis, then rounded
// to float); kBoundSlack bounds the relative rounding of the float sums of squares that evaluate the bounds.
// skip_threshold folds all of it into one squared value per point.
namespace {

// Max-tree over the blocks' best points: the root is the global argmax (first index on ties), kept up to date
// in O(log blocks) per changed block instead of a scan over all points.
class BestTree {
 public:
  explicit BestTree(int64_t leaves) {
    size_ = 1;
    while (size_ < leaves) size_ *= 2;
    nodes_.assign(static_cast<size_t>(2 * size_), Best{});
  }
  void set(int64_t leaf, Best value) {
    int64_t i = leaf + size_;
    nodes_[i] = value;
    for (i /= 2; i >= 1; i /= 2)
      nodes_[i] = better(nodes_[2 * i + 1], nodes_[2 * i]) ? nodes_[2 * i + 1] : nodes_[2 * i];
  }
  const Best& root() const { return nodes_[1]; }
  // The `count` leaves with the best values, best first (best-first walk down the tree).
  std::vector<int64_t> leading_leaves(int64_t count) const {
    std::vector<int64_t> leaves;
    const auto worse = [&](int64_t a, int64_t b) { return better(nodes_[b], nodes_[a]); };
    std::priority_queue<int64_t, std::vector<int64_t>, decltype(worse)> open(worse);
    open.push(1);
    while (!open.empty() && static_cast<int64_t>(leaves.size()) < count) {
      const int64_t node = open.top();
      open.pop();
      if (nodes_[node].index == std::numeric_limits<int64_t>::max()) continue;  // empty subtree
      if (node >= size_) {
        leaves.push_back(node - size_);
      } else {
        open.push(2 * node);
        open.push(2 * node + 1);
      }
    }
    return leaves;
  }

 private:
  int64_t size_;
  std::vector<Best> nodes_;
};

constexpr double kMargin = 1e-6;
constexpr double kBoundSlack = 256.0 * kFloatUnit;  // float sums of at most ~70 squares, with room to spare
// Relative to max |z|: coordinates rounded to float are off by 2u, and residual norms come from a double
// difference off by ~3e-13 |z|^2, which the square root turns into ~6e-7 |z| per norm: ~1.2e-6 in all.
constexpr double kEta = 1e-5;
constexpr int64_t kLevelDims[] = {8, 16, 32, 64};
// Leaf and task sizes, measured on tire features (164,640 x 128): 64-point leaves beat 16, 32, 128 and 256.
constexpr int64_t kLeafSize = 64;
constexpr int64_t kBlocksPerTask = 16;
constexpr int64_t kBatch = 8;              // most centres speculated per pass over the data: the lanes of one vector
constexpr int64_t kPcaSamples = 8192;      // rows whose covariance gives the principal directions
constexpr int64_t kProjectionRows = 4096;  // rows per chunk when projecting onto them

// Squared lower bound at or above which a point with this score provably keeps it.
float skip_threshold(float score, double delta, double eta) {
  const double s = score;
  const double t = (std::sqrt(s * s + delta) * (1.0 + kMargin) + eta) / (1.0 - kBoundSlack);
  return round_up_to_float(t * t * (1.0 + kMargin));
}

// Everything the fast loop precomputes. Points live in "slots": tree order, each leaf padded to a multiple of
// eight with empty slots (original -1) whose threshold 0 no bound is below. The rows of Z stay where they are
// (the fast loop reads them through `original`), so the loop needs far less memory than Z itself.
struct Index {
  int64_t dim = 0;
  int64_t slots = 0;
  int64_t blocks = 0;
  // Coordinates used up to each level, ascending (levels[0] may be 0: residual norm only).
  std::vector<int64_t> levels;
  // Per level, [slots / 8][width][8]: the level's new coordinates then the residual norm, eight slots side by
  // side so that a level's bound runs on whole vectors and reads contiguous memory.
  std::vector<std::vector<float>> level_data;
  std::vector<int64_t> level_width;
  std::vector<int64_t> original;          // slot -> row
  std::vector<int64_t> slot_of;           // row -> slot
  std::vector<int64_t> block_begin;       // blocks + 1 slot offsets, multiples of 8
  std::vector<int32_t> block_of;          // slot -> block
  std::vector<float> box_lo, box_hi;      // [blocks][level_width[0]]: bounding boxes of the first level
  std::vector<float> group_lo, group_hi;  // [slots / 8][level_width[0]]: the same per group of eight slots
  const float* data = nullptr;            // Z, [n][dim], row order
  std::vector<float> norms;               // [slots]
  double eta = 0.0;

  float level_value(int64_t level, int64_t slot, int64_t j) const {
    return level_data[level][((slot / 8) * level_width[level] + j) * 8 + slot % 8];
  }
  const float* row(int64_t slot) const { return data + original[slot] * dim; }
};

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

// Calls fill(row, values) for every row with its level values (each level's new principal coordinates, then
// the residual norm after all coordinates so far), levels [0, nlevels) back to back. Returns max |z|^2.
template <typename Fill>
double for_each_level_values(const Points& p, const at::Tensor& projected, const at::Tensor& basis,
                             const std::vector<int64_t>& levels, int64_t nlevels, Fill fill) {
  const int64_t coords = levels[nlevels - 1];
  at::Tensor basis_t;
  if (coords > 0) basis_t = basis.slice(0, 0, coords).t();
  const std::vector<int64_t> widths = level_widths(levels);
  const int64_t stride = std::accumulate(widths.begin(), widths.begin() + nlevels, int64_t{0});
  std::vector<float> values(static_cast<size_t>(stride));
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
      float* out = values.data();
      for (int64_t l = 0, j = 0; l < nlevels; ++l) {
        for (; j < levels[l]; ++j) {
          captured += c[j] * c[j];
          *out++ = static_cast<float>(c[j]);
        }
        *out++ = static_cast<float>(std::sqrt(std::max(0.0, norm - captured)));
      }
      fill(i, values.data());
    }
  }
  return max_norm;
}

Index build_index(const Points& p, const at::Tensor& projected) {
  Index x;
  x.dim = p.dim;
  x.data = p.data;
  x.levels = level_dims(p.dim);
  const int64_t nlevels = static_cast<int64_t>(x.levels.size());
  x.level_width = level_widths(x.levels);
  const int64_t width0 = x.level_width[0];
  at::Tensor basis;
  if (x.levels.back() > 0) basis = principal_axes(projected, x.levels.back(), kPcaSamples).axes;

  // Tree order over the first level's values; only they are kept for every row at once.
  std::vector<float> first(static_cast<size_t>(p.n * width0));
  const double max_norm = for_each_level_values(
      p, projected, basis, x.levels, 1, [&](int64_t i, const float* v) { std::copy_n(v, width0, &first[i * width0]); });
  x.eta = kEta * std::sqrt(max_norm) + 1e-30;
  std::vector<int64_t> order(static_cast<size_t>(p.n));
  for (int64_t i = 0; i < p.n; ++i) order[i] = i;
  std::vector<std::pair<int64_t, int64_t>> leaves;
  kd_order(order.data(), p.n, first.data(), width0, width0, kLeafSize, 8, &leaves);
  first = std::vector<float>();

  x.blocks = static_cast<int64_t>(leaves.size());
  x.block_begin.push_back(0);
  for (const auto& leaf : leaves)
    x.block_begin.push_back(x.block_begin.back() + (leaf.second - leaf.first + 7) / 8 * 8);
  x.slots = x.block_begin.back();
  x.original.assign(static_cast<size_t>(x.slots), -1);
  x.slot_of.resize(static_cast<size_t>(p.n));
  x.block_of.resize(static_cast<size_t>(x.slots));
  x.norms.assign(static_cast<size_t>(x.slots), 0.0f);
  for (int64_t b = 0; b < x.blocks; ++b) {
    for (int64_t s = x.block_begin[b]; s < x.block_begin[b + 1]; ++s) x.block_of[s] = static_cast<int32_t>(b);
    for (int64_t q = leaves[b].first; q < leaves[b].second; ++q) {
      const int64_t i = order[q], s = x.block_begin[b] + (q - leaves[b].first);
      x.original[s] = i;
      x.slot_of[i] = s;
      x.norms[s] = p.norms[i];
    }
  }
  order = std::vector<int64_t>();

  // Every level's values straight into slot order, in a second pass over Z.
  for (int64_t l = 0; l < nlevels; ++l)
    x.level_data.emplace_back(static_cast<size_t>(x.slots * x.level_width[l]), 0.0f);
  for_each_level_values(p, projected, basis, x.levels, nlevels, [&](int64_t i, const float* v) {
    const int64_t s = x.slot_of[i];
    for (int64_t l = 0; l < nlevels; ++l) {
      for (int64_t j = 0; j < x.level_width[l]; ++j)
        x.level_data[l][((s / 8) * x.level_width[l] + j) * 8 + s % 8] = v[j];
      v += x.level_width[l];
    }
  });

  // Bounding boxes of the first level per block and per group of eight, from the values the bounds use.
  x.box_lo.assign(static_cast<size_t>(x.blocks * width0), std::numeric_limits<float>::infinity());
  x.box_hi.assign(static_cast<size_t>(x.blocks * width0), -std::numeric_limits<float>::infinity());
  x.group_lo.assign(static_cast<size_t>(x.slots / 8 * width0), std::numeric_limits<float>::infinity());
  x.group_hi.assign(static_cast<size_t>(x.slots / 8 * width0), -std::numeric_limits<float>::infinity());
  for (int64_t s = 0; s < x.slots; ++s) {
    if (x.original[s] < 0) continue;
    const int64_t b = x.block_of[s];
    for (int64_t j = 0; j < width0; ++j) {
      const float v = x.level_value(0, s, j);
      x.box_lo[b * width0 + j] = std::min(x.box_lo[b * width0 + j], v);
      x.box_hi[b * width0 + j] = std::max(x.box_hi[b * width0 + j], v);
      x.group_lo[(s / 8) * width0 + j] = std::min(x.group_lo[(s / 8) * width0 + j], v);
      x.group_hi[(s / 8) * width0 + j] = std::max(x.group_hi[(s / 8) * width0 + j], v);
    }
  }
  return x;
}

}  // namespace

int64_t greedy_coreset_fast_bytes_per_row(int64_t dim) {
  const std::vector<int64_t> widths = level_widths(level_dims(dim));
  const int64_t level_floats = std::accumulate(widths.begin(), widths.end(), int64_t{0});
  const int64_t width0 = widths[0];
  // level data and first-level values (build) + original, slot_of, order (build) + block_of + norms twice +
  // row pointers + scores twice + score, threshold + group boxes.
  const int64_t per_point = 4 * level_floats + 4 * width0 + 3 * 8 + 4 + 2 * 4 + 8 + 2 * 4 + 2 * 4 + 2 * 4 * width0 / 8;
  return per_point + per_point / 8;  // leaves padded to multiples of eight slots: at most 7 in 64
}

namespace {

// The blocks' data as the bound kernel reads it.
struct BlocksView {
  const float* const* level_data;  // per level, [groups][width][8]
  const int64_t* level_width;
  int64_t levels;
  const int64_t* block_begin;  // first slot of each block (and one past the last)
  const float* box_lo;         // [blocks][level_width[0]]
  const float* box_hi;
  const float* group_lo;  // [groups][level_width[0]]
  const float* group_hi;
  const float* block_threshold;  // per block: >= every threshold in it
  const float* group_threshold;  // per group of eight slots: >= every threshold in it
  const float* threshold;        // per slot
};

// A batch of up to eight centres as the bound kernel reads it.
struct BatchView {
  int64_t size;
  const float* first;          // [level_width[0]][8]: the centres' first-level values side by side
  const float* const* centre;  // [size * levels]: centre j's values of level l at centre[j * levels + l]
};

// Squared distances of the eight centres (first level, side by side) to the box [lo, hi].
// (Returned through a reference: a 32-byte vector return value has a target-dependent ABI.)
__attribute__((always_inline)) inline void box_gap2(v8f& gap2, const float* box_lo, const float* box_hi, int64_t width,
                                                    const float* centres) {
  const v8f zero = {};
  v8f c, lo, hi, gap;
  gap2 = zero;
  for (int64_t k = 0; k < width; ++k) {
    load8(c, centres + k * 8);
    lo = box_lo[k] - c;
    hi = c - box_hi[k];
    gap = lo > hi ? lo : hi;
    gap = gap > zero ? gap : zero;
    gap2 += gap * gap;
  }
}

// The slots of blocks [b0, b1) whose bounds stay below their thresholds through every level, per centre of the
// batch: appended to out[j] (room for all the slots), with found[j] counting them. A centre is dropped for a
// block, or for a group of eight slots, when its distance to the block's bounding box (a lower bound for every
// slot in it) reaches the largest threshold there; a group leaves a centre as soon as none of its lanes is left.
// Returns the number of group bounds evaluated.
PATCHCORE_SIMD_KERNEL int64_t block_candidates(const BlocksView& blocks, const BatchView& batch, int64_t b0, int64_t b1,
                                               int64_t* const* out, int64_t* found) {
  const int64_t width0 = blocks.level_width[0];
  const unsigned lanes = (1u << batch.size) - 1u;
  const v8f zero = {};
  int64_t evaluated = 0;
  for (int64_t b = b0; b < b1; ++b) {
    v8f gap2;
    box_gap2(gap2, blocks.box_lo + b * width0, blocks.box_hi + b * width0, width0, batch.first);
    const unsigned near = lane_bits(gap2 < zero + blocks.block_threshold[b]) & lanes;
    if (near == 0) continue;
    for (int64_t g = blocks.block_begin[b] / 8; g < blocks.block_begin[b + 1] / 8; ++g) {
      box_gap2(gap2, blocks.group_lo + g * width0, blocks.group_hi + g * width0, width0, batch.first);
      const unsigned group_near = near & lane_bits(gap2 < zero + blocks.group_threshold[g]);
      if (group_near == 0) continue;
      v8f threshold, d;
      load8(threshold, blocks.threshold + g * 8);
      for (int64_t j = 0; j < batch.size; ++j) {
        if (!(group_near & (1u << j))) continue;
        ++evaluated;
        v8f acc = {};
        unsigned alive = 0xFFu;
        for (int64_t l = 0; l < blocks.levels && alive != 0; ++l) {
          const int64_t width = blocks.level_width[l];
          const float* x = blocks.level_data[l] + g * width * 8;
          const float* cj = batch.centre[j * blocks.levels + l];
          // Four independent sums keep the adder pipeline busy (any order is fine for a bound).
          v8f a0 = {}, a1 = {}, a2 = {}, a3 = {}, d1, d2, d3;
          int64_t k = 0;
          for (; k + 4 < width; k += 4) {
            load8(d, x + k * 8);
            load8(d1, x + (k + 1) * 8);
            load8(d2, x + (k + 2) * 8);
            load8(d3, x + (k + 3) * 8);
            d -= cj[k];
            d1 -= cj[k + 1];
            d2 -= cj[k + 2];
            d3 -= cj[k + 3];
            a0 += d * d;
            a1 += d1 * d1;
            a2 += d2 * d2;
            a3 += d3 * d3;
          }
          for (; k + 1 < width; ++k) {
            load8(d, x + k * 8);
            d -= cj[k];
            a0 += d * d;
          }
          acc += (a0 + a1) + (a2 + a3);
          load8(d, x + (width - 1) * 8);
          d -= cj[width - 1];
          alive &= lane_bits(acc + d * d < threshold);
        }
        for (int lane = 0; alive != 0; ++lane, alive >>= 1)
          if (alive & 1u) out[j][found[j]++] = g * 8 + lane;
      }
    }
  }
  return evaluated;
}

struct FastState {
  std::vector<float> score;            // per slot
  std::vector<float> threshold;        // per slot: skip_threshold(score), 0 for empty slots
  std::vector<float> group_threshold;  // per group of eight slots: >= every threshold in it
  std::vector<float> block_threshold;  // per block: >= every threshold in it
  std::vector<Best> block_best;
};

void refresh_block(const Index& x, FastState& st, int64_t b) {
  Best best;
  float block_threshold = 0.0f;
  for (int64_t g = x.block_begin[b] / 8; g < x.block_begin[b + 1] / 8; ++g) {
    float threshold = 0.0f;
    for (int64_t s = g * 8; s < g * 8 + 8; ++s) {
      if (x.original[s] < 0) continue;
      threshold = std::max(threshold, st.threshold[s]);
      if (better(Best{st.score[s], x.original[s]}, best)) best = {st.score[s], x.original[s]};
    }
    st.group_threshold[g] = threshold;
    block_threshold = std::max(block_threshold, threshold);
  }
  st.block_threshold[b] = block_threshold;
  st.block_best[b] = best;
}

// A point's exact distance to a speculated centre, kept when it is below the point's score at pass time.
struct Update {
  int64_t slot;
  float distance;
};

struct Scratch {
  std::vector<std::vector<int64_t>> slots;   // per centre: room for the candidates of a task
  std::vector<std::vector<Update>> updates;  // per centre: updates found by this thread in the pass
  std::vector<float> dist, norms;
  std::vector<const float*> rows;
  int64_t exact = 0, bounds = 0;
};

// The speculated centres of a pass.
struct Batch {
  std::vector<int64_t> slots;
  std::vector<float> first;                // [level_width[0]][8], unused lanes +inf (never near anything)
  std::vector<std::vector<float>> values;  // [size * levels]: each centre's values of each level
  std::vector<const float*> pointers;

  void assign(const Index& x, std::vector<int64_t> centre_slots) {
    const int64_t levels = static_cast<int64_t>(x.levels.size()), width0 = x.level_width[0];
    slots = std::move(centre_slots);
    first.assign(static_cast<size_t>(width0 * 8), std::numeric_limits<float>::infinity());
    values.resize(slots.size() * static_cast<size_t>(levels));
    pointers.resize(values.size());
    for (size_t j = 0; j < slots.size(); ++j) {
      for (int64_t l = 0; l < levels; ++l) {
        std::vector<float>& v = values[j * levels + l];
        v.resize(static_cast<size_t>(x.level_width[l]));
        for (int64_t k = 0; k < x.level_width[l]; ++k) v[k] = x.level_value(l, slots[j], k);
        pointers[j * levels + l] = v.data();
      }
      for (int64_t k = 0; k < width0; ++k) first[k * 8 + j] = values[j * levels][k];
    }
  }
  BatchView view() const { return BatchView{static_cast<int64_t>(slots.size()), first.data(), pointers.data()}; }
};

// Blocks [b0, b1) against every centre of the batch: the exact distances that would lower a score.
void process_blocks(const Index& x, const FastState& st, int64_t b0, int64_t b1, const Batch& centres,
                    const BlocksView& blocks, Scratch& sc) {
  const BatchView batch = centres.view();
  const size_t room = static_cast<size_t>(x.block_begin[b1] - x.block_begin[b0]);
  int64_t* out[8] = {};  // lanes past the batch stay null: block_candidates never writes them
  int64_t found[8] = {};
  for (int64_t j = 0; j < batch.size; ++j) {
    if (sc.slots[j].size() < room) sc.slots[j].resize(room);
    out[j] = sc.slots[j].data();
  }
  sc.bounds += 8 * block_candidates(blocks, batch, b0, b1, out, found);
  for (int64_t j = 0; j < batch.size; ++j) {
    const int64_t* slots = out[j];
    const int64_t count = found[j];
    if (count == 0) continue;
    sc.rows.resize(static_cast<size_t>(count));
    sc.norms.resize(static_cast<size_t>(count));
    sc.dist.resize(static_cast<size_t>(count));
    for (int64_t q = 0; q < count; ++q) {
      sc.rows[q] = x.row(slots[q]);
      sc.norms[q] = x.norms[slots[q]];
    }
    const int64_t cs = centres.slots[j];
    distance_kernel(sc.rows.data(), sc.norms.data(), count, x.row(cs), x.norms[cs], x.dim, sc.dist.data());
    sc.exact += count;
    for (int64_t q = 0; q < count; ++q)
      if (sc.dist[q] < st.score[slots[q]]) sc.updates[j].push_back(Update{slots[q], sc.dist[q]});
  }
}

// The `count` best points by (score, row), best first: they lie in the `count` best blocks.
std::vector<int64_t> leading_slots(const Index& x, const FastState& st, const BestTree& tree, int64_t count) {
  std::vector<int64_t> slots;
  for (int64_t b : tree.leading_leaves(count))
    for (int64_t s = x.block_begin[b]; s < x.block_begin[b + 1]; ++s)
      if (x.original[s] >= 0) slots.push_back(s);
  const auto key = [&](int64_t s) { return Best{st.score[s], x.original[s]}; };
  const int64_t keep = std::min(count, static_cast<int64_t>(slots.size()));
  std::partial_sort(slots.begin(), slots.begin() + keep, slots.end(),
                    [&](int64_t a, int64_t b) { return better(key(a), key(b)); });
  slots.resize(static_cast<size_t>(keep));
  return slots;
}

}  // namespace

// Speculation: a centre changes few scores, so the points ranked 2nd, 3rd, ... before a selection usually
// become the next argmaxes in that order. Each pass over the data therefore measures the points against the
// leading points at once (up to kBatch; each block's data read once for all of them) and records the distances
// that would lower a score. The selections are then replayed one by one: a speculated point is selected only if it
// is the true argmax after the previous ones' updates, and the first miss discards the rest of the batch. The
// recorded updates of an accepted centre are complete, since later scores are never above those of the pass.
std::vector<int64_t> greedy_coreset_fast(const at::Tensor& projected, std::vector<float> scores, int64_t count,
                                         GreedyStats* stats) {
  const Points p = coreset::prepare_points(projected, "greedy_coreset_fast");
  coreset::check_scores(scores, p, count, "greedy_coreset_fast");
  GreedyStats total;
  std::vector<int64_t> selected;
  if (count > 0) {
    selected.reserve(static_cast<size_t>(count));
    const Index x = build_index(p, projected);
    FastState st;
    st.score.assign(static_cast<size_t>(x.slots), 0.0f);
    st.threshold.assign(static_cast<size_t>(x.slots), 0.0f);
    for (int64_t s = 0; s < x.slots; ++s) {
      if (x.original[s] < 0) continue;
      st.score[s] = scores[x.original[s]];
      st.threshold[s] = skip_threshold(st.score[s], p.delta, x.eta);
    }
    st.group_threshold.resize(static_cast<size_t>(x.slots / 8));
    st.block_threshold.resize(static_cast<size_t>(x.blocks));
    st.block_best.resize(static_cast<size_t>(x.blocks));
    BestTree tree(x.blocks);
    for (int64_t b = 0; b < x.blocks; ++b) {
      refresh_block(x, st, b);
      tree.set(b, st.block_best[b]);
    }

    std::vector<const float*> level_data;
    for (const auto& level : x.level_data) level_data.push_back(level.data());
    const BlocksView blocks{level_data.data(),         x.level_width.data(), static_cast<int64_t>(x.levels.size()),
                            x.block_begin.data(),      x.box_lo.data(),      x.box_hi.data(),
                            x.group_lo.data(),         x.group_hi.data(),    st.block_threshold.data(),
                            st.group_threshold.data(), st.threshold.data()};
    Batch centres;
    const int64_t tasks = (x.blocks + kBlocksPerTask - 1) / kBlocksPerTask;
    std::vector<Scratch> scratch(static_cast<size_t>(parallel_threads(tasks)));
    for (Scratch& sc : scratch) {
      sc.slots.resize(static_cast<size_t>(kBatch));
      sc.updates.resize(static_cast<size_t>(kBatch));
    }
    std::vector<int64_t> changed;
    int64_t batch = kBatch;
    while (static_cast<int64_t>(selected.size()) < count) {
      const int64_t remaining = count - static_cast<int64_t>(selected.size());
      if (remaining == 1) {  // the last selection's updates would never be used
        selected.push_back(tree.root().index);
        break;
      }
      centres.assign(x, leading_slots(x, st, tree, std::min(batch, remaining)));
      parallel_for(tasks, [&](int64_t t, int worker) {
        process_blocks(x, st, t * kBlocksPerTask, std::min(x.blocks, (t + 1) * kBlocksPerTask), centres, blocks,
                       scratch[worker]);
      });
      ++total.passes;
      const int64_t speculated = static_cast<int64_t>(centres.slots.size());
      int64_t accepted = 0;
      for (; accepted < speculated; ++accepted) {
        const int64_t j = accepted;
        if (j > 0 && tree.root().index != x.original[centres.slots[j]]) break;
        selected.push_back(x.original[centres.slots[j]]);
        changed.clear();
        for (const Scratch& sc : scratch) {
          for (const Update& u : sc.updates[j]) {
            if (u.distance < st.score[u.slot]) {
              st.score[u.slot] = u.distance;
              st.threshold[u.slot] = skip_threshold(u.distance, p.delta, x.eta);
              changed.push_back(x.block_of[u.slot]);
            }
          }
        }
        std::sort(changed.begin(), changed.end());
        changed.erase(std::unique(changed.begin(), changed.end()), changed.end());
        for (int64_t b : changed) {
          refresh_block(x, st, b);
          tree.set(b, st.block_best[b]);
        }
      }
      for (Scratch& sc : scratch)
        for (auto& u : sc.updates) u.clear();
      // Early on a centre lowers many scores and speculation often misses; measuring for centres that are then
      // discarded is wasted, so the batch follows the recent acceptance.
      batch = accepted == speculated ? std::min(kBatch, 2 * batch) : accepted + 1;
    }
    for (const Scratch& sc : scratch) {
      total.exact_distances += sc.exact;
      total.lower_bounds += sc.bounds;
    }
  }
  if (stats) *stats = total;
  return selected;
}
}  // namespace patchcore

#include "patchcore/nn/exact_pruned_nn.h"

#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <stdexcept>
#include <vector>

namespace patchcore {

namespace {

// Leading principal axes of the three bound tiers (clamped to the feature length). The first tier's bound is
// computed for every row of each block whose box passes; each refinement cuts the rows that reach the next,
// costlier stage about threefold on CNN patch features.
constexpr int kTiers = 3;
constexpr int64_t kTierAxes[kTiers] = {32, 128, 256};
// Leading axes of the bounding box of each block of 8 rows, checked before the block's first-tier bounds.
constexpr int64_t kBoxAxes = 16;
constexpr int64_t kRowsPerCell = 64;  // k-means cells over the first-tier coordinates
constexpr int kKMeansIterations = 8;
constexpr int64_t kSlice = 4096;  // rows per slice of the bank's temporaries
// Consecutive queries in one work item: two rows of a 28x28 patch grid (against one row: 0.91 of the search
// time on tire, alternating per image; four rows gained nothing more and leave fewer items to balance).
constexpr int64_t kChunk = 56;
constexpr int64_t kLanes = 8;                           // rows per interleaved block of first-tier coordinates
constexpr int64_t kGroup = 4;                           // blocks whose first-tier bounds are computed together
constexpr double kUnit = 5.9604644775390625e-08;        // float unit roundoff, 2^-24
constexpr double kDoubleUnit = 1.1102230246251565e-16;  // 2^-53
constexpr float kInf = std::numeric_limits<float>::infinity();

using v8f = float __attribute__((vector_size(32)));
using v8i = int32_t __attribute__((vector_size(32)));

// Through memcpy: the buffers carry no 32-byte alignment.
inline void load8(v8f& v, const float* p) { std::memcpy(&v, p, sizeof v); }

// Bit l set where lane l of `pass` is true (all ones).
inline uint32_t lane_bits(const v8i& pass) {
  v8i m = pass & v8i{1, 2, 4, 8, 16, 32, 64, 128};
  m |= __builtin_shufflevector(m, m, 4, 5, 6, 7, 0, 1, 2, 3);
  m |= __builtin_shufflevector(m, m, 2, 3, 0, 1, 6, 7, 4, 5);
  m |= __builtin_shufflevector(m, m, 1, 0, 3, 2, 5, 4, 7, 6);
  return static_cast<uint32_t>(m[0]);
}

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
  const v8f s = lo + hi;
  float t[8];
  std::memcpy(t, &s, sizeof t);
  return (((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7]))) + tail;
}

__attribute__((target_clones("arch=x86-64-v3", "default"))) float squared_distance(const float* a, const float* b,
                                                                                   int64_t n) {
  return sum_of_squared_differences(a, b, n);
}

double relative_error_of_sum(int64_t n) { return (static_cast<double>(n) / 16.0 + 24.0) * kUnit * 1.01; }

// First-tier bounds of a query against the blocks of 8 rows listed in `ids` (`count` of them, a multiple of
// kGroup): |q|^2 + |r|^2 - 2 q.r over the leading axes plus the squared difference of the remaining norms.
// → masks[i], a bit for each row of block ids[i] whose bound is at most `threshold`. The axes of a block are
// interleaved, so one broadcast query coordinate times one load serves 8 rows and the 8 dot products need no
// horizontal sums. The blocks of a group accumulate in independent chains, which keeps the FMA units busy
// where one chain would wait on each add's latency.
__attribute__((target_clones("arch=x86-64-v3", "default"))) void first_tier(const float* blocks, const float* norms,
                                                                            const float* tails, const int32_t* ids,
                                                                            int64_t count, int64_t axes, const float* q,
                                                                            float q_norm, float q_tail, float threshold,
                                                                            uint8_t* masks) {
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
__attribute__((target_clones("arch=x86-64-v3", "default"))) uint32_t box_bounds(const float* low, const float* high,
                                                                                const float* tail_low,
                                                                                const float* tail_high, int64_t axes,
                                                                                const float* q, float q_tail,
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
__attribute__((target_clones("arch=x86-64-v3", "default"))) void centre_distances(const float* centres, int64_t groups,
                                                                                  int64_t axes, const float* q,
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
    const v8f sum = (acc0 + acc1) + (acc2 + acc3);
    std::memcpy(out + g * kLanes, &sum, sizeof sum);
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

// The rows whose first-tier bits are set in masks[i] for block ids[i], i < count, refined over the axes of each
// later tier: the squared difference of those coordinates plus that of the remaining norms. Appends the rows
// whose bounds stay at most `threshold` to `candidates`; returns how many rows it refined. One function per
// target, so the distances inline: a call per row and tier cost a third of the refinement.
__attribute__((target_clones("arch=x86-64-v3", "default"))) int64_t refine(const RefineTiers& bank, const int32_t* ids,
                                                                           const uint8_t* masks, size_t count,
                                                                           const float* q, const float* q_tails,
                                                                           float threshold,
                                                                           std::vector<Candidate>& candidates) {
  int64_t refined = 0;
  for (size_t b = 0; b < count; ++b)
    for (uint32_t m = masks[b]; m != 0; m &= m - 1) {
      const int64_t s = ids[b] * kLanes + __builtin_ctz(m);
      // Padding slots have an infinite bound, which passes while fewer than k rows are found.
      if (bank.row_of_slot[s] < 0) continue;
      ++refined;
      const float* rc = bank.coordinates + s * bank.width;
      float sum = 0.f, bound = 0.f;
      for (int64_t t = 1, done = 0; t < kTiers && bound <= threshold; ++t) {
        if (bank.axes[t] == bank.axes[t - 1]) continue;
        sum += sum_of_squared_differences(q + done, rc + done, bank.axes[t] - done);
        done = bank.axes[t];
        const float rest = q_tails[t] - bank.tails[t][s];
        bound = sum + rest * rest;
      }
      if (bound <= threshold) candidates.push_back({bound, bank.row_of_slot[s]});
    }
  return refined;
}

// A vector x is represented by its leading rotated coordinates c and, per tier, the norm t of the rest. For the
// exact rotation (c*, t*) the bound is a distance in R^(axes+1), so an error of at most e in (c, t) moves the
// square root of a bound by at most e. This is e for a tail computed as sqrt(|x|^2 - |c|^2) from coordinates
// that are off by at most `coordinate_error` in norm, the subtraction's own rounding included.
double tail_error(double norm, double coordinate_error, double tail, double unit) {
  const double e = 2.0 * norm * coordinate_error + coordinate_error * coordinate_error + 4.0 * unit * norm * norm;
  const double through_square = tail > 0.0 ? std::min(std::sqrt(e), e / tail) : std::sqrt(e);
  return through_square + kUnit * tail;  // + rounding the tail to float
}

// The norm of a vector (squared norm `squared`, rotated coordinates c) beyond its leading levels[i] coordinates,
// for the kTiers + 1 ascending levels: → tails[i]. Returns the largest of their tail_errors.
template <typename T>
double tails_beyond(const T* c, double squared, int64_t d, const int64_t* levels, float* tails, double norm,
                    double coordinate_error, double unit) {
  double partial = 0.0, worst = 0.0;
  for (int64_t j = 0, t = 0; t <= kTiers; ++t) {
    for (; j < levels[t]; ++j) partial += static_cast<double>(c[j]) * c[j];
    const double tail = levels[t] == d ? 0.0 : std::sqrt(std::max(0.0, squared - partial));
    tails[t] = static_cast<float>(tail);
    if (levels[t] < d) worst = std::max(worst, tail_error(norm, coordinate_error, tail, unit));
  }
  return worst;
}

// Thresholds are kept in float next to float bounds: round up so that the cast never tightens them.
float round_up(double x) {
  const float f = static_cast<float>(x);
  return static_cast<double>(f) < x ? std::nextafter(f, kInf) : f;
}

// Asks the kernel to back the whole 2 MiB pages inside [data, data + bytes) with huge pages, now. A query
// reads rows all over the bank and the coordinates (84 MB for tire's bank); on 4 KiB pages nearly every row
// costs a TLB miss. Only a hint: without transparent huge pages (or before Linux 6.1) nothing changes.
void use_huge_pages(const void* data, size_t bytes) {
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end <= begin) return;
  void* start = reinterpret_cast<void*>(begin);
  if (madvise(start, end - begin, MADV_HUGEPAGE) == 0) madvise(start, end - begin, 25 /* MADV_COLLAPSE */);
}

struct Neighbour {
  float distance;
  int64_t row;
  bool operator<(const Neighbour& o) const { return distance < o.distance || (distance == o.distance && row < o.row); }
};

// Lloyd's k-means from evenly spaced rows (deterministic, no seed): → the cell of every row of x [n, axes].
torch::Tensor kmeans_cells(const torch::Tensor& x, int64_t cells) {
  const int64_t n = x.size(0);
  torch::Tensor centres = x.index_select(0, (torch::arange(cells, torch::kInt64) * n).div(cells, "floor"));
  const torch::Tensor norms = x.pow(2).sum(1, true);
  torch::Tensor scores = torch::empty({std::min(n, kSlice), cells}, torch::kFloat32);
  torch::Tensor assignment;
  for (int i = 0;; ++i) {
    // In slices of rows, into one reused buffer: the whole distance matrix of a large bank would take
    // gigabytes (164,640 rows in 2,572 cells: 1.7 GB), and fresh temporaries cost a page fault per 4 KiB.
    const torch::Tensor centre_norms = centres.pow(2).sum(1).unsqueeze(0);
    const torch::Tensor centres_t = centres.t();
    std::vector<torch::Tensor> slices;
    for (int64_t s = 0; s < n; s += kSlice) {
      const int64_t e = std::min(n, s + kSlice);
      torch::Tensor d = scores.slice(0, 0, e - s);
      torch::mm_out(d, x.slice(0, s, e), centres_t);
      slices.push_back(d.mul_(-2.0).add_(norms.slice(0, s, e)).add_(centre_norms).argmin(1));
    }
    assignment = torch::cat(slices);
    if (i == kKMeansIterations) return assignment;
    const torch::Tensor counts = torch::zeros({cells}, torch::kFloat32).index_add_(0, assignment, torch::ones({n}));
    const torch::Tensor sums = torch::zeros_like(centres).index_add_(0, assignment, x);
    // An emptied cell keeps its centre.
    centres = torch::where(counts.unsqueeze(1) > 0, sums / counts.clamp_min(1.0).unsqueeze(1), centres);
  }
}

// Orders a cell's rows so that each run of 8 (a block) lies close together: a k-d tree that splits at a multiple
// of 8 rows along the box axis of largest variance, which keeps the blocks' bounding boxes small.
void order_for_boxes(int64_t* rows, int64_t n, const float* coordinates, int64_t width, int64_t axes) {
  if (n <= kLanes) return;
  int64_t split_axis = 0;
  double widest = -1.0;
  for (int64_t a = 0; a < axes; ++a) {
    double sum = 0.0, squares = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const double x = coordinates[rows[i] * width + a];
      sum += x;
      squares += x * x;
    }
    const double variance = squares / n - (sum / n) * (sum / n);
    if (variance > widest) {
      widest = variance;
      split_axis = a;
    }
  }
  const int64_t half = std::max(kLanes, ((n + 1) / 2 + kLanes - 1) / kLanes * kLanes);
  std::nth_element(rows, rows + half, rows + n, [&](int64_t x, int64_t y) {
    const float vx = coordinates[x * width + split_axis], vy = coordinates[y * width + split_axis];
    return vx < vy || (vx == vy && x < y);
  });
  order_for_boxes(rows, half, coordinates, width, axes);
  order_for_boxes(rows + half, n - half, coordinates, width, axes);
}

}  // namespace

// Rows are stored cell by cell in "slots", in blocks of 8; each cell starts at a block, and padding slots have an
// infinite first-tier norm so that no bound lets them through.
struct ExactPrunedNN::Pruning {
  const float* rows = nullptr;  // the flat index's storage, [count, dim]
  int64_t count = 0, dim = 0;
  int64_t axes[kTiers] = {};             // per tier, clamped to dim; the last is the projection width
  int64_t box_axes = 0;                  // kBoxAxes clamped to axes[0]
  int64_t tail_levels[kTiers + 1] = {};  // box_axes, then axes
  torch::Tensor mean;                    // [dim] float32: the centre for rows and queries alike
  torch::Tensor basis;                   // [dim, width] float32: leading principal axes
  int64_t slots = 0;
  std::vector<int64_t> row_of_slot;  // -1 on padding
  std::vector<float> blocks;         // [slots / 8, axes[0], 8] first-tier coordinates, interleaved
  std::vector<float> norms;          // [slots] squared first-tier norms
  std::vector<float> tails[kTiers];  // per tier [slots]: norm of the coordinates beyond the tier's axes
  std::vector<float> coordinates;    // [slots, width]
  // Per group of up to 8 consecutive blocks of a cell, one block per lane: the bounding box of the block's rows
  // over the leading box_axes and their tails beyond those axes. Lanes without a block hold empty boxes.
  std::vector<float> box_low, box_high;            // [groups, box_axes, 8]
  std::vector<float> box_tail_low, box_tail_high;  // [groups, 8]
  int64_t padding_block = 0;  // a block of padding slots in no cell, to fill a group of first-tier blocks
  struct Cell {
    int64_t begin, end;         // slots
    int64_t box_group;          // its first group of boxes
    double radius;              // of its rows' first-tier coordinates around the centre
    float tail_low, tail_high;  // range of its rows' first-tier tails
  };
  std::vector<Cell> cells;
  std::vector<float> centres;   // [cell groups of 8, axes[0], 8]: interleaved, 8 cells per lane group
  float row_error = 0.f;        // bound on every row's representation error (see tail_error)
  float first_tier_norm = 0.f;  // largest first-tier norm of a row
};

ExactPrunedNN::ExactPrunedNN(bool on_gpu, int num_workers) : FaissNN(false, num_workers) {
  if (on_gpu) throw std::invalid_argument("ExactPrunedNN: searches on the CPU only (on_gpu must be false)");
}

ExactPrunedNN::~ExactPrunedNN() = default;

void ExactPrunedNN::index_changed() {
  pruning_.reset();
  const float* rows = flat_rows();
  if (!rows) return;
  auto p = std::make_shared<Pruning>();
  p->rows = rows;
  p->count = size();
  p->dim = dimension();
  const int64_t n = p->count, d = p->dim;
  for (int t = 0; t < kTiers; ++t) p->axes[t] = std::min(kTierAxes[t], d);
  p->box_axes = std::min(kBoxAxes, p->axes[0]);
  p->tail_levels[0] = p->box_axes;
  for (int t = 0; t < kTiers; ++t) p->tail_levels[t + 1] = p->axes[t];
  const int64_t width = p->axes[kTiers - 1], first = p->axes[0], box_axes = p->box_axes;
  const torch::Tensor x = torch::from_blob(const_cast<float*>(rows), {n, d}, torch::kFloat32);
  // Non-finite values would make every bound meaningless.
  if (!torch::isfinite(x).all().item<bool>())
    throw std::invalid_argument(std::string(kind()) + ": the memory bank contains NaN or infinite values");

  // Any orthonormal basis keeps the bounds valid; the principal axes only make them tight. So the covariance
  // may be accumulated from float products, in slices to bound the temporary memory.
  p->mean = x.to(torch::kFloat64).mean(0).to(torch::kFloat32);
  const torch::Tensor mean64 = p->mean.to(torch::kFloat64);
  torch::Tensor covariance = torch::zeros({d, d}, torch::kFloat64);
  for (int64_t s = 0; s < n; s += kSlice) {
    const torch::Tensor centred = x.slice(0, s, std::min(n, s + kSlice)) - p->mean;
    covariance += centred.t().mm(centred).to(torch::kFloat64);
  }
  // LAPACK's eigensolver makes thousands of small multithreaded BLAS calls; on a busy machine every one
  // waits for a descheduled thread (measured: 30 s instead of 0.3 s). One thread, for this thread only.
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  torch::Tensor vectors;
  try {
    vectors = std::get<1>(torch::linalg::eigh(covariance, "L"));  // ascending eigenvalues
  } catch (...) {
    omp_set_num_threads(threads);
    throw;
  }
  omp_set_num_threads(threads);
  const torch::Tensor basis64 = vectors.slice(1, d - width, d).flip({1}).contiguous();
  p->basis = basis64.to(torch::kFloat32).contiguous();

  // Rows are rotated in double: their coordinate error is then negligible next to the float rounding.
  std::vector<float> coordinates(static_cast<size_t>(n * width));
  std::vector<float> tails[kTiers], box_tails(static_cast<size_t>(n));
  for (auto& t : tails) t.resize(static_cast<size_t>(n));
  const double coordinate_error_factor = std::sqrt(static_cast<double>(width)) * 2.0 * (d + 2) * kDoubleUnit;
  double row_error = 0.0;
  for (int64_t s = 0; s < n; s += kSlice) {
    const int64_t e = std::min(n, s + kSlice);
    const torch::Tensor centred = x.slice(0, s, e).to(torch::kFloat64) - mean64;
    const torch::Tensor squared = centred.pow(2).sum(1).contiguous();
    const torch::Tensor coords = centred.mm(basis64).contiguous();
    const double* sq = squared.data_ptr<double>();
    const double* c = coords.data_ptr<double>();
    for (int64_t r = s; r < e; ++r) {
      const double* cr = c + (r - s) * width;
      for (int64_t j = 0; j < width; ++j) coordinates[r * width + j] = static_cast<float>(cr[j]);
      const double norm = std::sqrt(sq[r - s]);
      const double coordinate_error = coordinate_error_factor * norm;
      float row_tails[kTiers + 1];
      const double worst_tail =
          tails_beyond(cr, sq[r - s], d, p->tail_levels, row_tails, norm, coordinate_error, kDoubleUnit);
      box_tails[r] = row_tails[0];
      for (int t = 0; t < kTiers; ++t) tails[t][r] = row_tails[t + 1];
      row_error = std::max(row_error, coordinate_error + kUnit * norm + worst_tail);
    }
  }
  p->row_error = static_cast<float>(row_error * 1.01);

  // Cells group rows that lie close in the first tier: a query skips whole cells, and the rows it does
  // visit lie together in memory.
  const int64_t cell_count = std::max<int64_t>(1, n / kRowsPerCell);
  const torch::Tensor first_coords =
      torch::from_blob(coordinates.data(), {n, width}, torch::kFloat32).slice(1, 0, first).contiguous();
  const torch::Tensor assignment = kmeans_cells(first_coords, cell_count).contiguous();
  const int64_t* cell_of_row = assignment.data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> members(static_cast<size_t>(cell_count));
  for (int64_t r = 0; r < n; ++r) members[cell_of_row[r]].push_back(r);

  auto aligned = [](int64_t slots) { return (slots + kLanes - 1) / kLanes * kLanes; };
  int64_t groups = 0;
  for (auto& m : members) {
    const int64_t size = static_cast<int64_t>(m.size());
    order_for_boxes(m.data(), size, coordinates.data(), width, box_axes);
    p->slots += aligned(size);
    groups += (aligned(size) / kLanes + kLanes - 1) / kLanes;
  }
  p->padding_block = p->slots / kLanes;
  p->slots += kLanes;
  p->row_of_slot.assign(static_cast<size_t>(p->slots), -1);
  p->blocks.assign(static_cast<size_t>(p->slots * first), 0.f);
  p->norms.assign(static_cast<size_t>(p->slots), kInf);
  for (auto& t : p->tails) t.assign(static_cast<size_t>(p->slots), 0.f);
  p->coordinates.assign(static_cast<size_t>(p->slots * width), 0.f);
  p->box_low.assign(static_cast<size_t>(groups * box_axes * kLanes), kInf);
  p->box_high.assign(static_cast<size_t>(groups * box_axes * kLanes), -kInf);
  p->box_tail_low.assign(static_cast<size_t>(groups * kLanes), kInf);
  p->box_tail_high.assign(static_cast<size_t>(groups * kLanes), -kInf);
  double first_norm = 0.0;
  int64_t slot = 0, group = 0;
  for (const auto& m : members) {
    if (m.empty()) continue;
    Pruning::Cell cell{slot, slot, group, 0.0, kInf, 0.f};
    // The centre is the mean of the members in float; the radius is measured from exactly that centre.
    std::vector<double> centre(static_cast<size_t>(first), 0.0);
    for (int64_t r : m)
      for (int64_t a = 0; a < first; ++a) centre[a] += coordinates[r * width + a];
    std::vector<float> stored_centre(static_cast<size_t>(first));
    for (int64_t a = 0; a < first; ++a) stored_centre[a] = static_cast<float>(centre[a] / m.size());
    for (int64_t r : m) {
      const float* cr = coordinates.data() + r * width;
      double partial = 0.0, to_centre = 0.0;
      for (int64_t a = 0; a < first; ++a) {
        partial += static_cast<double>(cr[a]) * cr[a];
        to_centre += (static_cast<double>(cr[a]) - stored_centre[a]) * (static_cast<double>(cr[a]) - stored_centre[a]);
      }
      first_norm = std::max(first_norm, std::sqrt(partial));
      cell.radius = std::max(cell.radius, std::sqrt(to_centre));
      cell.tail_low = std::min(cell.tail_low, tails[0][r]);
      cell.tail_high = std::max(cell.tail_high, tails[0][r]);
      p->row_of_slot[slot] = r;
      p->norms[slot] = static_cast<float>(partial);
      for (int t = 0; t < kTiers; ++t) p->tails[t][slot] = tails[t][r];
      std::memcpy(p->coordinates.data() + slot * width, cr, static_cast<size_t>(width) * sizeof(float));
      for (int64_t a = 0; a < first; ++a)
        p->blocks[(slot / kLanes) * first * kLanes + a * kLanes + slot % kLanes] = cr[a];
      const int64_t block = (slot - cell.begin) / kLanes;
      const int64_t lane = block % kLanes, box = cell.box_group + block / kLanes;
      for (int64_t a = 0; a < box_axes; ++a) {
        float& low = p->box_low[(box * box_axes + a) * kLanes + lane];
        float& high = p->box_high[(box * box_axes + a) * kLanes + lane];
        low = std::min(low, cr[a]);
        high = std::max(high, cr[a]);
      }
      float& tail_low = p->box_tail_low[box * kLanes + lane];
      float& tail_high = p->box_tail_high[box * kLanes + lane];
      tail_low = std::min(tail_low, box_tails[r]);
      tail_high = std::max(tail_high, box_tails[r]);
      ++slot;
    }
    cell.radius *= 1.0 + 1e-12;
    slot = aligned(slot);
    group += ((slot - cell.begin) / kLanes + kLanes - 1) / kLanes;
    cell.end = slot;
    p->cells.push_back(cell);
    const size_t ci = p->cells.size() - 1;
    if (ci % kLanes == 0) p->centres.resize(p->centres.size() + static_cast<size_t>(first * kLanes), 0.f);
    for (int64_t a = 0; a < first; ++a) p->centres[(ci / kLanes * first + a) * kLanes + ci % kLanes] = stored_centre[a];
  }
  p->first_tier_norm = static_cast<float>(first_norm * (1.0 + 4.0 * kUnit));
  use_huge_pages(rows, static_cast<size_t>(n * d) * sizeof(float));
  use_huge_pages(p->coordinates.data(), p->coordinates.size() * sizeof(float));
  use_huge_pages(p->blocks.data(), p->blocks.size() * sizeof(float));
  pruning_ = std::move(p);
}

std::pair<torch::Tensor, torch::Tensor> ExactPrunedNN::run(int64_t k, const torch::Tensor& query_features,
                                                           const torch::Tensor& index_features) const {
  if (index_features.defined()) return FaissNN::run(k, query_features, index_features);
  return search(k, query_features, nullptr);
}

std::pair<torch::Tensor, torch::Tensor> ExactPrunedNN::search(int64_t k, const torch::Tensor& query_features,
                                                              Stats* stats) const {
  const std::shared_ptr<const Pruning> pruning = pruning_;
  if (!pruning) throw std::logic_error(std::string(kind()) + ": run() before fit() or load()");
  const Pruning& p = *pruning;
  const torch::Tensor queries = checked_queries(k, query_features, p.count, p.dim);
  if (!torch::isfinite(queries).all().item<bool>())
    throw std::invalid_argument(std::string(kind()) + ": query features contain NaN or infinite values");
  const int64_t nq = queries.size(0), d = p.dim, width = p.axes[kTiers - 1], first = p.axes[0];
  const int64_t cell_count = static_cast<int64_t>(p.cells.size());

  const torch::Tensor centred = (queries - p.mean).contiguous();
  const torch::Tensor projected = centred.mm(p.basis).contiguous();  // [nq, width], float GEMM

  auto distances = torch::empty({nq, k}, torch::kFloat32);
  auto indices = torch::empty({nq, k}, torch::kInt64);
  const float* q_rows = queries.data_ptr<float>();
  const float* q_centred = centred.data_ptr<float>();
  const float* q_coords = projected.data_ptr<float>();
  float* out_distances = distances.data_ptr<float>();
  int64_t* out_indices = indices.data_ptr<int64_t>();

  // Float GEMM of length d: at most (d + 2) units per coordinate relative to |x|, plus rounding the basis.
  const double coordinate_error_factor = std::sqrt(static_cast<double>(width)) * ((d + 2) * 1.01 + 1.0) * kUnit;
  const double exact_error = relative_error_of_sum(d) + 2.0 * kUnit;
  const double refine_error = relative_error_of_sum(width) + 4.0 * kUnit;
  // Also covers the cell bounds: their float |q - centre|^2 is off by at most relative_error_of_sum(first),
  // which moves gap^2 by at most that times (|q| + |centre|)^2, within first_absolute. And the box bounds:
  // (box_axes / 2 + 5) units relative, below (first + 8) as box_axes <= first.
  const double first_error = std::max((first + 8) * kUnit * 1.01, relative_error_of_sum(first));

  RefineTiers tiers{p.coordinates.data(), width, {}, {}, p.row_of_slot.data()};
  for (int t = 0; t < kTiers; ++t) {
    tiers.tails[t] = p.tails[t].data();
    tiers.axes[t] = p.axes[t];
  }
  int64_t total_refined = 0, total_exact = 0;
  std::exception_ptr failure;
  const int64_t chunks = (nq + kChunk - 1) / kChunk;

  // The state of one query's search.
  struct Query {
    const float* features;  // as given, [d]
    const float* coords;    // rotated, [width]
    float first_norm = 0.f, box_tail = 0.f, tails[kTiers] = {};
    double slack = 0.0, first_absolute = 0.0;
    float first_threshold = kInf, refine_threshold = kInf;
    std::vector<Neighbour> best;  // max-heap of the k best so far
    int64_t seed_cell = 0;
  };

#pragma omp parallel num_threads(num_workers()) reduction(+ : total_refined, total_exact)
  {
    try {
      std::vector<uint8_t> masks;
      std::vector<int32_t> passing;       // blocks of a cell whose box passed, then padding to a whole group
      std::vector<Candidate> candidates;  // min-heap by bound
      std::vector<Query> chunk_queries(static_cast<size_t>(kChunk));
      std::vector<float> cell_bounds(static_cast<size_t>(kChunk * cell_count));  // [query, cell]
      std::vector<std::pair<float, int64_t>> cell_order(static_cast<size_t>(cell_count));
      std::vector<float> to_centres(static_cast<size_t>((cell_count + kLanes - 1) / kLanes * kLanes));

      // A row can be skipped when its bound, less the bound's rounding, exceeds the square of (the k-th
      // distance's largest true value + both vectors' representation errors).
      auto consider = [&](Query& query, int64_t r) {
        ++total_exact;
        const Neighbour candidate{squared_distance(query.features, p.rows + r * d, d), r};
        std::vector<Neighbour>& best = query.best;
        if (static_cast<int64_t>(best.size()) < k) {
          best.push_back(candidate);
          std::push_heap(best.begin(), best.end());
        } else if (candidate < best.front()) {
          std::pop_heap(best.begin(), best.end());
          best.back() = candidate;
          std::push_heap(best.begin(), best.end());
        } else {
          return;
        }
        if (static_cast<int64_t>(best.size()) < k) return;
        const double reach = std::sqrt(best.front().distance * (1.0 + exact_error)) + query.slack;
        query.refine_threshold = round_up(reach * reach * (1.0 + refine_error));
        query.first_threshold = round_up(reach * reach * (1.0 + first_error) + query.first_absolute);
      };

      // Every row of one cell against one query: first-tier bounds for all, then the refined bounds for those
      // that pass. Rows that pass every tier get their exact distance lowest bound first: each one found can
      // only lower the threshold, so the rows whose bound it then exceeds never need their 4 KiB read from the
      // bank. With the seed below, this computes about 9.6 exact distances per query on tire, where taking
      // rows in slot order computed 36.
      auto visit = [&](Query& query, int64_t ci) {
        const Pruning::Cell& cell = p.cells[ci];
        const int64_t blocks = (cell.end - cell.begin) / kLanes, first_block = cell.begin / kLanes;
        passing.clear();
        for (int64_t g = 0; g * kLanes < blocks; ++g) {
          const int64_t box = cell.box_group + g;
          // Lanes past the cell's last block hold empty boxes, which pass an infinite threshold.
          const uint32_t lanes = (1u << std::min(kLanes, blocks - g * kLanes)) - 1;
          for (uint32_t bits =
                   lanes & box_bounds(p.box_low.data() + box * p.box_axes * kLanes,
                                      p.box_high.data() + box * p.box_axes * kLanes,
                                      p.box_tail_low.data() + box * kLanes, p.box_tail_high.data() + box * kLanes,
                                      p.box_axes, query.coords, query.box_tail, query.first_threshold);
               bits != 0; bits &= bits - 1)
            passing.push_back(static_cast<int32_t>(first_block + g * kLanes + __builtin_ctz(bits)));
        }
        if (passing.empty()) return;
        const size_t count = passing.size();
        passing.resize((count + kGroup - 1) / kGroup * kGroup, static_cast<int32_t>(p.padding_block));
        masks.resize(passing.size());
        first_tier(p.blocks.data(), p.norms.data(), p.tails[0].data(), passing.data(),
                   static_cast<int64_t>(passing.size()), first, query.coords, query.first_norm, query.tails[0],
                   query.first_threshold, masks.data());
        candidates.clear();
        total_refined += refine(tiers, passing.data(), masks.data(), count, query.coords, query.tails,
                                query.refine_threshold, candidates);
        std::make_heap(candidates.begin(), candidates.end());
        while (!candidates.empty() && candidates.front().bound <= query.refine_threshold) {
          const int64_t row = candidates.front().row;
          std::pop_heap(candidates.begin(), candidates.end());
          candidates.pop_back();
          consider(query, row);
        }
      };

      // A work item is two rows of the patch grid. Its queries look alike and need mostly the same cells, so
      // the cells are visited in one order for all of them and each cell's rows are read from memory once
      // for the whole item rather than once per query.
#pragma omp for schedule(dynamic, 1)
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const int64_t chunk_begin = chunk * kChunk, count = std::min(nq, chunk_begin + kChunk) - chunk_begin;
        for (int64_t i = 0; i < count; ++i) {
          const int64_t qi = chunk_begin + i;
          Query& query = chunk_queries[i];
          query.features = q_rows + qi * d;
          query.coords = q_coords + qi * width;
          const float* xc = q_centred + qi * d;
          const float* c = query.coords;
          double squared = 0.0;
          for (int64_t j = 0; j < d; ++j) squared += static_cast<double>(xc[j]) * xc[j];
          const double norm = std::sqrt(squared);
          const double coordinate_error = coordinate_error_factor * norm;
          float level_tails[kTiers + 1];
          const double worst_tail =
              tails_beyond(c, squared, d, p.tail_levels, level_tails, norm, coordinate_error, kUnit);
          query.box_tail = level_tails[0];
          std::copy(level_tails + 1, level_tails + kTiers + 1, query.tails);
          double first_norm = 0.0;
          for (int64_t j = 0; j < first; ++j) first_norm += static_cast<double>(c[j]) * c[j];
          query.first_norm = static_cast<float>(first_norm);
          // + 2 units of the norm: centring the query in float moves it by at most one.
          query.slack = (coordinate_error + 2.0 * kUnit * norm + worst_tail) * 1.01 + p.row_error;
          query.first_absolute = first_error * std::pow(std::sqrt(first_norm) + p.first_tier_norm, 2.0);
          query.first_threshold = query.refine_threshold = kInf;
          query.best.clear();
          query.best.reserve(static_cast<size_t>(k));

          // Bound of every cell: |q - centre| - radius over the first-tier axes, and the gap between the
          // query's tail and the cell's range of tails.
          float* row_bounds = cell_bounds.data() + i * cell_count;
          double nearest = kInf;
          centre_distances(p.centres.data(), (cell_count + kLanes - 1) / kLanes, first, c, to_centres.data());
          for (int64_t ci = 0; ci < cell_count; ++ci) {
            const Pruning::Cell& cell = p.cells[ci];
            const double to_centre = to_centres[ci];
            const double gap = std::max(0.0, std::sqrt(to_centre) - cell.radius);
            const double tail_gap = std::max({0.0, static_cast<double>(cell.tail_low) - query.tails[0],
                                              static_cast<double>(query.tails[0]) - cell.tail_high});
            row_bounds[ci] = static_cast<float>(gap * gap + tail_gap * tail_gap);
            if (to_centre < nearest) {
              nearest = to_centre;
              query.seed_cell = ci;
            }
          }
          // The cell with the nearest centre first: it most often holds the nearest row, so the threshold is
          // tight before the shared walk. (The cell with the lowest bound favours wide cells, which hold it
          // less often.)
          visit(query, query.seed_cell);
        }

        // Cells by their lowest bound over the item's queries. Once that exceeds every query's threshold,
        // no later cell can hold a neighbour of any of them.
        for (int64_t ci = 0; ci < cell_count; ++ci) {
          float lowest = kInf;
          for (int64_t i = 0; i < count; ++i) lowest = std::min(lowest, cell_bounds[i * cell_count + ci]);
          cell_order[ci] = {lowest, ci};
        }
        std::sort(cell_order.begin(), cell_order.end());
        for (const auto& [lowest, ci] : cell_order) {
          float loosest = 0.f;
          for (int64_t i = 0; i < count; ++i) loosest = std::max(loosest, chunk_queries[i].first_threshold);
          if (lowest > loosest) break;
          for (int64_t i = 0; i < count; ++i) {
            Query& query = chunk_queries[i];
            if (ci == query.seed_cell || cell_bounds[i * cell_count + ci] > query.first_threshold) continue;
            visit(query, ci);
          }
        }

        for (int64_t i = 0; i < count; ++i) {
          std::vector<Neighbour>& best = chunk_queries[i].best;
          std::sort_heap(best.begin(), best.end());
          const int64_t qi = chunk_begin + i;
          for (int64_t j = 0; j < k; ++j) {
            out_distances[qi * k + j] = best[j].distance;
            out_indices[qi * k + j] = best[j].row;
          }
        }
      }
    } catch (...) {
#pragma omp critical(exact_pruned_nn_failure)
      if (!failure) failure = std::current_exception();
    }
  }
  if (failure) std::rethrow_exception(failure);
  if (stats) {
    stats->queries += nq;
    stats->refined += total_refined;
    stats->exact += total_exact;
  }
  return {distances, indices};
}

}  // namespace patchcore

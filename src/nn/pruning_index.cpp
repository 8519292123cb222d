#include "pruning_index.h"

#include <ATen/ATen.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>

#include "patchcore/core/linalg.h"

namespace patchcore::pruning {
namespace {

constexpr int64_t kRowsPerCell = 64;  // k-means cells over the first-tier coordinates
constexpr int kKMeansIterations = 8;
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

int64_t aligned(int64_t slots) { return (slots + kLanes - 1) / kLanes * kLanes; }

// Lloyd's k-means from evenly spaced rows (deterministic, no seed): → the cell of every row of x [n, axes].
at::Tensor kmeans_cells(const at::Tensor& x, int64_t cells) {
  const int64_t n = x.size(0), slice = slice_rows(cells * static_cast<int64_t>(sizeof(float)));
  at::Tensor centres = x.index_select(0, (at::arange(cells, at::kLong) * n).div(cells, "floor"));
  const at::Tensor norms = x.pow(2).sum(1, true);
  at::Tensor scores = at::empty({std::min(n, slice), cells}, at::kFloat);
  at::Tensor assignment;
  for (int i = 0;; ++i) {
    // In slices of rows, into one reused buffer: the whole distance matrix of a large bank would take
    // gigabytes (164,640 rows in 2,572 cells: 1.7 GB), and fresh temporaries cost a page fault per 4 KiB.
    const at::Tensor centre_norms = centres.pow(2).sum(1).unsqueeze(0);
    const at::Tensor centres_t = centres.t();
    std::vector<at::Tensor> slices;
    for (int64_t s = 0; s < n; s += slice) {
      const int64_t e = std::min(n, s + slice);
      at::Tensor d = scores.slice(0, 0, e - s);
      at::mm_out(d, x.slice(0, s, e), centres_t);
      slices.push_back(d.mul_(-2.0).add_(norms.slice(0, s, e)).add_(centre_norms).argmin(1));
    }
    assignment = at::cat(slices);
    if (i == kKMeansIterations) return assignment;
    const at::Tensor counts = at::zeros({cells}, at::kFloat).index_add_(0, assignment, at::ones({n}));
    const at::Tensor sums = at::zeros_like(centres).index_add_(0, assignment, x);
    // An emptied cell keeps its centre.
    centres = at::where(counts.unsqueeze(1) > 0, sums / counts.clamp_min(1.0).unsqueeze(1), centres);
  }
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

// The bank's rows in its principal axes, in row order.
struct RotatedRows {
  std::vector<float> coordinates;    // [n, width]
  std::vector<float> tails[kTiers];  // per tier [n]
  std::vector<float> box_tails;      // [n]: beyond the box axes
};

// Rotates the rows in double, so that their coordinate error is negligible next to the float rounding, and
// records the largest representation error of any row in p.row_error.
RotatedRows rotate_rows(PruningIndex& p, const at::Tensor& x, const at::Tensor& basis64) {
  const int64_t n = p.count, d = p.dim, width = p.width();
  RotatedRows out;
  out.coordinates.resize(static_cast<size_t>(n * width));
  for (auto& t : out.tails) t.resize(static_cast<size_t>(n));
  out.box_tails.resize(static_cast<size_t>(n));
  const at::Tensor mean64 = p.mean.to(at::kDouble);
  const int64_t slice = slice_rows(d * static_cast<int64_t>(sizeof(double)));
  const double coordinate_error_factor = std::sqrt(static_cast<double>(width)) * 2.0 * (d + 2) * kDoubleUnit;
  double row_error = 0.0;
  for (int64_t s = 0; s < n; s += slice) {
    const int64_t e = std::min(n, s + slice);
    const at::Tensor centred = x.slice(0, s, e).to(at::kDouble) - mean64;
    const at::Tensor squared = centred.pow(2).sum(1).contiguous();
    const at::Tensor coords = centred.mm(basis64).contiguous();
    const double* sq = squared.data_ptr<double>();
    const double* c = coords.data_ptr<double>();
    for (int64_t r = s; r < e; ++r) {
      const double* cr = c + (r - s) * width;
      for (int64_t j = 0; j < width; ++j) out.coordinates[r * width + j] = static_cast<float>(cr[j]);
      const double norm = std::sqrt(sq[r - s]);
      const double coordinate_error = coordinate_error_factor * norm;
      float row_tails[kTiers + 1];
      const double worst_tail =
          tails_beyond(cr, sq[r - s], d, p.tail_levels, row_tails, norm, coordinate_error, kDoubleUnit);
      out.box_tails[r] = row_tails[0];
      for (int t = 0; t < kTiers; ++t) out.tails[t][r] = row_tails[t + 1];
      row_error = std::max(row_error, coordinate_error + kFloatUnit * norm + worst_tail);
    }
  }
  p.row_error = static_cast<float>(row_error * 1.01);
  return out;
}

// Groups rows that lie close in the first tier into cells: a query skips whole cells, and the rows it does visit
// lie together in memory. Each cell's rows come ordered so that each block of 8 has a small bounding box.
std::vector<std::vector<int64_t>> cells_of(const PruningIndex& p, const RotatedRows& rotated) {
  const int64_t n = p.count, width = p.width();
  const int64_t cell_count = std::max<int64_t>(1, n / kRowsPerCell);
  const at::Tensor first_coords = at::from_blob(const_cast<float*>(rotated.coordinates.data()), {n, width}, at::kFloat)
                                      .slice(1, 0, p.axes[0])
                                      .contiguous();
  const at::Tensor assignment = kmeans_cells(first_coords, cell_count).contiguous();
  const int64_t* cell_of_row = assignment.data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> members(static_cast<size_t>(cell_count));
  for (int64_t r = 0; r < n; ++r) members[cell_of_row[r]].push_back(r);
  for (auto& m : members)
    kd_order(m.data(), static_cast<int64_t>(m.size()), rotated.coordinates.data(), width, p.box_axes, kLanes, kLanes);
  return members;
}

// Stores the rows cell by cell in slots: interleaved first-tier blocks, norms, tails, coordinates, the blocks'
// boxes and the cells with their centres and radii.
void lay_out(PruningIndex& p, const RotatedRows& rotated, const std::vector<std::vector<int64_t>>& members) {
  const int64_t width = p.width(), first = p.axes[0], box_axes = p.box_axes;
  int64_t groups = 0;
  for (const auto& m : members) {
    const int64_t size = static_cast<int64_t>(m.size());
    p.slots += aligned(size);
    groups += (aligned(size) / kLanes + kLanes - 1) / kLanes;
  }
  p.padding_block = p.slots / kLanes;
  p.slots += kLanes;
  p.row_of_slot.assign(static_cast<size_t>(p.slots), -1);
  p.blocks.assign(static_cast<size_t>(p.slots * first), 0.f);
  p.norms.assign(static_cast<size_t>(p.slots), kInf);
  for (auto& t : p.tails) t.assign(static_cast<size_t>(p.slots), 0.f);
  p.coordinates.assign(static_cast<size_t>(p.slots * width), 0.f);
  p.box_low.assign(static_cast<size_t>(groups * box_axes * kLanes), kInf);
  p.box_high.assign(static_cast<size_t>(groups * box_axes * kLanes), -kInf);
  p.box_tail_low.assign(static_cast<size_t>(groups * kLanes), kInf);
  p.box_tail_high.assign(static_cast<size_t>(groups * kLanes), -kInf);
  double first_norm = 0.0;
  int64_t slot = 0, group = 0;
  for (const auto& m : members) {
    if (m.empty()) continue;
    Cell cell{slot, slot, group, 0.0, kInf, 0.f};
    // The centre is the mean of the members in float; the radius is measured from exactly that centre.
    std::vector<double> centre(static_cast<size_t>(first), 0.0);
    for (int64_t r : m)
      for (int64_t a = 0; a < first; ++a) centre[a] += rotated.coordinates[r * width + a];
    std::vector<float> stored_centre(static_cast<size_t>(first));
    for (int64_t a = 0; a < first; ++a) stored_centre[a] = static_cast<float>(centre[a] / m.size());
    for (int64_t r : m) {
      const float* cr = rotated.coordinates.data() + r * width;
      double partial = 0.0, to_centre = 0.0;
      for (int64_t a = 0; a < first; ++a) {
        partial += static_cast<double>(cr[a]) * cr[a];
        to_centre += (static_cast<double>(cr[a]) - stored_centre[a]) * (static_cast<double>(cr[a]) - stored_centre[a]);
      }
      first_norm = std::max(first_norm, std::sqrt(partial));
      cell.radius = std::max(cell.radius, std::sqrt(to_centre));
      cell.tail_low = std::min(cell.tail_low, rotated.tails[0][r]);
      cell.tail_high = std::max(cell.tail_high, rotated.tails[0][r]);
      p.row_of_slot[slot] = r;
      p.norms[slot] = static_cast<float>(partial);
      for (int t = 0; t < kTiers; ++t) p.tails[t][slot] = rotated.tails[t][r];
      std::memcpy(p.coordinates.data() + slot * width, cr, static_cast<size_t>(width) * sizeof(float));
      for (int64_t a = 0; a < first; ++a)
        p.blocks[(slot / kLanes) * first * kLanes + a * kLanes + slot % kLanes] = cr[a];
      const int64_t block = (slot - cell.begin) / kLanes;
      const int64_t lane = block % kLanes, box = cell.box_group + block / kLanes;
      for (int64_t a = 0; a < box_axes; ++a) {
        float& low = p.box_low[(box * box_axes + a) * kLanes + lane];
        float& high = p.box_high[(box * box_axes + a) * kLanes + lane];
        low = std::min(low, cr[a]);
        high = std::max(high, cr[a]);
      }
      float& tail_low = p.box_tail_low[box * kLanes + lane];
      float& tail_high = p.box_tail_high[box * kLanes + lane];
      tail_low = std::min(tail_low, rotated.box_tails[r]);
      tail_high = std::max(tail_high, rotated.box_tails[r]);
      ++slot;
    }
    cell.radius *= 1.0 + 1e-12;
    slot = aligned(slot);
    group += ((slot - cell.begin) / kLanes + kLanes - 1) / kLanes;
    cell.end = slot;
    p.cells.push_back(cell);
    const size_t ci = p.cells.size() - 1;
    if (ci % kLanes == 0) p.centres.resize(p.centres.size() + static_cast<size_t>(first * kLanes), 0.f);
    for (int64_t a = 0; a < first; ++a) p.centres[(ci / kLanes * first + a) * kLanes + ci % kLanes] = stored_centre[a];
  }
  p.first_tier_norm = static_cast<float>(first_norm * (1.0 + 4.0 * kFloatUnit));
}

}  // namespace

double tail_error(double norm, double coordinate_error, double tail, double unit) {
  const double e = 2.0 * norm * coordinate_error + coordinate_error * coordinate_error + 4.0 * unit * norm * norm;
  const double through_square = tail > 0.0 ? std::min(std::sqrt(e), e / tail) : std::sqrt(e);
  return through_square + kFloatUnit * tail;  // + rounding the tail to float
}

namespace {

// The quantized dense tier (see PruningIndex::quantized_rows).
void quantize_dense_tier(PruningIndex& p) {
  constexpr int64_t lanes = kQuantizedLanes;
  const int64_t width = p.width(), axes = p.axes[2], padded = (axes + 3) / 4 * 4, groups = p.quantized_groups();
  p.quantized_axes = padded;
  p.quantized_rows.assign(static_cast<size_t>(groups * padded * lanes), 128);
  p.quantized_terms.assign(static_cast<size_t>(groups * kQuantizedTerms * lanes), 0.0f);
  for (int64_t s = 0; s < groups * lanes; ++s) {
    const int64_t g = s / lanes, lane = s % lanes;
    float* terms = p.quantized_terms.data() + g * kQuantizedTerms * lanes + lane;
    if (s >= p.slots || p.row_of_slot[s] < 0) {
      terms[kNorm * lanes] = kNaN;
      continue;
    }
    const Quantized q = quantize(p.coordinates.data() + s * width, axes, [&](int64_t a, int32_t code) {
      p.quantized_rows[static_cast<size_t>(g * padded * lanes + unsigned_code_at(a, lane))] =
          static_cast<uint8_t>(code + 128);
    });
    terms[kScale * lanes] = q.scale;
    terms[kNorm * lanes] = static_cast<float>(q.squared);
    terms[kLength * lanes] = q.norm;
    terms[kError * lanes] = q.error;
    terms[kTail * lanes] = p.tails[2][s];
  }
}

}  // namespace

void derive_dense_tiers(PruningIndex& p) {
  const int64_t width = p.width();
  p.dense_norms.assign(static_cast<size_t>(p.slots), kNaN);
  double reach = 0.0;
  for (int64_t s = 0; s < p.slots; ++s) {
    if (p.row_of_slot[s] < 0) continue;
    const float* c = p.coordinates.data() + s * width;
    double squared = 0.0;
    for (int64_t a = 0, t = 1; t <= 2; ++t) {
      for (; a < p.axes[t]; ++a) squared += static_cast<double>(c[a]) * c[a];
      if (t == 1) p.dense_norms[s] = static_cast<float>(squared);
      reach = std::max(reach, std::sqrt(squared) + p.tails[t][s]);
    }
  }
  p.dense_reach = static_cast<float>(reach * (1.0 + 4.0 * kFloatUnit));
  p.quantized_axes = 0;
  p.quantized_rows.clear();
  p.quantized_terms.clear();
  if (native_quantized_products()) quantize_dense_tier(p);
}

std::shared_ptr<const PruningIndex> build_pruning_index(const float* rows, int64_t n, int64_t d) {
  auto p = std::make_shared<PruningIndex>();
  p->rows = rows;
  p->count = n;
  p->dim = d;
  for (int t = 0; t < kTiers; ++t) p->axes[t] = std::min(kTierAxes[t], d);
  p->box_axes = std::min(kBoxAxes, p->axes[0]);
  p->tail_levels[0] = p->box_axes;
  for (int t = 0; t < kTiers; ++t) p->tail_levels[t + 1] = p->axes[t];
  // Non-finite values would make every bound meaningless.
  if (!all_finite(rows, n * d))
    throw std::invalid_argument("ExactPrunedNN: the memory bank contains NaN or infinite values");
  const at::Tensor x = at::from_blob(const_cast<float*>(rows), {n, d}, at::kFloat);
  PrincipalAxes principal = principal_axes(x, p->width(), n);
  p->mean = principal.mean;
  const at::Tensor basis64 = principal.axes.t().contiguous();
  p->basis = basis64.to(at::kFloat).contiguous();
  const RotatedRows rotated = rotate_rows(*p, x, basis64);
  lay_out(*p, rotated, cells_of(*p, rotated));
  derive_dense_tiers(*p);
  use_huge_pages(rows, static_cast<size_t>(n * d) * sizeof(float));
  use_huge_pages(p->coordinates.data(), p->coordinates.size() * sizeof(float));
  use_huge_pages(p->blocks.data(), p->blocks.size() * sizeof(float));
  return p;
}

}  // namespace patchcore::pruning

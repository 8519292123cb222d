#pragma once
// ExactPrunedNN's pruning structure over a memory bank, and the error bounds that keep its pruning exact.
// Private to nn: pruning_index.cpp builds it, pruned_search.cpp searches it (docs/exact_search.md).
//
// Bank and queries are rotated into the bank's principal axes, which preserves distances. For each (query, row)
// pair,
//   |q_1:j - r_1:j|^2 + (|q_j+1:D| - |r_j+1:D|)^2  <=  |q - r|^2
// (the second term by the reverse triangle inequality), so a row whose bound exceeds the k-th best distance
// found so far cannot be a neighbour. Rows are grouped into k-means cells of about 64 over the first tier's axes;
// within a cell they are ordered by a k-d split into blocks of 8 whose bounding boxes bound all their rows at
// once. Rows are stored cell by cell in "slots": each cell starts at a block, and padding slots have an infinite
// first-tier norm so that no bound lets them through.
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "patchcore/core/numeric.h"
#include "patchcore/core/quantized.h"

namespace patchcore::pruning {

// Leading principal axes of the four bound tiers (clamped to the feature length). The first tier's bound is
// computed for every row of each block whose box passes; each refinement cuts the rows that reach the next,
// costlier stage about threefold on CNN patch features. The last tier spares exact distances, which read a whole
// row: on magnetic_tile's features, rows left per query at the nearest distance are 51 over 256 axes and 12 over
// 384. Only the dense search uses it (pruned_search.cpp).
constexpr int kTiers = 4;
constexpr int64_t kTierAxes[kTiers] = {32, 128, 256, 384};
// Leading axes of the bounding box of each block of 8 rows, checked before the block's first-tier bounds.
constexpr int64_t kBoxAxes = 16;
constexpr int64_t kLanes = 8;            // rows per block, interleaved in the first-tier coordinates
enum QuantizedTerm { kScale, kNorm, kLength, kError, kTail, kQuantizedTerms };

struct Cell {
  int64_t begin, end;         // slots
  int64_t box_group;          // its first group of boxes
  double radius;              // of its rows' first-tier coordinates around the centre
  float tail_low, tail_high;  // range of its rows' first-tier tails
};

struct PruningIndex {
  const float* rows = nullptr;  // the bank, [count, dim], owned by the index that holds it
  int64_t count = 0, dim = 0;
  int64_t axes[kTiers] = {};             // per tier, clamped to dim; the last is the projection width
  int64_t box_axes = 0;                  // kBoxAxes clamped to axes[0]
  int64_t tail_levels[kTiers + 1] = {};  // box_axes, then axes
  at::Tensor mean;                       // [dim] float32: the centre for rows and queries alike
  at::Tensor basis;                      // [dim, width] float32: leading principal axes
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
  std::vector<Cell> cells;
  std::vector<float> centres;   // [cell groups of 8, axes[0], 8]: interleaved, 8 cells per lane group
  float row_error = 0.f;        // bound on every row's representation error (see tail_error)
  float first_tier_norm = 0.f;  // largest first-tier norm of a row
  // The dense search's first tier (pruned_search.cpp), bounded for every slot at once; derived from the coordinates
  // when the structure is built or read. Padding has NaN norms, so that its dense bounds pass no threshold, not even
  // the infinite one before k rows are found. In float, over the second tier's axes, by a matrix product:
  std::vector<float> dense_norms;  // [slots] squared norms over those axes; NaN on padding
  float dense_reach = 0.f;         // largest norm over a dense tier's axes plus tail beyond them, of a row
  // Where native_quantized_products(), in 8-bit integers over the third tier's axes instead: per slot, its
  // coordinates c over those axes divided by its scale s = max |c_i| / 127 and rounded, plus 128, laid out for the
  // integer dot products, 16 slots per group: [groups][quantized_axes / 4][16][4], padded with code 128 (zero).
  int64_t quantized_axes = 0;           // the third tier's axes rounded up to a multiple of 4
  std::vector<uint8_t> quantized_rows;  // [groups * quantized_axes * 16]
  // Per group of 16 slots, kQuantizedTerms vectors of 16: the scale s, |c|^2 (NaN on padding), |c| and the
  // error |c - s * codes| (both rounded up), and the tail beyond the third tier.
  std::vector<float> quantized_terms;  // [groups][kQuantizedTerms][16]

  int64_t width() const { return axes[kTiers - 1]; }
  int64_t quantized_groups() const { return (slots + kQuantizedLanes - 1) / kQuantizedLanes; }
};


// Fills dense_norms and dense_reach and, where native_quantized_products(), the quantized tier from the coordinates.
void derive_dense_tiers(PruningIndex& index);


// The pruning structure of the bank `rows` ([n, d] float32, finite, kept alive by the caller).
std::shared_ptr<const PruningIndex> build_pruning_index(const float* rows, int64_t n, int64_t d);

// The structure as a file, so that loading a model does not derive it again (its principal axes and rotation take
// most of a load): the fields in order, native little-endian, the CRC-32 of the bank it was built for, and the
// CRC-32 of everything before it last. Written whole or not at all.
void write_pruning_index(const PruningIndex& index, const std::string& path);
// The structure in `path` for the bank `rows` ([n, d]), or null when the file holds an earlier layout of the
// structure, which is then rebuilt from the bank. Throws std::runtime_error naming the file when it is damaged,
// was built for another bank, or any count, index or value is out of place: every slot, cell and box the search
// reads is checked.
std::shared_ptr<const PruningIndex> read_pruning_index(const std::string& path, const float* rows, int64_t n,
                                                       int64_t d);

// Which search the calls on one bank have chosen, shared by them (and safe to share between threads). Once
// kTrustedChoices sampled calls in a row chose the dense search, later calls take it without sampling, except every
// kResampleEvery-th call, which samples again and so notices queries that the cells prune well.
struct SearchHistory {
  static constexpr int kTrustedChoices = 3;
  static constexpr int64_t kResampleEvery = 16;
  std::atomic<int64_t> calls{0};
  std::atomic<int> dense_in_a_row{0};
};

// How much work a search did.
struct SearchCounts {
  int64_t refined = 0;  // rows whose first-tier bound did not exclude them
  int64_t exact = 0;    // rows whose exact distance was computed
  int64_t dense = 0;    // queries searched by the dense search
};

// The k nearest bank rows of each query ([nq, d] float32 contiguous, k <= count): (squared distances [nq, k],
// row indices [nq, k]), those of brute force, with ties in distance broken by the lower row index. Runs on at most
// max_threads threads (0: the thread setting); learns which search suits the bank in `history` when given; adds
// its work to `counts` when given. With `quantized_products`, the dense search's first tier runs on the quantized
// coordinates where the index holds them; the neighbours are the same either way.
std::pair<at::Tensor, at::Tensor> search(const PruningIndex& index, int64_t k, const at::Tensor& queries,
                                         int max_threads, bool quantized_products, SearchHistory* history,
                                         SearchCounts* counts);

// Relative error bound of a float sum of n non-negative terms in 16 lanes (sum_of_squared_differences).
inline double relative_error_of_sum(int64_t n) { return (static_cast<double>(n) / 16.0 + 24.0) * kFloatUnit * 1.01; }

// A vector x is represented by its leading rotated coordinates c and, per tier, the norm t of the rest. For the
// exact rotation (c*, t*) the bound is a distance in R^(axes+1), so an error of at most e in (c, t) moves the
// square root of a bound by at most e. This is e for a tail computed as sqrt(|x|^2 - |c|^2) from coordinates
// that are off by at most `coordinate_error` in norm, the subtraction's own rounding (`unit`) included.
double tail_error(double norm, double coordinate_error, double tail, double unit);

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

}  // namespace patchcore::pruning

#pragma once
// The farthest-point loop of the greedy coreset samplers (sampler.h) and its initial scores, on projected
// features z:
//     k = argmax(score) (first index on ties); select k; score_i = min(score_i, d(z_i, z_k))
// with d(a, b) = sqrt(max(0, (-2 a.b + |a|^2) + |b|^2)) in float32. With z = sampler.project(x) and
// s = sampler.initial_scores(z), greedy_coreset_fast(z, s, count) is what select() runs, and
// greedy_coreset_reference(z, s, count), a plain scan per selection as the Python reference does, selects the
// same. Every distance of both goes through one kernel, and the fast loop only skips distances that provably
// cannot lower a score or that cannot change the argmax (docs/coreset.md).
//
// `projected` is always [N, dim] float32 contiguous CPU with N >= 1; equal inputs give bit-identical distances in
// every function, whatever the thread count.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace patchcore {

// d(z_i, z_p) for every row i (the row is the first operand), one row of the distance matrix at a time.
std::vector<float> distances_to_point(const at::Tensor& projected, int64_t point);
// Mean over `points` of d(z_i, z_p) (float sum in the order given, divided by the count).
std::vector<float> mean_distance_to_points(const at::Tensor& projected, const std::vector<int64_t>& points);
// sqrt(sum_j d(z_i, z_j)^2) for every row i, accumulated in double in j order.
std::vector<float> distance_matrix_row_norms(const at::Tensor& projected);

// Work done by greedy_coreset_fast, for benchmarks.
struct GreedyStats {
  int64_t exact_distances = 0;  // point-to-centre distances computed by the kernel
  int64_t lower_bounds = 0;     // point-centre pairs whose lower bound was evaluated
  int64_t catch_ups = 0;        // times a point on top of the queue was measured against centres it had not seen
};

// The lower bounds greedy_coreset_fast rules centres out with: 8-bit dot products over every dimension where the
// CPU has them (AVX512_VNNI) and the points have at most 4,096 dimensions (elsewhere, as kFloat), or float sums over
// leading principal coordinates.
enum class CoresetBounds { kQuantized, kFloat };

// Both run `count` (>= 0) greedy selections starting from `scores` (one finite value per row) and return the
// selected indices; they return identical results for identical inputs, whatever the thread count and bounds.
std::vector<int64_t> greedy_coreset_reference(const at::Tensor& projected, std::vector<float> scores, int64_t count);
std::vector<int64_t> greedy_coreset_fast(const at::Tensor& projected, std::vector<float> scores, int64_t count,
                                         GreedyStats* stats = nullptr,
                                         CoresetBounds bounds = CoresetBounds::kQuantized);

// Peak bytes per point that greedy_coreset_fast, with its default bounds, holds beside the points themselves when it
// selects `percentage` of them, for planning fit's memory.
int64_t greedy_coreset_fast_bytes_per_row(int64_t dim, double percentage);

}  // namespace patchcore

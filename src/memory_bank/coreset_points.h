#pragma once
// What both greedy coreset loops (greedy_coreset.cpp, greedy_coreset_fast.cpp) share: the points, the one
// distance kernel every distance of both goes through, and the argmax order. Private to memory_bank.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <limits>
#include <vector>

namespace patchcore::coreset {

// out[r] = d(rows[r], centre) = sqrt(max(0, (-2 r.c + |r|^2) + |c|^2)), the row being the first operand as in
// the reference (distances of all features to the selected ones).
void distance_kernel(const float* const* rows, const float* row_norms, int64_t count, const float* centre,
                     float centre_norm, int64_t dim, float* out);

// out[r] = d(point, rows[r]), bit for bit what distance_kernel gives for `point` as a row and rows[r] as the
// centre: one point against many centres.
void distances_from_point(const float* point, float point_norm, const float* const* rows, const float* row_norms,
                          int64_t count, int64_t dim, float* out);

// out[i * out_dim + k] = x_i . w_k for `count` rows x_i of `in_dim` values and `out_dim` rows w_k.
void projection_kernel(const float* x, int64_t count, int64_t in_dim, const float* w, int64_t out_dim, float* out);

struct Points {
  const float* data = nullptr;
  int64_t n = 0;
  int64_t dim = 0;
  std::vector<const float*> rows;  // row pointers, the kernel's input format
  std::vector<float> norms;        // |z_i|^2 as the kernel computes it
  // Upper bound on |computed squared distance - exact squared distance| for every pair.
  double delta = 0.0;
};

// `projected` as Points; std::invalid_argument naming `who` unless it is a contiguous [N, dim] float32 CPU
// tensor with N, dim >= 1 and finite rows.
Points prepare_points(const at::Tensor& projected, const char* who);
// std::invalid_argument naming `who` unless there is one finite score per point and count >= 0.
void check_scores(const std::vector<float>& scores, const Points& p, int64_t count, const char* who);

// (score, index) ordered as argmax with the first index on ties.
struct Best {
  float score = -std::numeric_limits<float>::infinity();
  int64_t index = std::numeric_limits<int64_t>::max();
};
inline bool better(const Best& a, const Best& b) {
  return a.score > b.score || (a.score == b.score && a.index < b.index);
}

}  // namespace patchcore::coreset

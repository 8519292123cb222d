#pragma once
// Linear algebra shared by the coreset loop and the nearest-neighbour search: both bound distances from
// below in the leading principal axes of their points.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace patchcore {

// Rows per slice when a large matrix is processed through temporaries of `row_bytes` bytes per row. A slice's
// temporaries stay well below glibc's largest mmap threshold (32 MiB), so they come from the heap and are reused;
// at or above it every one is mapped afresh and each of its pages faulted in, which on a virtual machine costs
// a large share of the work.
inline int64_t slice_rows(int64_t row_bytes) {
  constexpr int64_t kSliceBytes = int64_t{8} << 20;
  return row_bytes >= kSliceBytes ? 1 : kSliceBytes / row_bytes;
}

struct PrincipalAxes {
  at::Tensor mean;  // [d] float32: the mean of the rows used
  at::Tensor axes;  // [count, d] float64: orthonormal to double rounding, strongest first
};

// The `count` (<= d) leading principal axes of the rows of `rows` ([n, d] float32, CPU, contiguous, n >= 1),
// from at most `max_samples` evenly spaced rows. Any orthonormal basis keeps a distance bound valid; the principal
// axes only make it tight, so float products suffice for the covariance.
PrincipalAxes principal_axes(const at::Tensor& rows, int64_t count, int64_t max_samples);

// Orders ids[0, n) along a k-d tree over the first `axes` values of each id's row (value a of id i at
// values[i * stride + a]): a node of more than `leaf_size` ids splits along its axis of largest variance at the
// first multiple of `align` from its middle, ties broken by id. Appends each leaf's [begin, end) to `leaves`
// when given. Points close in those axes end up close in the order, so a run of them has a small bounding box.
void kd_order(int64_t* ids, int64_t n, const float* values, int64_t stride, int64_t axes, int64_t leaf_size,
              int64_t align, std::vector<std::pair<int64_t, int64_t>>* leaves = nullptr);

}  // namespace patchcore

#include "patchcore/core/linalg.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "patchcore/core/parallel.h"

namespace patchcore {

PrincipalAxes principal_axes(const at::Tensor& rows, int64_t count, int64_t max_samples) {
  const int64_t n = rows.size(0), d = rows.size(1);
  if (count < 1 || count > d)
    throw std::invalid_argument("principal_axes: " + std::to_string(count) + " of " + std::to_string(d) +
                                " axes asked for");
  const int64_t samples = std::min(n, std::max<int64_t>(1, max_samples));
  const at::Tensor sample =
      samples == n ? rows : rows.index_select(0, at::arange(samples, at::kLong).mul(n).div(samples, "floor"));
  // In slices: a centred or double copy of a large bank would double its memory.
  const int64_t slice = slice_rows(d * static_cast<int64_t>(sizeof(double)));
  at::Tensor sum = at::zeros({d}, at::kDouble);
  for (int64_t s = 0; s < samples; s += slice)
    sum += sample.slice(0, s, std::min(samples, s + slice)).to(at::kDouble).sum(0);
  const at::Tensor mean = (sum / static_cast<double>(samples)).to(at::kFloat);
  at::Tensor covariance = at::zeros({d, d}, at::kDouble);
  for (int64_t s = 0; s < samples; s += slice) {
    const at::Tensor centred = sample.slice(0, s, std::min(samples, s + slice)) - mean;
    covariance += centred.t().mm(centred).to(at::kDouble);
  }
  // LAPACK's eigensolver makes thousands of small BLAS calls; with several threads each of them waits for
  // the others, which on a busy machine costs a hundred times the work. It solves in float, a quarter faster than
  // in double: the axes need only be near principal, and the QR below makes them orthonormal.
  at::Tensor vectors;
  with_openmp_threads(
      1, [&] { vectors = std::get<1>(at::linalg_eigh(covariance.to(at::kFloat), "L")).to(at::kDouble); });
  // Eigenvectors in columns, eigenvalues ascending: the last `count`, strongest first. Householder QR makes them
  // orthonormal to rounding level, which the bounds assume, and keeps the span of every leading few; it may flip
  // a sign, which no bound minds.
  const auto [q, r] = at::linalg_qr(vectors.slice(1, d - count, d).flip({1}), "reduced");
  // The eigenvectors have unit norm, so a small diagonal of R means they were not independent.
  if (!(r.diagonal().abs().min().item<double>() > 0.5))
    throw std::runtime_error("principal_axes: the eigenvectors are not independent");
  const at::Tensor axes = q.t().contiguous();
  return {mean, axes};
}

void kd_order(int64_t* ids, int64_t n, const float* values, int64_t stride, int64_t axes, int64_t leaf_size,
              int64_t align, std::vector<std::pair<int64_t, int64_t>>* leaves) {
  struct Node {
    int64_t begin, end;
  };
  std::vector<Node> stack{{0, n}};
  std::vector<std::pair<int64_t, int64_t>> found;
  while (!stack.empty()) {
    const Node node = stack.back();
    stack.pop_back();
    const int64_t size = node.end - node.begin;
    int64_t* first = ids + node.begin;
    if (size <= leaf_size) {
      if (size > 0) found.emplace_back(node.begin, node.end);
      continue;
    }
    int64_t split_axis = 0;
    double widest = -1.0;
    for (int64_t a = 0; a < axes; ++a) {
      double sum = 0.0, squares = 0.0;
      for (int64_t i = 0; i < size; ++i) {
        const double x = values[first[i] * stride + a];
        sum += x;
        squares += x * x;
      }
      const double variance = squares / static_cast<double>(size) - (sum / size) * (sum / size);
      if (variance > widest) {
        widest = variance;
        split_axis = a;
      }
    }
    const int64_t half = std::min(size - 1, std::max(align, ((size + 1) / 2 + align - 1) / align * align));
    std::nth_element(first, first + half, first + size, [&](int64_t x, int64_t y) {
      const float vx = values[x * stride + split_axis], vy = values[y * stride + split_axis];
      return vx < vy || (vx == vy && x < y);
    });
    // The right half first, so that leaves come out in tree order.
    stack.push_back({node.begin + half, node.end});
    stack.push_back({node.begin, node.begin + half});
  }
  if (leaves) leaves->insert(leaves->end(), found.begin(), found.end());
}

}  // namespace patchcore

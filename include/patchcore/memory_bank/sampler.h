#pragma once
// sampler.py: subsampling of the memory bank (identity, random, greedy coreset, approximate greedy coreset).
//
// The greedy samplers work on features projected to `dimension_to_project_features_to` dimensions and run
// the farthest-point loop
//     k = argmax(score) (first index on ties); select k; score_i = min(score_i, d(z_i, z_k))
// with d(a, b) = sqrt(max(0, (-2 a.b + |a|^2) + |b|^2)) in float32. Two implementations of the loop exist:
// greedy_coreset_reference (a plain scan per selection, as the Python reference does) and greedy_coreset_fast
// (lower bounds from principal-component coordinates rule out most points). Every distance of both goes
// through one kernel, and the fast loop only skips points whose computed distance provably cannot lower their
// score, so both select exactly the same indices.
//
// Randomness (projection matrix, starting points, random subset) comes from std::mt19937_64 seeded by the
// sampler's seed, mapped to numbers without std:: distributions, so results are the same on every platform
// and for every thread count. It cannot reproduce the Python reference's torch/NumPy random streams; for
// bit-exact comparisons inject the reference's W (set_projection) and starting points (set_starting_points).
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace patchcore {

class BaseSampler {
 public:
  virtual ~BaseSampler() = default;

  // Selection runs in two steps so that fit can stream the training features past the sampler and keep only
  // what the selection needs of them. summarize() maps rows to that summary (the projection for the greedy
  // samplers, nothing but the row count for the others) one row at a time, so the summaries of consecutive
  // chunks, concatenated, equal the summary of all rows. `features` must be [n, D] float32 CPU with n, D >= 1;
  // std::invalid_argument otherwise.
  virtual at::Tensor summarize(const at::Tensor& features) const;
  // Indices of the selected rows, in selection order, given the summary of all N rows.
  virtual std::vector<int64_t> select_from_summary(const at::Tensor& summary) = 0;
  // How many of n rows select() keeps.
  virtual int64_t selection_size(int64_t n) const = 0;
  // Peak bytes per row of D features that the summary and select_from_summary() hold together, for planning
  // fit's memory.
  virtual int64_t selection_bytes_per_row(int64_t feature_dim) const;

  // select_from_summary(summarize(features)).
  std::vector<int64_t> select(const at::Tensor& features);
  // features.index_select(0, select(features)): the original (unprojected) rows.
  at::Tensor run(const at::Tensor& features);
};

class IdentitySampler : public BaseSampler {
 public:
  std::vector<int64_t> select_from_summary(const at::Tensor& summary) override;
  int64_t selection_size(int64_t n) const override { return n; }
};

// int(N * percentage) distinct rows chosen uniformly at random. Every call draws from a generator freshly
// seeded with `seed`, so repeated calls select the same rows.
class RandomSampler : public BaseSampler {
 public:
  // percentage must lie in (0, 1); std::invalid_argument otherwise.
  explicit RandomSampler(double percentage, uint64_t seed = 0);
  std::vector<int64_t> select_from_summary(const at::Tensor& summary) override;
  int64_t selection_size(int64_t n) const override;

 private:
  double percentage_;
  uint64_t seed_;
};

enum class GreedyAlgorithm {
  kFast,       // greedy_coreset_fast (default)
  kReference,  // greedy_coreset_reference
};

// Full greedy coreset: initial score_i = L2 norm of row i of the N x N distance matrix (computed blockwise,
// O(N^2 * dim) time, O(N) memory), then int(N * percentage) greedy selections.
class GreedyCoresetSampler : public BaseSampler {
 public:
  // `device` is where the projection runs when it is not the CPU (the CPU projection uses the library's own
  // kernel so that it does not depend on the thread count); the greedy loop always runs on the CPU.
  GreedyCoresetSampler(double percentage, c10::Device device = c10::kCPU,
                       int64_t dimension_to_project_features_to = 128, uint64_t seed = 0);

  // Uses `weight` ([dimension_to_project_features_to, D] float32, like nn.Linear.weight) instead of a
  // random matrix; select() throws if D does not match the features. An undefined tensor clears it.
  void set_projection(at::Tensor weight);
  void set_algorithm(GreedyAlgorithm algorithm) { algorithm_ = algorithm; }

  // The matrix select() multiplies features with D columns by: the injected one, or a seeded draw from
  // U(-1/sqrt(D), 1/sqrt(D)) (PyTorch's nn.Linear default initialisation).
  at::Tensor projection_weight(int64_t feature_dim) const;
  // Z, the points the loop works on: features x W^T, or the features themselves when D already equals the
  // target dimension. [N, dim] float32 contiguous CPU.
  at::Tensor project(const at::Tensor& features) const;
  // Score of every point before the first selection.
  virtual std::vector<float> initial_scores(const at::Tensor& projected);

  // The summary is project(features); select_from_summary() takes Z, [N, dimension_to_project_features_to].
  at::Tensor summarize(const at::Tensor& features) const override { return project(features); }
  std::vector<int64_t> select_from_summary(const at::Tensor& summary) override;
  int64_t selection_size(int64_t n) const override;
  int64_t selection_bytes_per_row(int64_t feature_dim) const override;

 protected:
  double percentage_;
  c10::Device device_;
  int64_t dimension_;
  uint64_t seed_;
  GreedyAlgorithm algorithm_ = GreedyAlgorithm::kFast;
  at::Tensor weight_;
};

// Approximate greedy coreset (the one PatchCore uses): initial score_i = mean distance to
// min(number_of_starting_points, N) distinct random points, which are not themselves selected.
class ApproximateGreedyCoresetSampler : public GreedyCoresetSampler {
 public:
  ApproximateGreedyCoresetSampler(double percentage, c10::Device device = c10::kCPU,
                                  int64_t number_of_starting_points = 10,
                                  int64_t dimension_to_project_features_to = 128, uint64_t seed = 0);

  // Uses these row indices as the starting points (non-empty; each must be < N at select()). An empty
  // vector returns to seeded random starts.
  void set_starting_points(std::vector<int64_t> indices);
  // The starting points select() uses for n rows.
  std::vector<int64_t> starting_points(int64_t n) const;

  std::vector<float> initial_scores(const at::Tensor& projected) override;

 private:
  int64_t number_of_starting_points_;
  std::vector<int64_t> starting_points_;
};

// Injects the published code's randomness, as the oracle (run_reference.py --dump) writes it, into `sampler`:
// an .npz archive whose array `projection` (float32 [dimension_to_project_features_to, D], the nn.Linear weight)
// becomes the projection, and whose `start_points` (integer [n]) become the starting points of an
// ApproximateGreedyCoresetSampler. Other arrays of the file are ignored. With the same features the sampler then
// selects the published code's rows. Throws std::runtime_error naming the file when an array is missing or does
// not fit, and std::invalid_argument when the sampler draws no such randomness (identity, random).
void use_reference_randomness(BaseSampler& sampler, const std::string& npz_path);

// Factory used by the CLI: "identity", "random", "greedy", "approx_greedy". Throws std::invalid_argument
// for other names and (except for identity) for a percentage outside (0, 1).
std::unique_ptr<BaseSampler> make_sampler(const std::string& name, double percentage, uint64_t seed,
                                          c10::Device device = c10::kCPU);

}  // namespace patchcore

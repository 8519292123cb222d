#include "patchcore/memory_bank/sampler.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>

#include "coreset_points.h"
#include "patchcore/core/parallel.h"
#include "patchcore/core/tensor_checks.h"
#include "patchcore/io/npy.h"
#include "patchcore/memory_bank/greedy_coreset.h"

namespace patchcore {
namespace {

// ---- Seeded randomness, identical on every platform. ----

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// Independent streams for the different random choices made from one seed.
enum class Stream : uint64_t { kRandomSubset = 1, kProjection = 2, kStartingPoints = 3 };

std::mt19937_64 make_rng(uint64_t seed, Stream stream) {
  return std::mt19937_64(splitmix64(seed ^ splitmix64(static_cast<uint64_t>(stream))));
}

// Uniform in [0, n) by rejection, so no value is favoured.
uint64_t uniform_below(std::mt19937_64& rng, uint64_t n) {
  const uint64_t threshold = (0 - n) % n;  // 2^64 mod n: the values below it would be over-represented
  for (;;) {
    const uint64_t x = rng();
    if (x >= threshold) return x % n;
  }
}

// Uniform in [0, 1) with 53 random bits.
double uniform01(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }

// `k` distinct indices of [0, n) in draw order (partial Fisher-Yates).
std::vector<int64_t> distinct_indices(int64_t n, int64_t k, std::mt19937_64& rng) {
  std::vector<int64_t> pool(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) pool[i] = i;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t j = i + static_cast<int64_t>(uniform_below(rng, static_cast<uint64_t>(n - i)));
    std::swap(pool[i], pool[j]);
  }
  pool.resize(static_cast<size_t>(k));
  return pool;
}

// ---- Argument checks. ----

void check_percentage(double percentage, const char* who) {
  if (!(percentage > 0.0 && percentage < 1.0)) {
    std::ostringstream msg;
    msg << who << ": percentage must lie strictly between 0 and 1, got " << percentage;
    throw std::invalid_argument(msg.str());
  }
}

int64_t selection_count(int64_t n, double percentage) {
  return static_cast<int64_t>(static_cast<double>(n) * percentage);
}

// N of a summary that only carries the row count.
int64_t summary_rows(const at::Tensor& summary, const char* who) {
  if (!summary.defined() || summary.dim() != 2 || summary.size(0) < 1)
    throw std::invalid_argument(std::string(who) + ": the summary must be [N, k] with N >= 1, got " +
                                shape_string(summary));
  return summary.size(0);
}

}  // namespace

at::Tensor BaseSampler::summarize(const at::Tensor& features) const {
  const at::Tensor f = float_rows(features, "sampler");
  return at::empty({f.size(0), 0}, at::kFloat);
}

int64_t BaseSampler::selection_bytes_per_row(int64_t) const { return sizeof(int64_t); }

std::vector<int64_t> BaseSampler::select(const at::Tensor& features) {
  return select_from_summary(summarize(features));
}

at::Tensor BaseSampler::run(const at::Tensor& features) {
  const std::vector<int64_t> indices = select(features);
  return features.index_select(0, at::tensor(indices, at::kLong));
}

std::vector<int64_t> IdentitySampler::select_from_summary(const at::Tensor& summary) {
  const int64_t n = summary_rows(summary, "IdentitySampler");
  std::vector<int64_t> all(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) all[i] = i;
  return all;
}

RandomSampler::RandomSampler(double percentage, uint64_t seed) : percentage_(percentage), seed_(seed) {
  check_percentage(percentage, "RandomSampler");
}

int64_t RandomSampler::selection_size(int64_t n) const { return selection_count(n, percentage_); }

std::vector<int64_t> RandomSampler::select_from_summary(const at::Tensor& summary) {
  const int64_t n = summary_rows(summary, "RandomSampler");
  std::mt19937_64 rng = make_rng(seed_, Stream::kRandomSubset);
  return distinct_indices(n, selection_size(n), rng);
}

GreedyCoresetSampler::GreedyCoresetSampler(double percentage, c10::Device device,
                                           int64_t dimension_to_project_features_to, uint64_t seed)
    : percentage_(percentage), device_(device), dimension_(dimension_to_project_features_to), seed_(seed) {
  check_percentage(percentage, "GreedyCoresetSampler");
  if (dimension_ < 1)
    throw std::invalid_argument("GreedyCoresetSampler: dimension_to_project_features_to must be >= 1, got " +
                                std::to_string(dimension_));
}

void GreedyCoresetSampler::set_projection(at::Tensor weight) {
  if (weight.defined()) {
    if (weight.dim() != 2 || weight.size(0) != dimension_ || weight.size(1) < 1 || weight.scalar_type() != at::kFloat)
      throw std::invalid_argument("GreedyCoresetSampler::set_projection: weight must be float32 [" +
                                  std::to_string(dimension_) + ", D], got " + shape_string(weight));
    weight = weight.to(at::kCPU).contiguous().clone();
  }
  weight_ = weight;
}

at::Tensor GreedyCoresetSampler::projection_weight(int64_t feature_dim) const {
  if (weight_.defined()) {
    if (weight_.size(1) != feature_dim)
      throw std::invalid_argument("GreedyCoresetSampler: the injected projection has " +
                                  std::to_string(weight_.size(1)) + " columns but the features have " +
                                  std::to_string(feature_dim));
    return weight_;
  }
  std::mt19937_64 rng = make_rng(seed_, Stream::kProjection);
  const double bound = 1.0 / std::sqrt(static_cast<double>(feature_dim));
  at::Tensor w = at::empty({dimension_, feature_dim}, at::kFloat);
  float* data = w.data_ptr<float>();
  for (int64_t i = 0; i < w.numel(); ++i) data[i] = static_cast<float>((2.0 * uniform01(rng) - 1.0) * bound);
  return w;
}

at::Tensor GreedyCoresetSampler::project(const at::Tensor& features) const {
  const at::Tensor f = float_rows(features, "GreedyCoresetSampler");
  const int64_t n = f.size(0), in_dim = f.size(1);
  if (in_dim == dimension_) return f;
  const at::Tensor w = projection_weight(in_dim);
  if (!device_.is_cpu()) {
    try {
      return at::matmul(f.to(device_), w.to(device_).t()).to(at::kCPU).contiguous();
    } catch (const c10::Error& e) {
      throw std::runtime_error("GreedyCoresetSampler: projection on " + device_.str() +
                               " failed: " + e.what_without_backtrace());
    }
  }
  at::Tensor z = at::empty({n, dimension_}, at::kFloat);
  const float* x = f.data_ptr<float>();
  const float* wd = w.data_ptr<float>();
  float* zd = z.data_ptr<float>();
  const int64_t block = 256;
  parallel_for((n + block - 1) / block, [&](int64_t t, int) {
    const int64_t b = t * block;
    coreset::projection_kernel(x + b * in_dim, std::min(block, n - b), in_dim, wd, dimension_, zd + b * dimension_);
  });
  return z;
}

std::vector<float> GreedyCoresetSampler::initial_scores(const at::Tensor& projected) {
  return distance_matrix_row_norms(projected);
}

int64_t GreedyCoresetSampler::selection_size(int64_t n) const { return selection_count(n, percentage_); }

int64_t GreedyCoresetSampler::selection_bytes_per_row(int64_t) const {
  return dimension_ * static_cast<int64_t>(sizeof(float)) + greedy_coreset_fast_bytes_per_row(dimension_, percentage_);
}

std::vector<int64_t> GreedyCoresetSampler::select_from_summary(const at::Tensor& summary) {
  if (!summary.defined() || summary.dim() != 2 || summary.size(1) != dimension_)
    throw std::invalid_argument("GreedyCoresetSampler: the summary must be the projected features [N, " +
                                std::to_string(dimension_) + "], got " + shape_string(summary));
  const int64_t count = selection_size(summary.size(0));
  std::vector<float> scores = initial_scores(summary);
  return algorithm_ == GreedyAlgorithm::kFast ? greedy_coreset_fast(summary, std::move(scores), count)
                                              : greedy_coreset_reference(summary, std::move(scores), count);
}

ApproximateGreedyCoresetSampler::ApproximateGreedyCoresetSampler(double percentage, c10::Device device,
                                                                 int64_t number_of_starting_points,
                                                                 int64_t dimension_to_project_features_to,
                                                                 uint64_t seed)
    : GreedyCoresetSampler(percentage, device, dimension_to_project_features_to, seed),
      number_of_starting_points_(number_of_starting_points) {
  if (number_of_starting_points < 1)
    throw std::invalid_argument("ApproximateGreedyCoresetSampler: number_of_starting_points must be >= 1, got " +
                                std::to_string(number_of_starting_points));
}

void ApproximateGreedyCoresetSampler::set_starting_points(std::vector<int64_t> indices) {
  for (int64_t s : indices)
    if (s < 0)
      throw std::invalid_argument("ApproximateGreedyCoresetSampler::set_starting_points: negative index " +
                                  std::to_string(s));
  starting_points_ = std::move(indices);
}

std::vector<int64_t> ApproximateGreedyCoresetSampler::starting_points(int64_t n) const {
  if (!starting_points_.empty()) {
    for (int64_t s : starting_points_)
      if (s >= n)
        throw std::invalid_argument("ApproximateGreedyCoresetSampler: starting point " + std::to_string(s) +
                                    " is outside the " + std::to_string(n) + " feature rows");
    return starting_points_;
  }
  std::mt19937_64 rng = make_rng(seed_, Stream::kStartingPoints);
  return distinct_indices(n, std::min(number_of_starting_points_, n), rng);
}

std::vector<float> ApproximateGreedyCoresetSampler::initial_scores(const at::Tensor& projected) {
  return mean_distance_to_points(projected, starting_points(projected.size(0)));
}

void use_reference_randomness(BaseSampler& sampler, const std::string& npz_path) {
  auto* greedy = dynamic_cast<GreedyCoresetSampler*>(&sampler);
  if (!greedy)
    throw std::invalid_argument("--reference-randomness needs a greedy coreset sampler (greedy or approx_greedy)");
  const bool approximate = dynamic_cast<ApproximateGreedyCoresetSampler*>(&sampler) != nullptr;
  std::map<std::string, NpyArray> arrays =
      read_npz(npz_path, approximate ? std::vector<std::string>{"projection", "start_points"}
                                     : std::vector<std::string>{"projection"});
  const NpyArray& projection = arrays.at("projection");
  if (projection.dtype != "f4" || projection.shape.size() != 2)
    throw std::runtime_error(npz_path + ": 'projection' must be a float32 matrix");
  const std::vector<float> weights = projection.as_float();
  try {
    greedy->set_projection(
        at::from_blob(const_cast<float*>(weights.data()), {projection.shape[0], projection.shape[1]}, at::kFloat)
            .clone());
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error(npz_path + ": 'projection' does not fit the sampler: " + e.what());
  }
  if (approximate) {
    const NpyArray& starts = arrays.at("start_points");
    if (starts.dtype != "i8" && starts.dtype != "i4")
      throw std::runtime_error(npz_path + ": 'start_points' must hold integers");
    try {
      static_cast<ApproximateGreedyCoresetSampler&>(sampler).set_starting_points(starts.as_int64());
    } catch (const std::invalid_argument& e) {
      throw std::runtime_error(npz_path + ": " + e.what());
    }
  }
}

std::unique_ptr<BaseSampler> make_sampler(const std::string& name, double percentage, uint64_t seed,
                                          c10::Device device) {
  if (name == "identity") return std::make_unique<IdentitySampler>();
  if (name == "random") return std::make_unique<RandomSampler>(percentage, seed);
  if (name == "greedy") return std::make_unique<GreedyCoresetSampler>(percentage, device, 128, seed);
  if (name == "approx_greedy")
    return std::make_unique<ApproximateGreedyCoresetSampler>(percentage, device, 10, 128, seed);
  throw std::invalid_argument("unknown sampler '" + name + "' (expected identity, random, greedy or approx_greedy)");
}

}  // namespace patchcore
#include "patchcore/memory_bank/sampler.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <mutex>
#include <numeric>
#include <queue>
#include <random>
#include <sstream>
#include <stdexcept>
#include <system_error>
#include <thread>

namespace patchcore {
namespace detail {

// 16 float lanes per row as two 8-float vectors: the lane layout and the reduction tree below fix the order of
// every floating-point operation of a dot product, whatever instruction set the compiler picks (SSE halves
// or AVX registers), so a distance has the same bits wherever it is computed.
using v8f = float __attribute__((vector_size(32)));

// Through a reference: returning a 32-byte vector by value has a target-dependent ABI.
inline void load8(v8f& v, const float* p) { std::memcpy(&v, p, sizeof v); }

// Dot products of R rows with `centre`. R rows at once only interleaves independent accumulators (more
// instruction-level parallelism); each row sees exactly the operations it would see alone.
template <int R>
__attribute__((always_inline)) inline void dot_rows(const float* const* rows, const float* centre, int64_t dim,
                                                    float* out) {
  v8f lo[R], hi[R];
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = v8f{};
  int64_t j = 0;
  for (; j + 16 <= dim; j += 16) {
    v8f c0, c1, a0, a1;
    load8(c0, centre + j);
    load8(c1, centre + j + 8);
    for (int r = 0; r < R; ++r) {
      load8(a0, rows[r] + j);
      load8(a1, rows[r] + j + 8);
      lo[r] += a0 * c0;
      hi[r] += a1 * c1;
    }
  }
  if (j < dim) {
    // Zero-padded tail: the padding lanes add exact zeros.
    float c[16] = {};
    std::memcpy(c, centre + j, static_cast<size_t>(dim - j) * sizeof(float));
    v8f c0, c1, a0, a1;
    load8(c0, c);
    load8(c1, c + 8);
    for (int r = 0; r < R; ++r) {
      float a[16] = {};
      std::memcpy(a, rows[r] + j, static_cast<size_t>(dim - j) * sizeof(float));
      load8(a0, a);
      load8(a1, a + 8);
      lo[r] += a0 * c0;
      hi[r] += a1 * c1;
    }
  }
  for (int r = 0; r < R; ++r) {
    const v8f s = lo[r] + hi[r];
    float t[8];
    std::memcpy(t, &s, sizeof t);
    out[r] = ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7]));
  }
}

// The one distance kernel: out[r] = d(rows[r], centre), the row being the first operand as in the reference
// (distances of all features to the selected ones), i.e. sqrt(max(0, (-2 r.c + |r|^2) + |c|^2)).
__attribute__((target_clones("avx2", "default"))) void distance_kernel(const float* const* rows, const float* row_norms,
                                                                       int64_t count, const float* centre,
                                                                       float centre_norm, int64_t dim, float* out) {
  int64_t r = 0;
  for (; r + 4 <= count; r += 4) dot_rows<4>(rows + r, centre, dim, out + r);
  for (; r < count; ++r) dot_rows<1>(rows + r, centre, dim, out + r);
  for (r = 0; r < count; ++r) {
    const float v = (-2.0f * out[r] + row_norms[r]) + centre_norm;
    out[r] = std::sqrt(v > 0.0f ? v : 0.0f);
  }
}

__attribute__((target_clones("avx2", "default"))) void squared_norm_kernel(const float* const* rows, int64_t count,
                                                                           int64_t dim, float* out) {
  for (int64_t r = 0; r < count; ++r) dot_rows<1>(rows + r, rows[r], dim, out + r);
}

// Projection rows: out[i * out_dim + k] = x_i . w_k.
__attribute__((target_clones("avx2", "default"))) void projection_kernel(const float* x, int64_t count, int64_t in_dim,
                                                                         const float* w, int64_t out_dim, float* out) {
  int64_t i = 0;
  for (; i + 4 <= count; i += 4) {
    const float* rows[4] = {x + i * in_dim, x + (i + 1) * in_dim, x + (i + 2) * in_dim, x + (i + 3) * in_dim};
    for (int64_t k = 0; k < out_dim; ++k) {
      float d[4];
      dot_rows<4>(rows, w + k * in_dim, in_dim, d);
      for (int r = 0; r < 4; ++r) out[(i + r) * out_dim + k] = d[r];
    }
  }
  for (; i < count; ++i) {
    const float* row = x + i * in_dim;
    for (int64_t k = 0; k < out_dim; ++k) dot_rows<1>(&row, w + k * in_dim, in_dim, out + i * out_dim + k);
  }
}

}  // namespace detail

namespace {

int thread_count() { return std::max(1, at::get_num_threads()); }

// Helper threads that share rounds of tasks with the calling thread. Why not OpenMP: its spinning workers
// collapse when the two cores are shared with other processes (4.6x slower than one thread on this machine while
// it was busy). Why not a thread per round: the caller would wait at the join for a helper the scheduler has not
// run yet. Here a helper joins a round whenever it gets to run, and the caller, which takes tasks too, waits
// only for tasks a helper has actually started.
class TaskTeam {
 public:
  explicit TaskTeam(int threads) {
    for (int worker = 1; worker < threads; ++worker) {
      try {
        helpers_.emplace_back([this, worker] { serve(worker); });
      } catch (const std::system_error&) {
        break;  // fewer threads than asked for: the ones started and the caller share the tasks
      }
    }
  }
  TaskTeam(const TaskTeam&) = delete;
  TaskTeam& operator=(const TaskTeam&) = delete;
  ~TaskTeam() {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (std::thread& h : helpers_) h.join();
  }

  // body(task, worker) for every task in [0, tasks), worker in [0, threads); rethrows the first exception.
  void run(int64_t tasks, const std::function<void(int64_t, int)>& body) {
    if (helpers_.empty() || tasks <= 1 || solo_rounds_ > 0) {
      solo_rounds_ = std::max<int64_t>(0, solo_rounds_ - 1);
      for (int64_t t = 0; t < tasks; ++t) body(t, 0);
      return;
    }
    if (tasks >= (int64_t{1} << 32)) throw std::invalid_argument("TaskTeam: too many tasks");
    uint32_t round;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      round = ++round_;
      body_ = &body;
      tasks_ = tasks;
      done_ = 0;
      error_ = nullptr;
      next_ = pack(round, 0);
    }
    wake_.notify_all();
    const auto start = std::chrono::steady_clock::now();
    work(round, tasks, body, 0);
    const auto own_done = std::chrono::steady_clock::now();
    std::unique_lock<std::mutex> lock(mutex_);
    finished_.wait(lock, [&] { return done_.load() == tasks; });
    body_ = nullptr;
    // A helper the scheduler preempts mid-task keeps the caller waiting for a whole time slice, which happens
    // all the time when other processes load the cores. While waiting costs more than working, rounds run on
    // the caller alone for a while (doubling the pause each time it happens again).
    if (std::chrono::steady_clock::now() - own_done > own_done - start) {
      solo_rounds_ = solo_pause_;
      solo_pause_ = std::min<int64_t>(2 * solo_pause_, 1024);
    } else {
      solo_pause_ = std::max<int64_t>(solo_pause_ / 2, 1);
    }
    if (error_) std::rethrow_exception(error_);
  }

 private:
  static uint64_t pack(uint32_t round, uint64_t task) { return (static_cast<uint64_t>(round) << 32) | task; }

  // Takes the next task of `round`; false once the round has none left (or is over).
  bool claim(uint32_t round, int64_t tasks, int64_t& task) {
    uint64_t current = next_.load();
    for (;;) {
      if ((current >> 32) != round || static_cast<int64_t>(current & 0xFFFFFFFFu) >= tasks) return false;
      if (next_.compare_exchange_weak(current, current + 1)) {
        task = static_cast<int64_t>(current & 0xFFFFFFFFu);
        return true;
      }
    }
  }

  void finish(int64_t count, int64_t tasks) {
    if (done_.fetch_add(count) + count == tasks) {
      const std::lock_guard<std::mutex> lock(mutex_);
      finished_.notify_all();
    }
  }

  void work(uint32_t round, int64_t tasks, const std::function<void(int64_t, int)>& body, int worker) {
    int64_t task;
    while (claim(round, tasks, task)) {
      try {
        body(task, worker);
      } catch (...) {
        {
          const std::lock_guard<std::mutex> lock(mutex_);
          if (!error_) error_ = std::current_exception();
        }
        // Withdraw the tasks nobody has taken yet; they count as done so that the round ends.
        uint64_t current = next_.load();
        while ((current >> 32) == round && static_cast<int64_t>(current & 0xFFFFFFFFu) < tasks) {
          if (next_.compare_exchange_weak(current, pack(round, static_cast<uint64_t>(tasks)))) {
            finish(tasks - static_cast<int64_t>(current & 0xFFFFFFFFu), tasks);
            break;
          }
        }
      }
      finish(1, tasks);
    }
  }

  void serve(int worker) {
    uint32_t seen = 0;
    for (;;) {
      const std::function<void(int64_t, int)>* body;
      int64_t tasks;
      uint32_t round;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || (round_ != seen && body_ != nullptr); });
        if (stop_) return;
        seen = round = round_;
        body = body_;
        tasks = tasks_;
      }
      // A helper that wakes after its round ended fails to claim and never touches `body`.
      work(round, tasks, *body, worker);
    }
  }

  std::vector<std::thread> helpers_;
  std::mutex mutex_;
  std::condition_variable wake_, finished_;
  bool stop_ = false;
  uint32_t round_ = 0;
  const std::function<void(int64_t, int)>* body_ = nullptr;
  int64_t tasks_ = 0;
  std::atomic<uint64_t> next_{0};  // round in the high half, next task in the low half
  std::atomic<int64_t> done_{0};
  std::exception_ptr error_;
  int64_t solo_rounds_ = 0;  // coming rounds the caller runs alone
  int64_t solo_pause_ = 1;
};

// One round on a fresh team of thread_count() threads.
void parallel_tasks(int64_t tasks, const std::function<void(int64_t, int)>& body) {
  TaskTeam team(static_cast<int>(std::min<int64_t>(thread_count(), tasks)));
  team.run(tasks, body);
}

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

std::string shape_of(const torch::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

// Features as the samplers accept them: [N, D] float32 CPU, N >= 1, D >= 1. Returned contiguous.
torch::Tensor checked_features(const torch::Tensor& features, const char* who) {
  if (!features.defined()) throw std::invalid_argument(std::string(who) + ": features tensor is undefined");
  if (features.dim() != 2)
    throw std::invalid_argument(std::string(who) + ": features must be 2-D [N, D], got shape " + shape_of(features));
  if (features.size(0) < 1 || features.size(1) < 1)
    throw std::invalid_argument(std::string(who) + ": features must have at least one row and one column, got " +
                                shape_of(features));
  if (features.scalar_type() != torch::kFloat32)
    throw std::invalid_argument(std::string(who) + ": features must be float32, got " +
                                std::string(c10::toString(features.scalar_type())));
  if (!features.device().is_cpu())
    throw std::invalid_argument(std::string(who) + ": features must be on the CPU, got " + features.device().str());
  return features.contiguous();
}

int64_t selection_count(int64_t n, double percentage) {
  return static_cast<int64_t>(static_cast<double>(n) * percentage);
}

// N of a summary that only carries the row count.
int64_t summary_rows(const torch::Tensor& summary, const char* who) {
  if (!summary.defined() || summary.dim() != 2 || summary.size(0) < 1)
    throw std::invalid_argument(std::string(who) + ": the summary must be [N, k] with N >= 1, got " +
                                (summary.defined() ? shape_of(summary) : std::string("undefined")));
  return summary.size(0);
}

// ---- The points of the greedy loop. ----

struct Points {
  const float* data = nullptr;
  int64_t n = 0;
  int64_t dim = 0;
  std::vector<const float*> rows;  // row pointers, the kernel's input format
  std::vector<float> norms;        // |z_i|^2 as the kernel computes it
  // Upper bound on |computed squared distance - exact squared distance| for every pair (see fast loop).
  double delta = 0.0;
};

Points prepare_points(const torch::Tensor& projected, const char* who) {
  if (!projected.defined() || projected.dim() != 2 || projected.size(0) < 1 || projected.size(1) < 1 ||
      projected.scalar_type() != torch::kFloat32 || !projected.device().is_cpu() || !projected.is_contiguous())
    throw std::invalid_argument(std::string(who) +
                                ": projected features must be a contiguous [N, dim] float32 CPU tensor with N, "
                                "dim >= 1, got " +
                                (projected.defined() ? shape_of(projected) : std::string("undefined")));
  Points p;
  p.data = projected.data_ptr<float>();
  p.n = projected.size(0);
  p.dim = projected.size(1);
  p.rows.resize(static_cast<size_t>(p.n));
  for (int64_t i = 0; i < p.n; ++i) p.rows[i] = p.data + i * p.dim;
  p.norms.resize(static_cast<size_t>(p.n));
  const int64_t block = 4096;
  parallel_tasks((p.n + block - 1) / block, [&](int64_t t, int) {
    const int64_t b = t * block;
    detail::squared_norm_kernel(&p.rows[b], std::min(block, p.n - b), p.dim, &p.norms[b]);
  });
  // Bounded norms keep every intermediate of the distance formula finite (|a.b| <= max norm), which the
  // pruning bounds rely on; non-finite features are caught here too.
  float max_norm = 0.0f;
  for (int64_t i = 0; i < p.n; ++i) {
    const float v = p.norms[i];
    if (!(v <= FLT_MAX / 8)) {
      std::ostringstream msg;
      msg << who << ": row " << i << " of the projected features is not finite or too large for float32 distances"
          << " (squared norm " << v << ")";
      throw std::invalid_argument(msg.str());
    }
    max_norm = std::max(max_norm, v);
  }
  // Rounding error of the float formula: each dot product term passes through at most m roundings
  // (product, dim/16 lane additions, the tail, the 4-level reduction), so |error(a.b)| <= m u (|a|^2+|b|^2)/2;
  // with both norms and the two final additions the squared distance is off by at most (2m + 6) u
  // (|a|^2 + |b|^2) <= (2m + 6) u * 2 max_norm. Doubled for the second-order terms. The absolute term covers
  // underflow.
  const double u = 0x1.0p-24;
  const double m = static_cast<double>((p.dim + 15) / 16 + 6);
  p.delta = 2.0 * (2.0 * m + 6.0) * u * 2.0 * static_cast<double>(max_norm) + 1e3 * static_cast<double>(FLT_MIN);
  return p;
}

void check_scores(const std::vector<float>& scores, const Points& p, int64_t count, const char* who) {
  if (static_cast<int64_t>(scores.size()) != p.n)
    throw std::invalid_argument(std::string(who) + ": got " + std::to_string(scores.size()) + " scores for " +
                                std::to_string(p.n) + " points");
  for (float s : scores)
    if (!std::isfinite(s)) throw std::invalid_argument(std::string(who) + ": initial scores must be finite");
  if (count < 0) throw std::invalid_argument(std::string(who) + ": selection count must be >= 0");
}

// (score, index) ordered as argmax with the first index on ties.
struct Best {
  float score = -std::numeric_limits<float>::infinity();
  int64_t index = std::numeric_limits<int64_t>::max();
};
inline bool better(const Best& a, const Best& b) {
  return a.score > b.score || (a.score == b.score && a.index < b.index);
}

Best argmax(const std::vector<float>& scores) {
  Best best;
  for (int64_t i = 0; i < static_cast<int64_t>(scores.size()); ++i)
    if (scores[i] > best.score) best = {scores[i], i};
  return best;
}

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

}  // namespace

// ---- Initial scores. ----

namespace {

void distances_to(const Points& p, int64_t point, float* out) {
  const int64_t block = 4096;
  parallel_tasks((p.n + block - 1) / block, [&](int64_t t, int) {
    const int64_t b = t * block;
    detail::distance_kernel(&p.rows[b], &p.norms[b], std::min(block, p.n - b), p.rows[point], p.norms[point], p.dim,
                            out + b);
  });
}

}  // namespace

std::vector<float> distances_to_point(const torch::Tensor& projected, int64_t point) {
  const Points p = prepare_points(projected, "distances_to_point");
  if (point < 0 || point >= p.n)
    throw std::invalid_argument("distances_to_point: point " + std::to_string(point) + " is outside [0, " +
                                std::to_string(p.n) + ")");
  std::vector<float> out(static_cast<size_t>(p.n));
  distances_to(p, point, out.data());
  return out;
}

std::vector<float> mean_distance_to_points(const torch::Tensor& projected, const std::vector<int64_t>& points) {
  const Points p = prepare_points(projected, "mean_distance_to_points");
  if (points.empty()) throw std::invalid_argument("mean_distance_to_points: no points given");
  for (int64_t s : points)
    if (s < 0 || s >= p.n)
      throw std::invalid_argument("mean_distance_to_points: point " + std::to_string(s) + " is outside [0, " +
                                  std::to_string(p.n) + ")");
  std::vector<float> sum(static_cast<size_t>(p.n), 0.0f);
  const int64_t block = 4096;
  std::vector<std::vector<float>> scratch(static_cast<size_t>(thread_count()), std::vector<float>(block));
  parallel_tasks((p.n + block - 1) / block, [&](int64_t t, int worker) {
    const int64_t b = t * block, len = std::min(block, p.n - b);
    float* d = scratch[worker].data();
    for (int64_t s : points) {
      detail::distance_kernel(&p.rows[b], &p.norms[b], len, p.rows[s], p.norms[s], p.dim, d);
      for (int64_t i = 0; i < len; ++i) sum[b + i] += d[i];
    }
  });
  const float count = static_cast<float>(points.size());
  for (float& v : sum) v /= count;
  return sum;
}

std::vector<float> distance_matrix_row_norms(const torch::Tensor& projected) {
  const Points p = prepare_points(projected, "distance_matrix_row_norms");
  std::vector<float> out(static_cast<size_t>(p.n));
  // A block of rows stays in cache while every column point passes by; each row's sum runs in column order.
  const int64_t block = 256;
  parallel_tasks((p.n + block - 1) / block, [&](int64_t t, int) {
    const int64_t b = t * block, len = std::min(block, p.n - b);
    float d[block];
    double acc[block] = {};
    for (int64_t j = 0; j < p.n; ++j) {
      detail::distance_kernel(&p.rows[b], &p.norms[b], len, p.rows[j], p.norms[j], p.dim, d);
      for (int64_t i = 0; i < len; ++i) acc[i] += static_cast<double>(d[i]) * d[i];
    }
    for (int64_t i = 0; i < len; ++i) out[b + i] = static_cast<float>(std::sqrt(acc[i]));
  });
  return out;
}

// ---- The straightforward loop. ----

std::vector<int64_t> greedy_coreset_reference(const torch::Tensor& projected, std::vector<float> scores,
                                              int64_t count) {
  const Points p = prepare_points(projected, "greedy_coreset_reference");
  check_scores(scores, p, count, "greedy_coreset_reference");
  std::vector<int64_t> selected;
  selected.reserve(static_cast<size_t>(count));
  const int64_t block = 4096;
  const int64_t blocks = (p.n + block - 1) / block;
  std::vector<Best> block_best(static_cast<size_t>(blocks));
  TaskTeam team(thread_count());
  std::vector<std::vector<float>> scratch(static_cast<size_t>(thread_count()), std::vector<float>(block));
  Best best = argmax(scores);
  for (int64_t it = 0; it < count; ++it) {
    const int64_t c = best.index;
    selected.push_back(c);
    // One pass lowers every score and finds the next argmax (per block, then over blocks in order).
    team.run(blocks, [&](int64_t k, int worker) {
      const int64_t b = k * block, len = std::min(block, p.n - b);
      float* d = scratch[worker].data();
      detail::distance_kernel(&p.rows[b], &p.norms[b], len, p.rows[c], p.norms[c], p.dim, d);
      Best local;
      for (int64_t i = 0; i < len; ++i) {
        float& s = scores[b + i];
        if (d[i] < s) s = d[i];
        if (s > local.score) local = {s, b + i};
      }
      block_best[k] = local;
    });
    best = Best{};
    for (const Best& b : block_best)
      if (better(b, best)) best = b;
  }
  return selected;
}

// ---- The fast loop. ----
//
// The straightforward loop measures every point against every new centre, yet a score only drops when the new
// centre lands inside the point's current radius (for PatchCore features about 0.3% of the points per
// selection). The fast loop rules points out with cheap lower bounds on their distance to the new centre and
// computes the exact distance (same kernel, same bits) only for the others:
//  - Points are expressed in the leading principal directions of the data (an orthonormal basis from the
//    covariance of a sample). For orthonormal rows P with complement Q, |z - c|^2 = |P(z - c)|^2 + |Q(z - c)|^2
//    >= |Pz - Pc|^2 + (|Qz| - |Qc|)^2, so k coordinates plus the residual norm |Qz| bound the distance from
//    below, tighter as k grows; the bound is tried with k = 8, 16, 32, 64 in turn, each reusing the last sum,
//    on eight points at a time.
//  - Points are ordered along a k-d tree of their first-level values. Each leaf block, and each group of eight
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

constexpr double kMargin = 1e-6;
constexpr double kBoundSlack = 256.0 * 0x1.0p-24;  // float sums of at most ~70 squares, with room to spare
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

float round_up_to_float(double x) {
  float f = static_cast<float>(x);
  if (static_cast<double>(f) < x) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  return f;
}

// Squared lower bound at or above which a point with this score provably keeps it.
float skip_threshold(float score, double delta, double eta) {
  const double s = score;
  const double t = (std::sqrt(s * s + delta) * (1.0 + kMargin) + eta) / (1.0 - kBoundSlack);
  return round_up_to_float(t * t * (1.0 + kMargin));
}

// The `k` leading principal directions ([k][dim] row-major, orthonormal in double) of a strided sample of rows.
std::vector<double> principal_directions(const Points& p, int64_t k) {
  const int64_t dim = p.dim, samples = std::min(p.n, kPcaSamples);
  std::vector<double> mean(static_cast<size_t>(dim), 0.0), cov(static_cast<size_t>(dim * dim), 0.0), x(mean);
  for (int64_t s = 0; s < samples; ++s) {
    const float* row = p.rows[s * p.n / samples];
    for (int64_t a = 0; a < dim; ++a) mean[a] += row[a];
  }
  for (double& m : mean) m /= static_cast<double>(samples);
  for (int64_t s = 0; s < samples; ++s) {
    const float* row = p.rows[s * p.n / samples];
    for (int64_t a = 0; a < dim; ++a) x[a] = row[a] - mean[a];
    for (int64_t a = 0; a < dim; ++a)
      for (int64_t b = a; b < dim; ++b) cov[a * dim + b] += x[a] * x[b];
  }
  for (int64_t a = 0; a < dim; ++a)
    for (int64_t b = 0; b < a; ++b) cov[a * dim + b] = cov[b * dim + a];
  torch::Tensor vectors;
  try {
    vectors =
        std::get<1>(torch::linalg::eigh(torch::from_blob(cov.data(), {dim, dim}, torch::kFloat64), "L")).contiguous();
  } catch (const c10::Error& e) {
    throw std::runtime_error(std::string("greedy_coreset_fast: eigendecomposition failed: ") +
                             e.what_without_backtrace());
  }
  const double* v = vectors.data_ptr<double>();  // eigenvectors in columns, eigenvalues ascending
  std::vector<double> basis(static_cast<size_t>(k * dim));
  for (int64_t r = 0; r < k; ++r)
    for (int64_t a = 0; a < dim; ++a) basis[r * dim + a] = v[a * dim + (dim - 1 - r)];
  // Twice-repeated Gram-Schmidt makes the rows orthonormal to rounding level, as kEta's budget assumes.
  for (int pass = 0; pass < 2; ++pass) {
    for (int64_t r = 0; r < k; ++r) {
      double* b = &basis[r * dim];
      for (int64_t q = 0; q < r; ++q) {
        const double* o = &basis[q * dim];
        double dot = 0.0;
        for (int64_t a = 0; a < dim; ++a) dot += b[a] * o[a];
        for (int64_t a = 0; a < dim; ++a) b[a] -= dot * o[a];
      }
      double norm = 0.0;
      for (int64_t a = 0; a < dim; ++a) norm += b[a] * b[a];
      norm = std::sqrt(norm);
      if (!(norm > 0.5)) throw std::runtime_error("greedy_coreset_fast: eigenvectors are not independent");
      for (int64_t a = 0; a < dim; ++a) b[a] /= norm;
    }
  }
  return basis;
}

// Leaves of a k-d tree over the first `width` values of each `stride`-long row of `feature` (median split of the
// widest dimension), in tree order.
void build_leaves(std::vector<int64_t>& order, int64_t begin, int64_t end, const std::vector<float>& feature,
                  int64_t stride, int64_t width, std::vector<std::pair<int64_t, int64_t>>& leaves) {
  if (end - begin <= kLeafSize) {
    leaves.emplace_back(begin, end);
    return;
  }
  int64_t split = 0;
  float widest = -1.0f;
  for (int64_t j = 0; j < width; ++j) {
    float lo = std::numeric_limits<float>::infinity(), hi = -lo;
    for (int64_t q = begin; q < end; ++q) {
      const float f = feature[order[q] * stride + j];
      lo = std::min(lo, f);
      hi = std::max(hi, f);
    }
    if (hi - lo > widest) {
      widest = hi - lo;
      split = j;
    }
  }
  const int64_t mid = begin + (end - begin) / 2;
  std::nth_element(order.begin() + begin, order.begin() + mid, order.begin() + end, [&](int64_t a, int64_t b) {
    const float fa = feature[a * stride + split], fb = feature[b * stride + split];
    return fa < fb || (fa == fb && a < b);
  });
  build_leaves(order, begin, mid, feature, stride, width, leaves);
  build_leaves(order, mid, end, feature, stride, width, leaves);
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
double for_each_level_values(const Points& p, const torch::Tensor& projected, const std::vector<double>& basis,
                             const std::vector<int64_t>& levels, int64_t nlevels, Fill fill) {
  const int64_t coords = levels[nlevels - 1];
  torch::Tensor basis_t;
  if (coords > 0) basis_t = torch::from_blob(const_cast<double*>(basis.data()), {coords, p.dim}, torch::kFloat64).t();
  const std::vector<int64_t> widths = level_widths(levels);
  const int64_t stride = std::accumulate(widths.begin(), widths.begin() + nlevels, int64_t{0});
  std::vector<float> values(static_cast<size_t>(stride));
  double max_norm = 0.0;
  for (int64_t b = 0; b < p.n; b += kProjectionRows) {
    const int64_t e = std::min(p.n, b + kProjectionRows);
    torch::Tensor pc;
    if (coords > 0) pc = projected.slice(0, b, e).to(torch::kFloat64).mm(basis_t).contiguous();
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

Index build_index(const Points& p, const torch::Tensor& projected) {
  Index x;
  x.dim = p.dim;
  x.data = p.data;
  x.levels = level_dims(p.dim);
  const int64_t nlevels = static_cast<int64_t>(x.levels.size());
  x.level_width = level_widths(x.levels);
  const int64_t width0 = x.level_width[0];
  std::vector<double> basis;
  if (x.levels.back() > 0) basis = principal_directions(p, x.levels.back());

  // Tree order over the first level's values; only they are kept for every row at once.
  std::vector<float> first(static_cast<size_t>(p.n * width0));
  const double max_norm = for_each_level_values(
      p, projected, basis, x.levels, 1, [&](int64_t i, const float* v) { std::copy_n(v, width0, &first[i * width0]); });
  x.eta = kEta * std::sqrt(max_norm) + 1e-30;
  std::vector<int64_t> order(static_cast<size_t>(p.n));
  for (int64_t i = 0; i < p.n; ++i) order[i] = i;
  std::vector<std::pair<int64_t, int64_t>> leaves;
  build_leaves(order, 0, p.n, first, width0, width0, leaves);
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

// Bytes per point that the fast loop holds beside Z (the Index, its state and the scores), for memory plans.
int64_t fast_loop_bytes_per_row(int64_t dim) {
  const std::vector<int64_t> widths = level_widths(level_dims(dim));
  const int64_t level_floats = std::accumulate(widths.begin(), widths.end(), int64_t{0});
  const int64_t width0 = widths[0];
  // level data and first-level values (build) + original, slot_of, order (build) + block_of + norms twice +
  // row pointers + scores twice + score, threshold + group boxes.
  const int64_t per_point = 4 * level_floats + 4 * width0 + 3 * 8 + 4 + 2 * 4 + 8 + 2 * 4 + 2 * 4 + 2 * 4 * width0 / 8;
  return per_point + per_point / 8;  // leaves padded to multiples of eight slots: at most 7 in 64
}

}  // namespace

namespace detail {

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

using v8i = int32_t __attribute__((vector_size(32)));

// below(a, b): bit l set where a[l] < b[l]. The bound kernel extracts such masks all the time; AVX2 does it in
// one instruction, portable code in a dozen (the fast loop on tire features: 6.2 s instead of 8.2 s).
struct PortableMask {
  static unsigned below(const v8f& a, const v8f& b) {
    const v8i m = a < b;
    unsigned bits = 0;
    for (int l = 0; l < 8; ++l) bits |= static_cast<unsigned>(m[l] & 1) << l;
    return bits;
  }
};
#if defined(__x86_64__) || defined(__i386__)
struct Avx2Mask {
  __attribute__((target("avx2"))) static unsigned below(const v8f& a, const v8f& b) {
    const v8i m = a < b;
    return static_cast<unsigned>(__builtin_ia32_movmskps256((v8f)m));  // a vector cast keeps the bits
  }
};
#endif

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
template <class Mask>
__attribute__((always_inline)) inline int64_t block_candidates_with(const BlocksView& blocks, const BatchView& batch,
                                                                    int64_t b0, int64_t b1, int64_t* const* out,
                                                                    int64_t* found) {
  const int64_t width0 = blocks.level_width[0];
  const unsigned lanes = (1u << batch.size) - 1u;
  const v8f zero = {};
  int64_t evaluated = 0;
  for (int64_t b = b0; b < b1; ++b) {
    v8f gap2;
    box_gap2(gap2, blocks.box_lo + b * width0, blocks.box_hi + b * width0, width0, batch.first);
    const unsigned near = Mask::below(gap2, zero + blocks.block_threshold[b]) & lanes;
    if (near == 0) continue;
    for (int64_t g = blocks.block_begin[b] / 8; g < blocks.block_begin[b + 1] / 8; ++g) {
      box_gap2(gap2, blocks.group_lo + g * width0, blocks.group_hi + g * width0, width0, batch.first);
      const unsigned group_near = near & Mask::below(gap2, zero + blocks.group_threshold[g]);
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
          alive &= Mask::below(acc + d * d, threshold);
        }
        for (int lane = 0; alive != 0; ++lane, alive >>= 1)
          if (alive & 1u) out[j][found[j]++] = g * 8 + lane;
      }
    }
  }
  return evaluated;
}

int64_t block_candidates_portable(const BlocksView& blocks, const BatchView& batch, int64_t b0, int64_t b1,
                                  int64_t* const* out, int64_t* found) {
  return block_candidates_with<PortableMask>(blocks, batch, b0, b1, out, found);
}

#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx2"))) int64_t block_candidates_avx2(const BlocksView& blocks, const BatchView& batch,
                                                              int64_t b0, int64_t b1, int64_t* const* out,
                                                              int64_t* found) {
  return block_candidates_with<Avx2Mask>(blocks, batch, b0, b1, out, found);
}
#endif

int64_t block_candidates(const BlocksView& blocks, const BatchView& batch, int64_t b0, int64_t b1, int64_t* const* out,
                         int64_t* found) {
#if defined(__x86_64__) || defined(__i386__)
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return block_candidates_avx2(blocks, batch, b0, b1, out, found);
#endif
  return block_candidates_portable(blocks, batch, b0, b1, out, found);
}

}  // namespace detail

namespace {

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
  detail::BatchView view() const {
    return detail::BatchView{static_cast<int64_t>(slots.size()), first.data(), pointers.data()};
  }
};

// Blocks [b0, b1) against every centre of the batch: the exact distances that would lower a score.
void process_blocks(const Index& x, const FastState& st, int64_t b0, int64_t b1, const Batch& centres,
                    const detail::BlocksView& blocks, Scratch& sc) {
  const detail::BatchView batch = centres.view();
  const size_t room = static_cast<size_t>(x.block_begin[b1] - x.block_begin[b0]);
  int64_t* out[8];
  int64_t found[8] = {};
  for (int64_t j = 0; j < batch.size; ++j) {
    if (sc.slots[j].size() < room) sc.slots[j].resize(room);
    out[j] = sc.slots[j].data();
  }
  sc.bounds += 8 * detail::block_candidates(blocks, batch, b0, b1, out, found);
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
    detail::distance_kernel(sc.rows.data(), sc.norms.data(), count, x.row(cs), x.norms[cs], x.dim, sc.dist.data());
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
std::vector<int64_t> greedy_coreset_fast(const torch::Tensor& projected, std::vector<float> scores, int64_t count,
                                         GreedyStats* stats) {
  const Points p = prepare_points(projected, "greedy_coreset_fast");
  check_scores(scores, p, count, "greedy_coreset_fast");
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
    const detail::BlocksView blocks{
        level_data.data(),         x.level_width.data(), static_cast<int64_t>(x.levels.size()),
        x.block_begin.data(),      x.box_lo.data(),      x.box_hi.data(),
        x.group_lo.data(),         x.group_hi.data(),    st.block_threshold.data(),
        st.group_threshold.data(), st.threshold.data()};
    Batch centres;
    const int threads = thread_count();
    TaskTeam team(threads);
    std::vector<Scratch> scratch(static_cast<size_t>(threads));
    for (Scratch& sc : scratch) {
      sc.slots.resize(static_cast<size_t>(kBatch));
      sc.updates.resize(static_cast<size_t>(kBatch));
    }
    const int64_t tasks = (x.blocks + kBlocksPerTask - 1) / kBlocksPerTask;
    std::vector<int64_t> changed;
    int64_t batch = kBatch;
    while (static_cast<int64_t>(selected.size()) < count) {
      const int64_t remaining = count - static_cast<int64_t>(selected.size());
      if (remaining == 1) {  // the last selection's updates would never be used
        selected.push_back(tree.root().index);
        break;
      }
      centres.assign(x, leading_slots(x, st, tree, std::min(batch, remaining)));
      team.run(tasks, [&](int64_t t, int worker) {
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

// ---- Samplers. ----

torch::Tensor BaseSampler::summarize(const torch::Tensor& features) const {
  const torch::Tensor f = checked_features(features, "sampler");
  return torch::empty({f.size(0), 0}, torch::kFloat32);
}

int64_t BaseSampler::selection_bytes_per_row(int64_t) const { return sizeof(int64_t); }

std::vector<int64_t> BaseSampler::select(const torch::Tensor& features) {
  return select_from_summary(summarize(features));
}

torch::Tensor BaseSampler::run(const torch::Tensor& features) {
  const std::vector<int64_t> indices = select(features);
  return features.index_select(0, torch::tensor(indices, torch::kInt64));
}

std::vector<int64_t> IdentitySampler::select_from_summary(const torch::Tensor& summary) {
  const int64_t n = summary_rows(summary, "IdentitySampler");
  std::vector<int64_t> all(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) all[i] = i;
  return all;
}

RandomSampler::RandomSampler(double percentage, uint64_t seed) : percentage_(percentage), seed_(seed) {
  check_percentage(percentage, "RandomSampler");
}

int64_t RandomSampler::selection_size(int64_t n) const { return selection_count(n, percentage_); }

std::vector<int64_t> RandomSampler::select_from_summary(const torch::Tensor& summary) {
  const int64_t n = summary_rows(summary, "RandomSampler");
  std::mt19937_64 rng = make_rng(seed_, Stream::kRandomSubset);
  return distinct_indices(n, selection_size(n), rng);
}

GreedyCoresetSampler::GreedyCoresetSampler(double percentage, torch::Device device,
                                           int64_t dimension_to_project_features_to, uint64_t seed)
    : percentage_(percentage), device_(device), dimension_(dimension_to_project_features_to), seed_(seed) {
  check_percentage(percentage, "GreedyCoresetSampler");
  if (dimension_ < 1)
    throw std::invalid_argument("GreedyCoresetSampler: dimension_to_project_features_to must be >= 1, got " +
                                std::to_string(dimension_));
}

void GreedyCoresetSampler::set_projection(torch::Tensor weight) {
  if (weight.defined()) {
    if (weight.dim() != 2 || weight.size(0) != dimension_ || weight.size(1) < 1 ||
        weight.scalar_type() != torch::kFloat32)
      throw std::invalid_argument("GreedyCoresetSampler::set_projection: weight must be float32 [" +
                                  std::to_string(dimension_) + ", D], got " + shape_of(weight));
    weight = weight.to(torch::kCPU).contiguous().clone();
  }
  weight_ = weight;
}

torch::Tensor GreedyCoresetSampler::projection_weight(int64_t feature_dim) const {
  if (weight_.defined()) {
    if (weight_.size(1) != feature_dim)
      throw std::invalid_argument("GreedyCoresetSampler: the injected projection has " +
                                  std::to_string(weight_.size(1)) + " columns but the features have " +
                                  std::to_string(feature_dim));
    return weight_;
  }
  std::mt19937_64 rng = make_rng(seed_, Stream::kProjection);
  const double bound = 1.0 / std::sqrt(static_cast<double>(feature_dim));
  torch::Tensor w = torch::empty({dimension_, feature_dim}, torch::kFloat32);
  float* data = w.data_ptr<float>();
  for (int64_t i = 0; i < w.numel(); ++i) data[i] = static_cast<float>((2.0 * uniform01(rng) - 1.0) * bound);
  return w;
}

torch::Tensor GreedyCoresetSampler::project(const torch::Tensor& features) const {
  const torch::Tensor f = checked_features(features, "GreedyCoresetSampler");
  const int64_t n = f.size(0), in_dim = f.size(1);
  if (in_dim == dimension_) return f;
  const torch::Tensor w = projection_weight(in_dim);
  if (!device_.is_cpu()) {
    try {
      return torch::matmul(f.to(device_), w.to(device_).t()).to(torch::kCPU).contiguous();
    } catch (const c10::Error& e) {
      throw std::runtime_error("GreedyCoresetSampler: projection on " + device_.str() +
                               " failed: " + e.what_without_backtrace());
    }
  }
  torch::Tensor z = torch::empty({n, dimension_}, torch::kFloat32);
  const float* x = f.data_ptr<float>();
  const float* wd = w.data_ptr<float>();
  float* zd = z.data_ptr<float>();
  const int64_t block = 256;
  parallel_tasks((n + block - 1) / block, [&](int64_t t, int) {
    const int64_t b = t * block;
    detail::projection_kernel(x + b * in_dim, std::min(block, n - b), in_dim, wd, dimension_, zd + b * dimension_);
  });
  return z;
}

std::vector<float> GreedyCoresetSampler::initial_scores(const torch::Tensor& projected) {
  return distance_matrix_row_norms(projected);
}

int64_t GreedyCoresetSampler::selection_size(int64_t n) const { return selection_count(n, percentage_); }

int64_t GreedyCoresetSampler::selection_bytes_per_row(int64_t) const {
  return dimension_ * static_cast<int64_t>(sizeof(float)) + fast_loop_bytes_per_row(dimension_);
}

std::vector<int64_t> GreedyCoresetSampler::select_from_summary(const torch::Tensor& summary) {
  if (!summary.defined() || summary.dim() != 2 || summary.size(1) != dimension_)
    throw std::invalid_argument("GreedyCoresetSampler: the summary must be the projected features [N, " +
                                std::to_string(dimension_) + "], got " +
                                (summary.defined() ? shape_of(summary) : std::string("undefined")));
  const int64_t count = selection_size(summary.size(0));
  std::vector<float> scores = initial_scores(summary);
  return algorithm_ == GreedyAlgorithm::kFast ? greedy_coreset_fast(summary, std::move(scores), count)
                                              : greedy_coreset_reference(summary, std::move(scores), count);
}

ApproximateGreedyCoresetSampler::ApproximateGreedyCoresetSampler(double percentage, torch::Device device,
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

std::vector<float> ApproximateGreedyCoresetSampler::initial_scores(const torch::Tensor& projected) {
  return mean_distance_to_points(projected, starting_points(projected.size(0)));
}

std::unique_ptr<BaseSampler> make_sampler(const std::string& name, double percentage, uint64_t seed,
                                          torch::Device device) {
  if (name == "identity") return std::make_unique<IdentitySampler>();
  if (name == "random") return std::make_unique<RandomSampler>(percentage, seed);
  if (name == "greedy") return std::make_unique<GreedyCoresetSampler>(percentage, device, 128, seed);
  if (name == "approx_greedy")
    return std::make_unique<ApproximateGreedyCoresetSampler>(percentage, device, 10, 128, seed);
  throw std::invalid_argument("unknown sampler '" + name + "' (expected identity, random, greedy or approx_greedy)");
}

}  // namespace patchcore

#include "patchcore/core/parallel.h"

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <stdexcept>
#include <string>

namespace patchcore {

void set_num_threads(int threads) {
  if (threads < 1) throw std::invalid_argument("threads must be at least 1, got " + std::to_string(threads));
  // In an OpenMP build of torch this also sets OpenMP's count for this thread; other threads take torch's
  // setting when they first ask for it (num_threads()).
  at::set_num_threads(threads);
}

int num_threads() { return std::max(1, at::get_num_threads()); }

int parallel_threads(int64_t count, int max_threads) {
  if (count <= 1 || omp_in_parallel()) return 1;
  int threads = num_threads();
  if (max_threads > 0) threads = std::min(threads, max_threads);
  return static_cast<int>(std::min<int64_t>(threads, count));
}

void parallel_for(int64_t count, const std::function<void(int64_t, int)>& body, int max_threads) {
  if (count <= 0) return;
  const int threads = parallel_threads(count, max_threads);
  if (threads == 1) {
    for (int64_t item = 0; item < count; ++item) body(item, 0);
    return;
  }
  // An exception must not leave an OpenMP worksharing loop, so each item catches its own (as FAISS does).
  std::exception_ptr error;
  std::atomic<bool> failed{false};
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t item = 0; item < count; ++item) {
    if (failed.load(std::memory_order_relaxed)) continue;
    try {
      body(item, omp_get_thread_num());
    } catch (...) {
#pragma omp critical(patchcore_parallel_for_error)
      if (!error) error = std::current_exception();
      failed.store(true, std::memory_order_relaxed);
    }
  }
  if (error) std::rethrow_exception(error);
}

void with_openmp_threads(int threads, const std::function<void()>& fn) {
  // nthreads-var is a per-thread setting, so this changes nothing for any other thread.
  const int saved = omp_get_max_threads();
  omp_set_num_threads(std::max(1, threads));
  try {
    fn();
  } catch (...) {
    omp_set_num_threads(saved);
    throw;
  }
  omp_set_num_threads(saved);
}

}  // namespace patchcore

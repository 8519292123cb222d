#pragma once
// The one way patchcore runs a loop in parallel, and the one thread setting.
//
// The thread setting is torch's intra-op thread count: torch's own kernels, every parallel_for and FAISS's
// searches use it, so one call sets them all. Only the application sets it (the CLI's --threads); no library
// call changes it. Debian's torch starts with one thread.
#include <cstdint>
#include <functional>

namespace patchcore {

// Sets the thread setting for the whole process. Throws std::invalid_argument for threads < 1.
void set_num_threads(int threads);
// The thread setting as the calling thread sees it.
int num_threads();

// body(item, worker) for every item in [0, count), on at most min(num_threads(), max_threads) threads
// (max_threads <= 0: no cap), items handed out one at a time; worker < that thread count numbers the thread,
// for per-thread scratch. An exception thrown by body is caught in its item: no further items are handed
// out, and the first exception is rethrown once every thread has left the loop. Nested inside another
// parallel_for, it runs on the calling thread alone.
void parallel_for(int64_t count, const std::function<void(int64_t item, int worker)>& body, int max_threads = 0);

// The number of threads parallel_for(count, ..., max_threads) runs on, for sizing per-thread scratch.
int parallel_threads(int64_t count, int max_threads = 0);

// Runs fn with the calling thread's OpenMP thread count set to `threads`, then restores it: for code outside
// patchcore that sizes its own OpenMP regions from the caller (FAISS, LAPACK through OpenBLAS). Other threads
// are not affected.
void with_openmp_threads(int threads, const std::function<void()>& fn);

}  // namespace patchcore

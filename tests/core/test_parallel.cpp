#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <stdexcept>
#include <thread>
#include <vector>

#include "patchcore/core/parallel.h"
#include "support.h"

using namespace patchcore;

namespace {

// Restores the thread setting on scope exit.
struct Threads {
  int saved = num_threads();
  explicit Threads(int n) { set_num_threads(n); }
  ~Threads() { set_num_threads(saved); }
};

}  // namespace

TEST(ParallelFor, VisitsEveryItemOnceWithWorkersBelowTheThreadCount) {
  const Threads threads(3);
  constexpr int64_t kItems = 1000;
  std::vector<std::atomic<int>> visits(kItems);
  std::atomic<int> bad_worker{0};
  const int workers = parallel_threads(kItems);
  EXPECT_EQ(workers, 3);
  parallel_for(kItems, [&](int64_t item, int worker) {
    visits[item].fetch_add(1);
    if (worker < 0 || worker >= workers) bad_worker.fetch_add(1);
  });
  for (int64_t i = 0; i < kItems; ++i) EXPECT_EQ(visits[i].load(), 1) << i;
  EXPECT_EQ(bad_worker.load(), 0);
  EXPECT_EQ(parallel_threads(kItems, 2), 2);
  EXPECT_EQ(parallel_threads(1), 1);
}

TEST(ParallelFor, AnExceptionIsRethrownAfterTheLoopAndStopsFurtherItems) {
  const Threads threads(2);
  std::atomic<int64_t> done{0};
  const std::string message = test::error_of([&] {
    parallel_for(100000, [&](int64_t item, int) {
      if (item == 10) throw std::runtime_error("item 10 failed");
      // Slow enough that the other thread cannot finish every item while the throwing one is descheduled or
      // unwinding for the first time (milliseconds on a busy machine), which made this test fail now and then.
      std::this_thread::sleep_for(std::chrono::microseconds(100));
      done.fetch_add(1);
    });
  });
  EXPECT_EQ(message, "item 10 failed");
  EXPECT_LT(done.load(), 99999);
  // The loop is usable again afterwards.
  std::atomic<int64_t> sum{0};
  parallel_for(100, [&](int64_t item, int) { sum.fetch_add(item); });
  EXPECT_EQ(sum.load(), 4950);
}

TEST(ParallelFor, NestedLoopsRunOnTheCallingThread) {
  const Threads threads(2);
  std::atomic<int> nested_workers{0};
  parallel_for(4, [&](int64_t, int) {
    EXPECT_EQ(parallel_threads(100), 1);
    parallel_for(10, [&](int64_t, int worker) { nested_workers.fetch_or(1 << worker); });
  });
  EXPECT_EQ(nested_workers.load(), 1);
}

TEST(ThreadSetting, IsSharedByNewThreadsAndRejectsZero) {
  const Threads threads(2);
  int seen = 0;
  std::thread([&] { seen = num_threads(); }).join();
  EXPECT_EQ(seen, 2);
  EXPECT_THROW(set_num_threads(0), std::invalid_argument);
}

TEST(WithOpenMPThreads, RestoresTheCallersCountAfterAnException) {
  const Threads threads(2);
  EXPECT_THROW(with_openmp_threads(1, [] { throw std::runtime_error("x"); }), std::runtime_error);
  EXPECT_EQ(parallel_threads(100), 2);
}

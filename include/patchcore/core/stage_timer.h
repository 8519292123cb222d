#pragma once
// Wall time per named stage of a pipeline, for `patchcore bench` and for anyone who wants to know where the time of
// fit or predict goes.
#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>

namespace patchcore {

class StageTimer {
 public:
  struct Stage {
    double seconds = 0;
    int64_t calls = 0;
  };

  // Thread-safe: stages may be timed from several threads at once (e.g. decoding on a prefetch thread
  // while the backbone runs), so their sum can exceed the wall time of the whole run.
  void add(const std::string& stage, double seconds);
  std::map<std::string, Stage> stages() const;
  // 0 for a stage never timed.
  double seconds(const std::string& stage) const;
  void clear();

  // Adds the time from construction to destruction to `stage`; does nothing with a null timer, so
  // library code can time itself unconditionally.
  class Scope {
   public:
    Scope(StageTimer* timer, std::string stage);
    ~Scope();
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    StageTimer* timer_;
    std::string stage_;
    std::chrono::steady_clock::time_point start_;
  };

 private:
  mutable std::mutex mutex_;
  std::map<std::string, Stage> stages_;
};

}  // namespace patchcore

#include "patchcore/core/stage_timer.h"

#include <sys/resource.h>

#include <algorithm>
#include <fstream>
#include <sstream>

namespace patchcore {

void StageTimer::add(const std::string& stage, double seconds) {
  std::lock_guard<std::mutex> lock(mutex_);
  Stage& s = stages_[stage];
  s.seconds += seconds;
  ++s.calls;
}

std::map<std::string, StageTimer::Stage> StageTimer::stages() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return stages_;
}

double StageTimer::seconds(const std::string& stage) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto it = stages_.find(stage);
  return it == stages_.end() ? 0.0 : it->second.seconds;
}

void StageTimer::clear() {
  std::lock_guard<std::mutex> lock(mutex_);
  stages_.clear();
}

StageTimer::Scope::Scope(StageTimer* timer, std::string stage)
    : timer_(timer), stage_(std::move(stage)), start_(std::chrono::steady_clock::now()) {}

StageTimer::Scope::~Scope() {
  if (timer_) timer_->add(stage_, std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count());
}

namespace {

// A "Vm...:  N kB" line of /proc/self/status, in bytes; -1 when absent.
int64_t proc_status_bytes(const char* field) {
  std::ifstream status("/proc/self/status");
  const std::string key = std::string(field) + ":";
  for (std::string line; std::getline(status, line);) {
    if (line.rfind(key, 0) == 0) {
      std::istringstream fields(line.substr(key.size()));
      int64_t kib = 0;
      if (fields >> kib) return kib * 1024;
    }
  }
  return -1;
}

}  // namespace

int64_t peak_rss_bytes() {
  // /proc reports the high-water mark of this process alone; getrusage is the portable fallback.
  const int64_t bytes = proc_status_bytes("VmHWM");
  if (bytes >= 0) return bytes;
  struct rusage usage {};
  if (getrusage(RUSAGE_SELF, &usage) == 0) return static_cast<int64_t>(usage.ru_maxrss) * 1024;
  return 0;
}

int64_t current_rss_bytes() { return std::max<int64_t>(0, proc_status_bytes("VmRSS")); }

}  // namespace patchcore

#include "patchcore/core/stage_timer.h"

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

}  // namespace patchcore

#include "patchcore/decision/threshold.h"

#include <algorithm>
#include <stdexcept>

namespace patchcore {

double Threshold::normalize(double score) const {
  // A calibration whose scores all tie leaves no range: the decision still holds, as a step at the threshold.
  const double range = max > min ? max - min : 0.0;
  if (range == 0.0) return score > value ? 1.0 : score == value ? 0.5 : 0.0;
  return std::clamp((score - value) / range + 0.5, 0.0, 1.0);
}

const char* to_string(Threshold::Method method) {
  return method == Threshold::Method::kF1Max ? "f1_max" : "quantile";
}

Threshold::Method parse_threshold_method(const std::string& name) {
  if (name == "f1_max") return Threshold::Method::kF1Max;
  if (name == "quantile") return Threshold::Method::kQuantile;
  throw std::invalid_argument("unknown threshold method '" + name + "' (f1_max or quantile)");
}

}  // namespace patchcore

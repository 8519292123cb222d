#pragma once
// Floating-point facts that the exact pruning bounds of the coreset loop and of the nearest-neighbour search
// rest on.
#include <cmath>
#include <limits>

namespace patchcore {

constexpr double kFloatUnit = 0x1.0p-24;   // unit roundoff of float32
constexpr double kDoubleUnit = 0x1.0p-53;  // unit roundoff of float64

// The smallest float >= x: a threshold kept in float next to float bounds must never be tightened by the cast.
inline float round_up_to_float(double x) {
  const float f = static_cast<float>(x);
  return static_cast<double>(f) < x ? std::nextafter(f, std::numeric_limits<float>::infinity()) : f;
}

}  // namespace patchcore

#pragma once
// Floating-point facts that the exact pruning bounds of the coreset loop and of the nearest-neighbour search
// rest on.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace patchcore {

constexpr double kFloatUnit = 0x1.0p-24;   // unit roundoff of float32
constexpr double kDoubleUnit = 0x1.0p-53;  // unit roundoff of float64

// The smallest float >= x: a threshold kept in float next to float bounds must never be tightened by the cast.
inline float round_up_to_float(double x) {
  const float f = static_cast<float>(x);
  return static_cast<double>(f) < x ? std::nextafter(f, std::numeric_limits<float>::infinity()) : f;
}

// Whether values[0, count) are all finite. On the bit patterns, as an integer maximum that vectorises: a float is
// finite when its magnitude bits are below the all-ones exponent. at::isfinite(t).all() would first write a bool
// tensor the size of t: 16 MB of fresh pages for tire's bank.
inline bool all_finite(const float* values, int64_t count) {
  uint32_t largest = 0;
  for (int64_t i = 0; i < count; ++i) {
    uint32_t bits;
    std::memcpy(&bits, values + i, sizeof bits);
    largest = std::max(largest, bits & 0x7fffffffu);
  }
  return largest < 0x7f800000u;
}

}  // namespace patchcore

#pragma once
// 8-bit quantized vectors and their dot products (AVX512_VNNI), for lower bounds on distances that the exact
// searches check in float afterwards: the nearest-neighbour search's dense tier (nn/) and the coreset loop's
// bounds (memory_bank/). A vector c is held as codes q~ = round(c / s) in [-127, 127] with s = max |c_i| / 127; the
// bank side stores them plus 128 as unsigned bytes, 16 vectors by 4 codes per 64 bytes, so that one vpdpbusd adds
// 64 products into 16 int32 sums. The sums are exact, and s_a s_b (a~ . b~) is off from a . b by at most
// |a - s_a a~| |b| + |s_a a~| |b - s_b b~| (Cauchy-Schwarz).
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "patchcore/core/numeric.h"
#include "patchcore/core/simd.h"

#if defined(PATCHCORE_VNNI_KERNEL)
#include <immintrin.h>
#endif

namespace patchcore {

// Whether this CPU has 8-bit integer dot products (AVX512_VNNI), 64 products per instruction.
bool native_quantized_products();

constexpr int64_t kQuantizedLanes = 16;  // vectors per group of the unsigned layout

// Where, in its group of the unsigned layout, the code of coordinate `axis` of the vector in lane `lane` lies.
constexpr int64_t unsigned_code_at(int64_t axis, int64_t lane) {
  return (axis / 4 * kQuantizedLanes + lane) * 4 + axis % 4;
}

// A vector's coordinates c[0, n) in 8 bits: codes q~ = round(c / s) in [-127, 127] with s = max |c_i| / 127 (1 where
// that is 0, so that tiny or zero vectors get codes 0), each passed to put(i, code). Returns s, sum(q~), |c|^2 in
// double, and the lengths that the bound's error term multiplies (|c|, the norm |s q~| and the quantization error
// |c - s q~|) as floats rounded up, so that the term never shrinks.
struct Quantized {
  float scale;
  int32_t sum;
  double squared;
  float norm, length, error;
};
template <typename Put>
Quantized quantize(const float* c, int64_t n, Put put) {
  float largest = 0.0f;
  for (int64_t i = 0; i < n; ++i) largest = std::max(largest, std::abs(c[i]));
  const float scale = largest / 127.0f > 0.0f ? largest / 127.0f : 1.0f;
  int32_t sum = 0;
  double squared = 0.0, error = 0.0, length = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double code = std::clamp(std::nearbyint(static_cast<double>(c[i]) / scale), -127.0, 127.0);
    put(i, static_cast<int32_t>(code));
    const double value = code * scale, off = c[i] - value;
    squared += static_cast<double>(c[i]) * c[i];
    error += off * off;
    length += value * value;
    sum += static_cast<int32_t>(code);
  }
  const auto up = [](double x) { return static_cast<float>(std::sqrt(x) * (1.0 + 4.0 * kFloatUnit)); };
  return Quantized{scale, sum, squared, up(squared), up(length), up(error)};
}

#if defined(PATCHCORE_VNNI_KERNEL)
// sum += the products of row's 64 unsigned bytes with the 4 signed bytes at `code`, four by four, as
// _mm512_dpbusd_epi32 with *code broadcast. In assembly: in a loop of 16 running sums, GCC 12 copies each sum of the
// intrinsic to another register and back at every step, which leaves the pass a quarter slower.
__attribute__((always_inline)) PATCHCORE_VNNI_KERNEL inline __m512i dpbusd(__m512i sum, __m512i row,
                                                                           const int32_t* code) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(sum) : "v"(row), "m"(*code));
  return sum;
}

// The lower bound on |a - b|^2 over the coded coordinates of one vector a against 16 vectors b, one per lane:
//   |a|^2 + |b|^2 - 2 (s_a s_b (a~ . b~) + |a - s_a a~| |b| + |s_a a~| |b - s_b b~|),
// from `sums` of a's codes times b's unsigned codes, which hold `offset` = 128 sum(a~) besides. With A the largest of
// |v|, |s_v v~| and |v - s_v v~| over both vectors, each term is at most A^2, and the float evaluation rounds 8 times.
__attribute__((always_inline)) PATCHCORE_VNNI_KERNEL inline __m512 quantized_bound(__m512i sums, int32_t offset,
                                                                                   float a_squared, float a_scale,
                                                                                   float a_error, float a_coded_norm,
                                                                                   __m512 b_squared, __m512 b_scale,
                                                                                   __m512 b_norm, __m512 b_error) {
  // All lanes through the zero-masked form: the unmasked one trips GCC 12's -Wmaybe-uninitialized in its header.
  const __m512 products = _mm512_maskz_cvtepi32_ps(0xFFFF, _mm512_sub_epi32(sums, _mm512_set1_epi32(offset)));
  const __m512 dot = _mm512_mul_ps(products, _mm512_mul_ps(b_scale, _mm512_set1_ps(a_scale)));
  const __m512 off = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(a_error), b_norm),
                                   _mm512_mul_ps(_mm512_set1_ps(a_coded_norm), b_error));
  return _mm512_sub_ps(_mm512_add_ps(_mm512_set1_ps(a_squared), b_squared),
                       _mm512_mul_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(dot, off)));
}
#endif

}  // namespace patchcore

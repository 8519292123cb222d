#pragma once
// The one SIMD idiom of the kernels: GCC/Clang vector types of 8 floats, whose operations the compiler maps to
// whatever instruction set a function is compiled for, and PATCHCORE_SIMD_KERNEL, which compiles a function
// for x86-64-v3 (AVX2 + FMA) and for the baseline and lets the loader pick one per CPU. Helpers below are
// always inlined, so they take the instruction set of the kernel that calls them.
//
// The lane layout and reduction tree fix the order of every floating-point operation, so a kernel gives the
// same bits whichever instruction set runs it, unless a clone contracts a*b + c into a fused multiply-add,
// which only removes roundings: error bounds written for the unfused order hold for both.
#include <cstdint>
#include <cstring>

#if defined(__x86_64__)
#define PATCHCORE_SIMD_KERNEL __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PATCHCORE_SIMD_KERNEL
#endif

// The one exception: 8-bit integer dot products (AVX512_VNNI), which the vector types cannot express. Such a kernel
// is written with intrinsics (the product itself in one line of assembly where GCC 12 compiles its intrinsic badly),
// compiled for that instruction set alone and called only where the CPU has it, behind a check of
// __builtin_cpu_supports by its caller.
#if defined(__x86_64__)
#define PATCHCORE_VNNI_KERNEL __attribute__((target("avx512f,avx512bw,avx512vnni")))
#endif

namespace patchcore::simd {

using v8f = float __attribute__((vector_size(32)));
using v8i = int32_t __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;

// Loads and stores through memcpy: buffers carry no 32-byte alignment, and returning a 32-byte vector by value
// would give the baseline clone another ABI than the AVX2 one.
__attribute__((always_inline)) inline void load8(v8f& v, const float* p) { std::memcpy(&v, p, sizeof v); }
__attribute__((always_inline)) inline void store8(float* p, const v8f& v) { std::memcpy(p, &v, sizeof v); }

// Bit l set where lane l of a comparison result is true (all ones).
__attribute__((always_inline)) inline uint32_t lane_bits(const v8i& pass) {
  v8i m = pass & v8i{1, 2, 4, 8, 16, 32, 64, 128};
  m |= __builtin_shufflevector(m, m, 4, 5, 6, 7, 0, 1, 2, 3);
  m |= __builtin_shufflevector(m, m, 2, 3, 0, 1, 6, 7, 4, 5);
  m |= __builtin_shufflevector(m, m, 1, 0, 3, 2, 5, 4, 7, 6);
  return static_cast<uint32_t>(m[0]);
}

// The sum of the 8 lanes in a fixed tree: ((0 + 4) + (2 + 6)) + ((1 + 5) + (3 + 7)).
__attribute__((always_inline)) inline float horizontal_sum(const v8f& v) {
  float t[8];
  std::memcpy(t, &v, sizeof t);
  return ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7]));
}

}  // namespace patchcore::simd

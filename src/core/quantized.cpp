#include "patchcore/core/quantized.h"

namespace patchcore {

bool native_quantized_products() {
#if defined(__x86_64__)
  static const bool native = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0 && __builtin_cpu_supports("avx512vnni") != 0;
  }();
  return native;
#else
  return false;
#endif
}

}  // namespace patchcore

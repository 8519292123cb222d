// libFuzzer target: arbitrary bytes as a .pth checkpoint (zip or legacy pickle format).
// Any input must either load or throw CheckpointError; the sanitizers catch everything else.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "patchcore/io/checkpoint.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // Limits far below the defaults so that a mutated size field is refused by the check rather than by
  // the fuzzer's own memory limit, which would hide whether the check exists.
  patchcore::CheckpointLimits limits;
  limits.max_file_bytes = 1 << 20;
  limits.max_tensor_bytes = 16 << 20;
  limits.max_tensors = 1000;
  try {
    const auto state = patchcore::load_state_dict_from_memory(std::string(reinterpret_cast<const char*>(data), size),
                                                              "fuzz.pth", limits);
    // The header promises contiguous tensors within the limit; reading every byte would expose a tensor
    // whose storage is shorter than its shape says.
    unsigned checksum = 0;
    for (const auto& [name, tensor] : state) {
      if (!tensor.is_contiguous() || tensor.nbytes() > limits.max_tensor_bytes) std::abort();
      const auto* bytes = static_cast<const uint8_t*>(tensor.data_ptr());
      for (size_t i = 0; i < tensor.nbytes(); ++i) checksum += bytes[i];
    }
    volatile unsigned sink = checksum;
    (void)sink;
  } catch (const patchcore::CheckpointError&) {
  }
  return 0;
}

#include "patchcore/core/device.h"

#include <torch/cuda.h>

#include <stdexcept>

namespace patchcore {

c10::Device parse_device(const std::string& device) {
  c10::Device parsed(c10::kCPU);
  try {
    parsed = c10::Device(device);
  } catch (const c10::Error&) {
    throw std::invalid_argument("unknown device '" + device + "'; use cpu or cuda[:N]");
  }
  if (parsed.is_cuda()) {
    if (!torch::cuda::is_available())
      throw std::invalid_argument("device '" + device + "' requested but this libtorch has no usable CUDA device");
    if (parsed.has_index() && parsed.index() >= static_cast<int64_t>(torch::cuda::device_count()))
      throw std::invalid_argument("device '" + device + "' does not exist");
  } else if (!parsed.is_cpu()) {
    throw std::invalid_argument("unsupported device '" + device + "'; use cpu or cuda[:N]");
  }
  return parsed;
}

}  // namespace patchcore

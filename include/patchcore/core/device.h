#pragma once
// Where tensors live: the devices a user can name.
#include <c10/core/Device.h>

#include <string>

namespace patchcore {

// Parses "cpu" / "cuda[:N]" and checks that the device exists in this build and on this machine; an unavailable
// device is an error (std::invalid_argument), never a silent fallback.
c10::Device parse_device(const std::string& device);

}  // namespace patchcore

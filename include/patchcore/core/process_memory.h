#pragma once
// What this process holds in memory and what the system has left for it: for `patchcore bench`'s figures and for
// fit, which plans where the training features wait from them.
#include <cstdint>

namespace patchcore {

// The most resident memory this process has used so far (VmHWM), in bytes; 0 where the system does not say.
int64_t peak_rss_bytes();
// The resident memory of this process now (VmRSS), in bytes; 0 where the system does not say.
int64_t current_rss_bytes();
// How much more memory this process can take without swapping or being stopped, in bytes: the system's
// MemAvailable, or less where the memory limit of the process's cgroup or of one above it (v1 or v2) leaves less.
// 0 where the system does not say.
int64_t available_memory_bytes();

}  // namespace patchcore

#include "patchcore/core/process_memory.h"

#include <sys/resource.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace fs = std::filesystem;

namespace patchcore {
namespace {

// The number after "key" on the first line of `file` that starts with it, times `unit`; -1 when absent or not a
// number (a cgroup's "max"). An empty key reads the file's first number.
int64_t field(const fs::path& file, const std::string& key, int64_t unit = 1) {
  std::ifstream in(file);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(key, 0) != 0) continue;
    std::istringstream rest(line.substr(key.size()));
    int64_t value = 0;
    return rest >> value ? value * unit : -1;
  }
  return -1;
}

// One version of the cgroup memory controller: where its hierarchy is mounted, and its files for the limit, the
// usage and the page cache within that usage.
struct CgroupMemoryFiles {
  bool v2;
  const char* mount;
  const char* limit;  // above any real amount where no limit is set ("max" in v2, near 2^63 in v1)
  const char* usage;
  const char* cache;  // memory.stat's key for the page cache, shared memory included
};
constexpr CgroupMemoryFiles kCgroupV2{true, "/sys/fs/cgroup", "memory.max", "memory.current", "file "};
constexpr CgroupMemoryFiles kCgroupV1{false, "/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes",
                                      "cache "};

// The process's cgroup in the memory controller's hierarchy, from /proc/self/cgroup: the line "0::/path" in v2,
// "N:controllers:/path" with memory among the comma-separated controllers in v1. Empty where there is none.
std::string own_cgroup(bool v2) {
  std::ifstream cgroups("/proc/self/cgroup");
  for (std::string line; std::getline(cgroups, line);) {
    const size_t first = line.find(':'), second = line.find(':', first + 1);
    if (first == std::string::npos || second == std::string::npos) continue;
    const std::string controllers = "," + line.substr(first + 1, second - first - 1) + ",";
    if (v2 ? line.compare(0, first, "0") == 0 && controllers == ",,"
           : controllers.find(",memory,") != std::string::npos)
      return line.substr(second + 1);
  }
  return "";
}

// The least room left under the memory limit of this process's cgroup or of any above it. The page cache charged to
// a cgroup, shared memory aside, counts as room: it is reclaimed before anything fails. -1 where no limit is read.
int64_t cgroup_room_bytes(const CgroupMemoryFiles& v) {
  const std::string own = own_cgroup(v.v2);
  if (own.empty()) return -1;
  const fs::path root = v.mount;
  int64_t room = -1;
  for (fs::path dir = root / fs::path(own).relative_path();; dir = dir.parent_path()) {
    const int64_t limit = field(dir / v.limit, ""), usage = field(dir / v.usage, "");
    if (limit >= 0 && usage >= 0) {
      const int64_t cache = std::max<int64_t>(0, field(dir / "memory.stat", v.cache)) -
                            std::max<int64_t>(0, field(dir / "memory.stat", "shmem "));
      const int64_t here = std::max<int64_t>(0, limit - std::max<int64_t>(0, usage - std::max<int64_t>(0, cache)));
      room = room < 0 ? here : std::min(room, here);
    }
    if (dir.string().size() <= root.string().size()) break;
  }
  return room;
}

}  // namespace

int64_t peak_rss_bytes() {
  // /proc reports the high-water mark of this process alone; getrusage is the portable fallback.
  const int64_t bytes = field("/proc/self/status", "VmHWM:", 1024);
  if (bytes >= 0) return bytes;
  struct rusage usage {};
  if (getrusage(RUSAGE_SELF, &usage) == 0) return static_cast<int64_t>(usage.ru_maxrss) * 1024;
  return 0;
}

int64_t current_rss_bytes() { return std::max<int64_t>(0, field("/proc/self/status", "VmRSS:", 1024)); }

int64_t available_memory_bytes() {
  const int64_t system = field("/proc/meminfo", "MemAvailable:", 1024);
  if (system < 0) return 0;
  int64_t available = system;
  for (const CgroupMemoryFiles& v : {kCgroupV2, kCgroupV1}) {
    const int64_t room = cgroup_room_bytes(v);
    if (room >= 0) available = std::min(available, room);
  }
  return available;
}

}  // namespace patchcore

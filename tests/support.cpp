#include "support.h"

#include <cstdlib>
#include <filesystem>
#include <random>
#include <vector>

namespace fs = std::filesystem;

namespace patchcore::test {
namespace {

struct TempDirs {
  std::vector<fs::path> dirs;
  ~TempDirs() {
    std::error_code ec;
    for (auto& d : dirs) fs::remove_all(d, ec);
  }
};
TempDirs& temp_dirs() {
  static TempDirs t;
  return t;
}

}  // namespace

std::string fixture(const std::string& relative) { return std::string(PATCHCORE_FIXTURES_DIR) + "/" + relative; }

std::string shared(const std::string& relative) {
  const char* env = std::getenv("PATCHCORE_SHARED");
  const fs::path root = env ? fs::path(env) : fs::path(PATCHCORE_SHARED_DIR);
  const fs::path p = root / relative;
  return fs::exists(p) ? p.lexically_normal().string() : std::string();
}

std::string temp_dir() {
  std::random_device rd;
  fs::path p = fs::temp_directory_path() / ("patchcore-test-" + std::to_string(rd()) + std::to_string(rd()));
  fs::create_directories(p);
  temp_dirs().dirs.push_back(p);
  return p.string();
}

}  // namespace patchcore::test

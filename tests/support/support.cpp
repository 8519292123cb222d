#include "support.h"

#include "test_paths.h"

#include <sys/wait.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <filesystem>
#include <random>
#include <stdexcept>
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

std::string cli() { return PATCHCORE_CLI; }

std::string temp_dir() {
  std::random_device rd;
  fs::path p = fs::temp_directory_path() / ("patchcore-test-" + std::to_string(rd()) + std::to_string(rd()));
  fs::create_directories(p);
  temp_dirs().dirs.push_back(p);
  return p.string();
}

std::string linked_data_set(const std::string& source, const std::vector<std::string>& files) {
  const fs::path root = fs::path(temp_dir()) / fs::path(source).filename();
  for (const auto& f : files) {
    fs::create_directories((root / f).parent_path());
    fs::create_symlink(fs::absolute(fs::path(source) / f), root / f);
  }
  return root.string();
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), {});
}

CliRun run_cli(const std::vector<std::string>& args, const std::string& input) {
  const std::string dir = temp_dir();
  std::ofstream(dir + "/in") << input;
  std::string command = cli();
  for (const auto& a : args) command += " '" + a + "'";
  command += " < " + dir + "/in > " + dir + "/out 2> " + dir + "/err";
  const int status = std::system(command.c_str());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, slurp(dir + "/out"), slurp(dir + "/err")};
}

CliRun run_cli_line(const std::string& args) {
  std::vector<std::string> split;
  std::stringstream in(args);
  for (std::string a; in >> a;) split.push_back(a);
  return run_cli(split);
}

std::string fit_with_cli(const std::string& data, const std::vector<std::string>& options) {
  const std::string model = temp_dir() + "/model";
  std::vector<std::string> args{"--threads", "2", "fit", "--data", data, "--weights",
                                shared("weights/resnet18-imagenet-stem-to-layer3.pth"), "--out", model};
  args.insert(args.end(), options.begin(), options.end());
  const CliRun fit = run_cli(args);
  if (fit.status != 0) throw std::runtime_error("fit failed: " + fit.err);
  return model;
}

std::vector<std::vector<std::string>> read_csv(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::vector<std::string>> rows;
  for (std::string line; std::getline(in, line);) {
    std::vector<std::string> cells;
    std::stringstream s(line);
    for (std::string cell; std::getline(s, cell, ',');) cells.push_back(cell);
    if (!line.empty() && line.back() == ',') cells.emplace_back();
    rows.push_back(cells);
  }
  return rows;
}

}  // namespace patchcore::test

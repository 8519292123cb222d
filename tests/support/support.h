#pragma once
// Paths and skips shared by all test executables.
#include <gtest/gtest.h>

#include <exception>
#include <string>
#include <vector>

namespace patchcore::test {

// The message of the exception f() throws, or "<no error>", so tests can check that it names the problem.
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "<no error>";
}

// tests/fixtures/<relative>: golden files written by scripts/make_fixtures.sh.
std::string fixture(const std::string& relative);
// ../shared/<relative> (or $PATCHCORE_SHARED/<relative>); empty when the shared folder is absent.
std::string shared(const std::string& relative);
// The patchcore command-line tool of this build.
std::string cli();
// A fresh empty directory under the system temp folder, removed at process exit.
std::string temp_dir();
// A fresh folder with symlinks to `files` (paths relative to `source`, e.g. "train/good/000.png"), so a
// test runs on a few images of a shared data set in its MVTec layout.
std::string linked_data_set(const std::string& source, const std::vector<std::string>& files);

// A whole file's bytes; empty when it cannot be read.
std::string slurp(const std::string& path);

// What a run of the command-line tool gave.
struct CliRun {
  int status = -1;  // exit status, or -1 when killed by a signal
  std::string out, err;
  std::string output() const { return out + err; }
};
// The tool with `args`, each one argument, standard input from `input`, stdout and stderr captured apart.
CliRun run_cli(const std::vector<std::string>& args, const std::string& input = "");
// The same with the arguments split at spaces (test paths have none).
CliRun run_cli_line(const std::string& args);
// `patchcore fit` on `data` with the shared ResNet-18 weights and `options`, into a fresh directory whose path it
// returns; throws with fit's stderr when it fails.
std::string fit_with_cli(const std::string& data, const std::vector<std::string>& options);

// The rows of a CSV file without quoted fields, a trailing empty field kept.
std::vector<std::vector<std::string>> read_csv(const std::string& path);

}  // namespace patchcore::test

// Skips the current test with a message when ../shared/<relative> is not there.
#define PATCHCORE_REQUIRE_SHARED(var, relative)                \
  const std::string var = ::patchcore::test::shared(relative); \
  if (var.empty()) GTEST_SKIP() << "../shared/" << (relative) << " is absent; test skipped"

#pragma once
// Paths and skips shared by all test executables.
#include <gtest/gtest.h>

#include <exception>
#include <string>

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
// A fresh empty directory under the system temp folder, removed at process exit.
std::string temp_dir();

}  // namespace patchcore::test

// Skips the current test with a message when ../shared/<relative> is not there.
#define PATCHCORE_REQUIRE_SHARED(var, relative)                                             \
  const std::string var = ::patchcore::test::shared(relative);                              \
  if (var.empty()) GTEST_SKIP() << "../shared/" << (relative) << " is absent; test skipped"

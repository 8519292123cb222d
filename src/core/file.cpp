#include "patchcore/core/file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>

namespace fs = std::filesystem;

namespace patchcore {
namespace {

std::string unique_suffix() {
  static thread_local std::mt19937_64 rng{std::random_device{}()};
  std::ostringstream s;
  s << ".tmp-" << ::getpid() << "-" << std::hex << rng();
  return s.str();
}

void fsync_path(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f) {
    ::fsync(::fileno(f));
    std::fclose(f);
  }
}

}  // namespace

std::string read_file(const std::string& path) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) throw std::runtime_error(path + ": is a directory, expected a file");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open file");
  std::ostringstream contents;
  contents << in.rdbuf();
  if (in.bad()) throw std::runtime_error(path + ": read error");
  return contents.str();
}

void write_file_atomically(const std::string& path, const std::function<void(const std::string&)>& write) {
  fs::path target(path);
  fs::path tmp = target;
  tmp += unique_suffix();
  try {
    write(tmp.string());
    fsync_path(tmp.string());
    fs::rename(tmp, target);
  } catch (...) {
    std::error_code ec;
    fs::remove(tmp, ec);
    throw;
  }
}

void write_directory_atomically(const std::string& dir, const std::function<void(const std::string&)>& write) {
  fs::path target = fs::absolute(fs::path(dir)).lexically_normal();
  if (target.has_filename() == false) target = target.parent_path();
  fs::path tmp = target;
  tmp += unique_suffix();
  std::error_code ec;
  try {
    if (!target.parent_path().empty()) fs::create_directories(target.parent_path());
    fs::create_directory(tmp);
    write(tmp.string());
    if (fs::exists(target)) {
      if (!fs::is_directory(target)) throw std::runtime_error(dir + ": exists and is not a directory");
      // One atomic swap where the file system supports it, so that a process killed at any moment leaves
      // `dir` holding either the old or the new contents, never nothing.
      if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, target.c_str(), RENAME_EXCHANGE) == 0) {
        fs::remove_all(tmp, ec);  // now the old directory
        return;
      }
      fs::path old = target;
      old += unique_suffix();
      fs::rename(target, old);
      fs::rename(tmp, target);
      fs::remove_all(old, ec);
    } else {
      fs::rename(tmp, target);
    }
  } catch (const fs::filesystem_error& e) {
    fs::remove_all(tmp, ec);
    throw std::runtime_error(dir + ": cannot write directory: " + e.code().message());
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
}

}  // namespace patchcore

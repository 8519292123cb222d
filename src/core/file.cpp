#include "patchcore/core/file.h"

#include "patchcore/core/output_dir.h"

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

std::string read_file(const std::string& path, uint64_t max_bytes) {
  std::error_code ec;
  const fs::file_status status = fs::status(path, ec);
  if (!fs::exists(status)) throw std::runtime_error(path + ": no such file");
  if (fs::is_directory(status)) throw std::runtime_error(path + ": is a directory, expected a file");
  if (!fs::is_regular_file(status)) throw std::runtime_error(path + ": is not a regular file");
  const uint64_t size = fs::file_size(path, ec);
  if (ec) throw std::runtime_error(path + ": cannot read: " + ec.message());
  if (size > max_bytes)
    throw std::runtime_error(path + ": file of " + std::to_string(size) + " bytes exceeds the limit of " +
                             std::to_string(max_bytes) + " bytes");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open file");
  std::string bytes(static_cast<size_t>(size), '\0');
  in.read(bytes.data(), static_cast<std::streamsize>(size));
  if (static_cast<uint64_t>(in.gcount()) != size || in.peek() != std::ifstream::traits_type::eof())
    throw std::runtime_error(path + ": read error (the file changed size while being read)");
  return bytes;
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

void write_file_atomically(const std::string& path, std::string_view contents) {
  write_file_atomically(path, [&](const std::string& tmp) {
    std::ofstream out(tmp, std::ios::binary);
    out.write(contents.data(), static_cast<std::streamsize>(contents.size()));
    if (!out) throw std::runtime_error(path + ": write failed");
  });
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
    OutputDirectory::write_manifest(tmp.string());
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

#pragma once
// Small file-system helpers shared by every writer: outputs appear whole or not at all.
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

namespace patchcore {

// Reads a whole file into one buffer of its size. Throws std::runtime_error "<path>: <problem>" when it does not
// exist, is not a regular file, is larger than max_bytes, or cannot be read whole.
std::string read_file(const std::string& path, uint64_t max_bytes = UINT64_MAX);

// Calls write(tmp_path) with a temporary path beside `path`, flushes it and renames it onto `path`.
// If write throws, the temporary file is removed and `path` is left as it was.
void write_file_atomically(const std::string& path, const std::function<void(const std::string& tmp_path)>& write);

// The same for a file whose whole contents are `contents`.
void write_file_atomically(const std::string& path, std::string_view contents);

// Same for a whole directory: write(tmp_dir) fills a fresh temporary directory `<dir>.tmp-<pid>-<hex>`
// beside `dir`, which, with its manifest (output_dir.h), then replaces `dir`. Callers check `dir` with
// OutputDirectory::check before the work. An existing `dir` is exchanged with it in one renameat2(2), so
// a process killed at any moment leaves the old or the new directory whole; only on file systems
// without RENAME_EXCHANGE is the old one moved aside first. A killed writer can leave its temporary
// directory behind, which is safe to delete.
void write_directory_atomically(const std::string& dir, const std::function<void(const std::string& tmp_dir)>& write);

}  // namespace patchcore

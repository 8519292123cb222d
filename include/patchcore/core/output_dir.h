#pragma once
// The one rule for where commands write, so that no command ever deletes or overwrites a file it did not write:
// an output directory must be new, empty, or one that patchcore wrote, which holds its manifest (.patchcore-output,
// the names of the files it wrote) and nothing the manifest does not list. It may neither be, contain, nor lie inside
// one of the command's inputs. The rule is checked before any work.
#include <fstream>
#include <string>
#include <vector>

namespace patchcore {

class OutputDirectory {
 public:
  static constexpr const char* kManifest = ".patchcore-output";

  // Throws std::runtime_error "<dir>: <why>" unless `dir` may be written under the rule; creates nothing.
  static void check(const std::string& dir, const std::vector<std::string>& inputs);
  // The same rule for a single output file (--json): new, or a JSON file that patchcore wrote (its "written_by"
  // names patchcore).
  static void check_file(const std::string& path, const std::vector<std::string>& inputs);
  // The manifest for a directory that is written whole (write_directory_atomically): every file under `dir`.
  static void write_manifest(const std::string& dir);

  // For a writer that fills `dir` file by file: checks it, creates it with an empty manifest, or removes the files a
  // previous patchcore run listed there.
  OutputDirectory(const std::string& dir, const std::vector<std::string>& inputs);
  // The path of `name` inside the directory, listed in the manifest before anything is written there.
  std::string claim(const std::string& name);
  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
  std::ofstream manifest_;
};

}  // namespace patchcore

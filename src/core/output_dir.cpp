#include "patchcore/core/output_dir.h"

#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>

#include "patchcore/core/error.h"

namespace fs = std::filesystem;

namespace patchcore {
namespace {

// A path as absolute and free of "." and "..", following the links that exist.
fs::path canonical_path(const std::string& path) { return fs::weakly_canonical(fs::absolute(path)); }

bool within(const fs::path& inner, const fs::path& outer) {
  auto i = inner.begin(), o = outer.begin();
  for (; o != outer.end(); ++o, ++i)
    if (i == inner.end() || *i != *o) return false;
  return true;
}

// write_file_atomically's temporary files, "<name>.tmp-<pid>-<hex>", which a killed run leaves behind.
bool is_temporary(const std::string& name) {
  const size_t at = name.rfind(".tmp-");
  if (at == std::string::npos) return false;
  const size_t dash = name.find('-', at + 5);
  return dash != std::string::npos && name.find_first_not_of("0123456789", at + 5) == dash &&
         name.find_first_not_of("0123456789abcdef", dash + 1) == std::string::npos;
}

std::set<std::string> manifest_entries(const fs::path& dir) {
  std::ifstream in(dir / OutputDirectory::kManifest);
  std::set<std::string> names;
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) names.insert(line);
  return names;
}

// Every file under `dir`, relative to it (directories only through their files).
std::vector<std::string> files_under(const fs::path& dir) {
  std::vector<std::string> files;
  for (const auto& entry : fs::recursive_directory_iterator(dir))
    if (!entry.is_directory()) files.push_back(fs::relative(entry.path(), dir).string());
  return files;
}

}  // namespace

void OutputDirectory::check(const std::string& dir, const std::vector<std::string>& inputs) {
  const fs::path out = canonical_path(dir);
  for (const std::string& input : inputs) {
    if (input.empty()) continue;
    const fs::path in = canonical_path(input);
    if (within(out, in)) throw std::runtime_error(dir + ": the output directory is or lies inside the input " + input);
    if (within(in, out)) throw std::runtime_error(dir + ": the output directory contains the input " + input);
  }
  std::error_code ec;
  const fs::file_status status = fs::symlink_status(dir, ec);
  if (!fs::exists(status)) return;
  if (!fs::is_directory(fs::status(dir, ec)))
    throw std::runtime_error(dir + ": exists and is not a directory; give a new or empty directory");
  if (fs::is_empty(dir, ec)) return;
  if (!fs::exists(out / kManifest))
    throw std::runtime_error(dir + ": holds files patchcore did not write; give a new or empty directory");
  const std::set<std::string> ours = manifest_entries(out);
  for (const std::string& file : files_under(out))
    if (file != kManifest && !ours.count(file) && !is_temporary(file))
      throw std::runtime_error(dir + ": holds " + quote_name(file) +
                               ", which patchcore did not write; move it or give another directory");
}

void OutputDirectory::check_file(const std::string& path, const std::vector<std::string>& inputs) {
  const fs::path out = canonical_path(path);
  for (const std::string& input : inputs)
    if (!input.empty() && within(out, canonical_path(input)))
      throw std::runtime_error(path + ": the output file is or lies inside the input " + input);
  std::error_code ec;
  if (!fs::exists(fs::symlink_status(path, ec))) return;
  std::ifstream in(path);
  const nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
  if (!j.is_object() || j.value("written_by", "").rfind("patchcore", 0) != 0)
    throw std::runtime_error(path + ": exists and patchcore did not write it; give a new file");
}

void OutputDirectory::write_manifest(const std::string& dir) {
  std::ofstream out(fs::path(dir) / kManifest);
  for (const std::string& file : files_under(dir))
    if (file != kManifest) out << file << "\n";
  if (!out) throw std::runtime_error(dir + ": cannot write " + kManifest);
}

OutputDirectory::OutputDirectory(const std::string& dir, const std::vector<std::string>& inputs) : dir_(dir) {
  check(dir, inputs);
  fs::create_directories(dir);
  // A previous run's files are patchcore's own: remove them, so that this run's results stand alone.
  for (const std::string& name : manifest_entries(dir)) {
    std::error_code ec;
    fs::remove(fs::path(dir) / name, ec);
  }
  for (const std::string& name : files_under(dir))
    if (is_temporary(name)) fs::remove(fs::path(dir) / name);
  for (const auto& entry : fs::directory_iterator(dir))
    if (entry.is_directory() && fs::is_empty(entry.path())) fs::remove(entry.path());
  manifest_.open(fs::path(dir) / kManifest, std::ios::trunc);
  if (!manifest_) throw std::runtime_error(dir + ": cannot write " + kManifest);
}

std::string OutputDirectory::claim(const std::string& name) {
  manifest_ << name << "\n" << std::flush;
  if (!manifest_) throw std::runtime_error(dir_ + ": cannot write " + kManifest);
  const fs::path path = fs::path(dir_) / name;
  if (path.has_parent_path()) fs::create_directories(path.parent_path());
  return path.string();
}

}  // namespace patchcore

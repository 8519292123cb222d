#include "patchcore/io/dataset.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <filesystem>

namespace fs = std::filesystem;

namespace patchcore {
namespace {

[[noreturn]] void fail(const fs::path& path, const std::string& problem) {
  throw DatasetError(path.string() + ": " + problem);
}

void require_directory(const fs::path& path, const std::string& what) {
  std::error_code ec;
  if (!fs::exists(path, ec)) fail(path, what + " does not exist");
  if (!fs::is_directory(path, ec)) fail(path, what + " is not a directory");
}

// Names of the entries of `dir` that pass `keep`, in byte order.
template <typename Keep>
std::vector<std::string> sorted_names(const fs::path& dir, Keep keep) {
  std::vector<std::string> names;
  std::error_code ec;
  fs::directory_iterator it(dir, ec);
  if (ec) fail(dir, "cannot list directory: " + ec.message());
  for (const fs::directory_entry& entry : it) {
    const std::string name = entry.path().filename().string();
    if (name.empty() || name[0] == '.') continue;
    if (keep(entry, name)) names.push_back(name);
  }
  // std::string compares as unsigned bytes, which for UTF-8 is code point order, Python's str order.
  std::sort(names.begin(), names.end());
  return names;
}

std::vector<std::string> image_names(const fs::path& dir) {
  return sorted_names(dir, [](const fs::directory_entry& e, const std::string& name) {
    std::error_code ec;
    return e.is_regular_file(ec) && is_image_file_name(name);
  });
}

}  // namespace

bool is_image_file_name(const std::string& file_name) {
  const std::string ext = fs::path(file_name).extension().string();
  std::string lower(ext.size(), '\0');
  std::transform(ext.begin(), ext.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  static const std::array<std::string, 6> accepted{".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"};
  return std::find(accepted.begin(), accepted.end(), lower) != accepted.end();
}

std::vector<Sample> MVTecDataset::train(const std::string& root) {
  require_directory(root, "data set root");
  const fs::path good = fs::path(root) / "train" / "good";
  require_directory(good, "training folder train/good");
  std::vector<Sample> samples;
  for (const std::string& name : image_names(good)) {
    samples.push_back(Sample{(good / name).string(), "", "good", false});
  }
  if (samples.empty()) fail(good, "training folder has no image files");
  return samples;
}

std::vector<Sample> MVTecDataset::test(const std::string& root) {
  require_directory(root, "data set root");
  const fs::path test_dir = fs::path(root) / "test";
  require_directory(test_dir, "test folder");
  const std::vector<std::string> defects = sorted_names(test_dir, [](const fs::directory_entry& e, const std::string&) {
    std::error_code ec;
    return e.is_directory(ec);
  });
  std::vector<Sample> samples;
  for (const std::string& defect : defects) {
    const bool anomalous = defect != "good";
    const fs::path mask_dir = fs::path(root) / "ground_truth" / defect;
    std::error_code ec;
    const bool masked = anomalous && fs::is_directory(mask_dir, ec);
    for (const std::string& name : image_names(test_dir / defect)) {
      Sample s{(test_dir / defect / name).string(), "", defect, anomalous};
      if (masked) {
        const fs::path mask = mask_dir / (fs::path(name).stem().string() + "_mask.png");
        std::error_code ec;
        if (!fs::is_regular_file(mask, ec)) fail(s.image_path, "defective test image has no mask " + mask.string());
        s.mask_path = mask.string();
      }
      samples.push_back(std::move(s));
    }
  }
  if (samples.empty()) fail(test_dir, "test folder has no image files");
  return samples;
}

}  // namespace patchcore

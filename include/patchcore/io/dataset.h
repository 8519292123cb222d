#pragma once
// The MVTec AD folder layout:
//   root/train/good/*                         training images (all normal)
//   root/test/<defect>/*                      test images; <defect> == "good" for normal ones
//   root/ground_truth/<defect>/<stem>_mask.png  one mask per defective test image
// Only image files count (png, jpg, jpeg, bmp, tif, tiff, any case); names starting with '.' are ignored.
// Folders and files are ordered by their names' bytes, which is Python's sorted(os.listdir(...)) order
// for UTF-8 names, so samples come in the reference's order.
#include <stdexcept>
#include <string>
#include <vector>

namespace patchcore {

// A data set folder that does not have the expected layout; the message names the path.
class DatasetError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Sample {
  std::string image_path;
  std::string mask_path;  // empty when none (good)
  std::string defect_type;
  bool is_anomalous = false;
};

struct MVTecDataset {
  // root/train/good, sorted. Throws DatasetError if root or train/good is missing or has no image.
  static std::vector<Sample> train(const std::string& root);
  // Defect folders sorted, files sorted; "good" gets label 0 and no mask, every other folder label 1 and,
  // where ground_truth/<defect> exists, the mask ground_truth/<defect>/<stem>_mask.png, which must then exist.
  // A defect type without a ground_truth folder is labelled by image only (empty mask_path). (The reference
  // pairs masks with images by sorted position; matching by name gives the same pairs whenever the layout
  // is complete, and reports a missing mask instead of shifting every later pair.)
  static std::vector<Sample> test(const std::string& root);
};

// Whether a file name has one of the accepted image extensions (case-insensitive).
bool is_image_file_name(const std::string& file_name);

}  // namespace patchcore

// make_augmented_set SRC DST COPIES: a larger training set for memory benchmarks of fit. DST/train/good gets
// COPIES variants of every image of SRC/train/good: the image itself, then flips and crops (85-100% of each
// side, resized back), seeded, so every copy gives different patches. DST/test and DST/ground_truth link to
// SRC's, so `patchcore bench --data DST` runs as on SRC. Example: tire (210 images) with 10 copies gives
// 2,100 training images, 1,646,400 patches at the default settings.
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include <cstdio>
#include <filesystem>
#include <random>
#include <string>

#include "patchcore/io/dataset.h"

namespace fs = std::filesystem;

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s SRC DST COPIES\n", argv[0]);
    return 2;
  }
  try {
    const fs::path src = argv[1], dst = argv[2];
    const int copies = std::stoi(argv[3]);
    if (copies < 1) throw std::invalid_argument("COPIES must be at least 1");
    if (fs::exists(dst)) throw std::runtime_error(dst.string() + ": already exists");
    fs::create_directories(dst / "train" / "good");
    for (const char* linked : {"test", "ground_truth"})
      if (fs::exists(src / linked)) fs::create_directory_symlink(fs::canonical(src / linked), dst / linked);
    std::mt19937 rng(2022);
    size_t written = 0;
    for (const auto& sample : patchcore::MVTecDataset::train(src.string())) {
      const cv::Mat image = cv::imread(sample.image_path, cv::IMREAD_UNCHANGED);
      if (image.empty()) throw std::runtime_error(sample.image_path + ": cannot read the image");
      const std::string stem = fs::path(sample.image_path).stem().string();
      for (int k = 0; k < copies; ++k) {
        cv::Mat variant = image;
        if (k > 0) {
          std::uniform_real_distribution<double> side(0.85, 1.0), start(0.0, 1.0);
          const int w = static_cast<int>(image.cols * side(rng)), h = static_cast<int>(image.rows * side(rng));
          const int x = static_cast<int>((image.cols - w) * start(rng)),
                    y = static_cast<int>((image.rows - h) * start(rng));
          cv::resize(image(cv::Rect(x, y, w, h)), variant, image.size(), 0, 0, cv::INTER_LINEAR);
          if (k % 4 != 0) cv::flip(variant, variant, k % 4 - 2);  // -1: both axes, 0: vertical, 1: horizontal
        }
        const std::string out = (dst / "train" / "good" / (stem + "_" + std::to_string(k) + ".png")).string();
        if (!cv::imwrite(out, variant)) throw std::runtime_error(out + ": cannot write the image");
        ++written;
      }
    }
    std::printf("%zu training images in %s\n", written, (dst / "train" / "good").string().c_str());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "make_augmented_set: error: %s\n", e.what());
    return 1;
  }
}

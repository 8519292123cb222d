#pragma once
// Where the time and memory of fit and predict go, on a data set in MVTec layout (`patchcore bench`).
#include <cstdint>
#include <map>
#include <string>

#include "patchcore/patchcore.h"

namespace patchcore {

struct BenchOptions {
  int repeat = 3;  // predict passes over the test split; predict figures are medians over them
  FitOptions fit;  // its batch size also applies to predict
};

struct BenchResult {
  size_t train_images = 0, test_images = 0;
  int64_t memory_bank_size = 0;
  int threads = 0;  // torch intra-op threads during the run
  int repeat = 0;
  double fit_seconds = 0;  // wall clock of the whole fit
  // decode, backbone, embedding, store, coreset, index. Decoding runs beside the other stages, so the stages
  // can add up to more than fit_seconds.
  std::map<std::string, double> fit_stage_seconds;
  double predict_ms_per_image = 0;  // wall clock of a pass over the test split / its images
  // decode, backbone, embedding, search, segmentation, per image.
  std::map<std::string, double> predict_stage_ms_per_image;
  double images_per_second = 0;  // 1000 / predict_ms_per_image
  int64_t peak_rss_bytes = 0;    // of the whole process, at the end
  // Where fit kept the training features. Held in memory, they are not in the resident memory: an anonymous memory
  // file is mapped by no one.
  FitReport fit_report;
};

// Fits `model` (loaded; any fitted state is replaced) on root/train/good, then predicts every image of
// root/test `options.repeat` times, decoding as predict would be used: file in, scores and maps out.
BenchResult bench(PatchCore& model, const std::string& data_root, const BenchOptions& options = {},
                  const ProgressCallback& progress = {});

// A table for people, and JSON with the fields of BenchResult.
std::string format_bench(const BenchResult& result);
std::string bench_json(const BenchResult& result);

}  // namespace patchcore

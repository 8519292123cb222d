#include "patchcore/bench.h"

#include <ATen/ATen.h>

#include "patchcore/core/parallel.h"
#include "patchcore/core/process_memory.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <vector>

#include "patchcore/io/dataset.h"
#include "patchcore/io/image_batches.h"

namespace patchcore {
namespace {

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

BenchResult bench(PatchCore& model, const std::string& data_root, const BenchOptions& options,
                  const ProgressCallback& progress) {
  if (options.repeat < 1) throw std::invalid_argument("bench: repeat must be at least 1");
  if (options.fit.batch_size < 1) throw std::invalid_argument("bench: batch size must be at least 1");
  std::vector<std::string> train, test;
  for (const auto& s : MVTecDataset::train(data_root)) train.push_back(s.image_path);
  for (const auto& s : MVTecDataset::test(data_root)) test.push_back(s.image_path);
  BenchResult r;
  r.train_images = train.size();
  r.test_images = test.size();
  r.threads = num_threads();
  r.repeat = options.repeat;

  StageTimer fit_timer;
  const auto fit_start = std::chrono::steady_clock::now();
  r.fit_report = model.fit(train, options.fit, progress, &fit_timer);
  r.fit_seconds = seconds_since(fit_start);
  for (const auto& [stage, s] : fit_timer.stages()) r.fit_stage_seconds[stage] = s.seconds;
  r.memory_bank_size = model.memory_bank_size();

  std::vector<double> pass_ms;
  std::map<std::string, std::vector<double>> stage_ms;
  const double per_image = 1000.0 / static_cast<double>(test.size());
  for (int pass = 0; pass < options.repeat; ++pass) {
    StageTimer timer;
    const auto start = std::chrono::steady_clock::now();
    ImageBatches batches(test, model.params().transform, options.fit.batch_size, &timer);
    for (std::vector<at::Tensor> images; batches.next(images);) {
      model.predict(images, &timer);
      if (progress) progress("predict pass " + std::to_string(pass + 1), batches.done(), test.size());
    }
    pass_ms.push_back(seconds_since(start) * per_image);
    for (const auto& [stage, s] : timer.stages()) stage_ms[stage].push_back(s.seconds * per_image);
  }
  r.predict_ms_per_image = median(pass_ms);
  for (const auto& [stage, values] : stage_ms) r.predict_stage_ms_per_image[stage] = median(values);
  r.images_per_second = 1000.0 / r.predict_ms_per_image;
  r.peak_rss_bytes = peak_rss_bytes();
  return r;
}

std::string format_bench(const BenchResult& r) {
  std::string out;
  char line[256];
  std::snprintf(line, sizeof line, "fit: %zu images, memory bank %lld patches, %.2f s (threads %d)\n", r.train_images,
                static_cast<long long>(r.memory_bank_size), r.fit_seconds, r.threads);
  out += line;
  for (const auto& [stage, s] : r.fit_stage_seconds) {
    std::snprintf(line, sizeof line, "  %-14s %10.2f s\n", stage.c_str(), s);
    out += line;
  }
  std::snprintf(line, sizeof line, "predict: %zu images, %.2f ms/image, %.1f images/s (median of %d passes)\n",
                r.test_images, r.predict_ms_per_image, r.images_per_second, r.repeat);
  out += line;
  for (const auto& [stage, ms] : r.predict_stage_ms_per_image) {
    std::snprintf(line, sizeof line, "  %-14s %10.2f ms/image\n", stage.c_str(), ms);
    out += line;
  }
  std::snprintf(line, sizeof line, "peak RSS: %.1f MiB\n", static_cast<double>(r.peak_rss_bytes) / (1024.0 * 1024.0));
  out += line;
  const std::string place = r.fit_report.scratch_directory.empty()
                                ? "held in memory during fit, beside the resident memory"
                                : "in a scratch file in " + r.fit_report.scratch_directory;
  std::snprintf(line, sizeof line, "training features: %.1f MiB, %s\n",
                static_cast<double>(r.fit_report.feature_bytes) / (1024.0 * 1024.0), place.c_str());
  return out + line;
}

std::string bench_json(const BenchResult& r) {
  const nlohmann::json j = {
      {"written_by", std::string("patchcore ") + version()},
      {"train_images", r.train_images},
      {"test_images", r.test_images},
      {"memory_bank_size", r.memory_bank_size},
      {"threads", r.threads},
      {"repeat", r.repeat},
      {"fit_seconds", r.fit_seconds},
      {"fit_stage_seconds", r.fit_stage_seconds},
      {"predict_ms_per_image", r.predict_ms_per_image},
      {"predict_stage_ms_per_image", r.predict_stage_ms_per_image},
      {"images_per_second", r.images_per_second},
      {"peak_rss_bytes", r.peak_rss_bytes},
      {"training_feature_bytes", r.fit_report.feature_bytes},
      {"training_features_scratch_directory", r.fit_report.scratch_directory},
  };
  return j.dump(2) + "\n";
}

}  // namespace patchcore

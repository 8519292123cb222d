#include "commands.h"

#include <ATen/ATen.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>

#include "patchcore/core/device.h"
#include "patchcore/core/file.h"
#include "patchcore/core/output_dir.h"
#include "patchcore/evaluation/calibration.h"
#include "patchcore/evaluation/evaluation.h"
#include "patchcore/evaluation/report.h"
#include "patchcore/io/dataset.h"
#include "patchcore/io/image_batches.h"
#include "patchcore/model_dir.h"
#include "patchcore/published_model.h"

namespace fs = std::filesystem;

namespace patchcore::cli {
namespace {

using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

// A bar on a terminal; on a pipe or log file, one line per tenth so logs stay readable. Always on stderr.
ProgressCallback progress_bar() {
  const bool tty = ::isatty(STDERR_FILENO);
  return
      [tty, last_tenth = -1, last_stage = std::string()](const std::string& stage, size_t done, size_t total) mutable {
        if (stage != last_stage) last_tenth = -1, last_stage = stage;
        const double fraction = total ? static_cast<double>(done) / static_cast<double>(total) : 1.0;
        if (tty) {
          const int width = 30, filled = static_cast<int>(fraction * width);
          std::fprintf(stderr, "\r%-28s [%s%s] %zu/%zu", stage.c_str(),
                       std::string(static_cast<size_t>(filled), '#').c_str(),
                       std::string(static_cast<size_t>(width - filled), '.').c_str(), done, total);
          if (done == total) std::fprintf(stderr, "\n");
        } else if (static_cast<int>(fraction * 10) > last_tenth) {
          last_tenth = static_cast<int>(fraction * 10);
          std::fprintf(stderr, "%s: %zu/%zu\n", stage.c_str(), done, total);
        }
      };
}

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> parts;
  std::stringstream in(s);
  for (std::string part; std::getline(in, part, ',');)
    if (!part.empty()) parts.push_back(part);
  return parts;
}

// A loaded, unfitted model as the fit options describe it.
std::unique_ptr<PatchCore> make_model(const ModelOptions& o, int threads) {
  PatchCoreParams params;
  params.layers_to_extract_from = split_commas(o.layers);
  params.pretrain_embed_dimension = params.target_embed_dimension = o.dim;
  params.patchsize = o.patchsize;
  params.anomaly_scorer_num_nn = o.k;
  params.transform.resize = o.resize;
  params.transform.crop = o.crop;
  params.transform.view = parse_view(o.view);
  params.transform.tile_overlap = o.tile_overlap;
  params.batchnorm_statistics = parse_batchnorm_statistics(o.batchnorm);
  const std::map<std::string, std::string> nn_kinds{
      {"exact", "ExactPrunedNN"}, {"flat", "FaissNN"}, {"approximate", "ApproximateFaissNN"}};
  std::shared_ptr<BaseSampler> sampler = make_sampler(o.sampler, o.coreset, o.seed, parse_device(o.device));
  if (!o.reference_randomness.empty()) use_reference_randomness(*sampler, o.reference_randomness);
  auto model = std::make_unique<PatchCore>(o.device);
  model->load(load_backbone(o.backbone, o.weights, params.layers_to_extract_from), params, sampler,
              make_nn_method(nn_kinds.at(o.nn), threads));
  if (!model->batchnorm_note().empty())
    spdlog::warn("keeping the checkpoint's BatchNorm statistics: {}", model->batchnorm_note());
  return model;
}

// A model directory of this build's, or one the published PatchCore saved, whose backbone weights come from
// `weights`.
PatchCoreEnsemble load_model(const std::string& model_dir, const std::string& weights, int threads) {
  PublishedModelOptions options;
  options.num_workers = threads;
  PatchCoreEnsemble model = load_model_directory(model_dir, weights, options);
  for (const auto& member : model.members())
    if (!member->batchnorm_note().empty())
      spdlog::warn("keeping the checkpoint's BatchNorm statistics: {}", member->batchnorm_note());
  return model;
}

// Image files from the inputs: files as given (a missing one is that image's failure, not the run's), directories'
// image files in sorted order.
std::vector<std::string> collect_images(const std::vector<std::string>& inputs) {
  std::vector<std::string> images;
  for (const auto& input : inputs) {
    if (!fs::is_directory(input)) {
      images.push_back(input);
      continue;
    }
    std::vector<std::string> found;
    for (const auto& entry : fs::directory_iterator(input))
      if (entry.is_regular_file() && is_image_file_name(entry.path().filename().string()))
        found.push_back(entry.path().string());
    if (found.empty()) throw std::runtime_error(input + ": no images in this directory");
    std::sort(found.begin(), found.end());
    images.insert(images.end(), found.begin(), found.end());
  }
  return images;
}

std::string message_of(const std::exception_ptr& error) {
  try {
    std::rethrow_exception(error);
  } catch (const std::exception& e) {
    return e.what();
  }
}

// What predict prints per image: a line on stdout (tab-separated image, score and, for a calibrated model,
// normalised score and OK/NG; or a JSON object), and for an image that failed, also one line on stderr.
class ResultLines {
 public:
  ResultLines(bool json, std::optional<Threshold> threshold) : json_(json), threshold_(std::move(threshold)) {}
  void scored(const std::string& image, float score, double ms) {
    if (json_) return print(prediction_json(image, score, threshold_, ms));
    std::string line = image + "\t" + std::to_string(score);
    if (threshold_)
      line +=
          "\t" + std::to_string(threshold_->normalize(score)) + "\t" + (threshold_->is_anomalous(score) ? "NG" : "OK");
    print(line);
  }
  void failed(const std::string& image, const std::string& error) {
    std::fprintf(stderr, "patchcore: %s\n", error.c_str());
    if (json_) print(nlohmann::json{{"image", image}, {"error", error}}.dump());
  }

 private:
  static void print(const std::string& line) {
    std::fputs((line + "\n").c_str(), stdout);
    std::fflush(stdout);
  }
  bool json_;
  std::optional<Threshold> threshold_;
};

// The calibration predict decides with: a single model's own (an ensemble's combined scores have no threshold).
Calibration calibration_of(const PatchCoreEnsemble& model) {
  return model.members().size() == 1 ? model.members().front()->calibration() : Calibration{};
}

// Scores `batch` and hands out each image's result; the writer starts with the first scored batch when the colour
// scale comes from it.
struct PredictRun {
  const PatchCoreEnsemble& model;
  std::optional<OutputDirectory> out;
  std::unique_ptr<PredictionWriter> writer;
  std::optional<ColourScale> scale;
  ResultLines lines;

  void failure(const std::string& image, const std::string& error) {
    lines.failed(image, error);
    if (writer) writer->add_failure(image, error);
    failures.emplace_back(image, error);
  }
  void start_writer(float fallback_vmax) {
    if (!scale) {
      scale = ColourScale{0.f, fallback_vmax > 0 ? fallback_vmax : 1.0f};
      spdlog::info(
          "the model records no scale of its scores: overlays are coloured up to {:.4g}, the highest map value of "
          "the first images (set one with --vmax)",
          scale->vmax);
    }
    writer = std::make_unique<PredictionWriter>(*out, model.params().transform, calibration_of(model), *scale);
    for (const auto& [image, error] : failures) writer->add_failure(image, error);
  }
  void scored(const std::vector<std::string>& images, const PredictResult& result, double ms_per_image) {
    if (out && !writer) {
      float highest = 0.f;
      for (const auto& m : result.masks) highest = std::max(highest, m.max().item<float>());
      start_writer(highest);
    }
    for (size_t i = 0; i < images.size(); ++i) {
      if (writer) writer->add(images[i], result.scores[i], result.masks[i]);
      lines.scored(images[i], result.scores[i], ms_per_image);
    }
  }
  // Every failure; those before the writer started are written when it starts.
  std::vector<std::pair<std::string, std::string>> failures;
};

}  // namespace

int fit(const ModelOptions& o, int threads) {
  const auto start = Clock::now();
  OutputDirectory::check(o.out, {o.data, o.weights, o.reference_randomness, o.fit.scratch_directory});
  const auto train = MVTecDataset::train(o.data);
  std::vector<std::string> paths;
  for (const auto& s : train) paths.push_back(s.image_path);
  const auto model = make_model(o, threads);
  spdlog::info("fitting on {} training images from {}", paths.size(), o.data);
  const FitReport report = model->fit(paths, o.fit, progress_bar());
  model->provenance().data = fs::absolute(o.data).lexically_normal().string();
  model->provenance().options = o.given;
  model->save_to_path(o.out);
  spdlog::info("model written to {}: memory bank of {} patches from {}, {:.1f} s", o.out, model->memory_bank_size(),
               report.patches, ms_since(start) / 1000.0);
  spdlog::info("the training features ({} MiB) waited for the coreset {}", report.feature_bytes >> 20,
               report.scratch_directory.empty() ? "in memory" : "in a scratch file in " + report.scratch_directory);
  return kExitSuccess;
}

int calibrate(const CalibrateOptions& o, int threads) {
  if (is_published_model(o.model))
    throw std::runtime_error(o.model +
                             ": a model the published PatchCore saved has no place for thresholds; fit one "
                             "with patchcore fit to calibrate it");
  // Labelled validation images where the folder has a test split; good images only otherwise.
  const bool labelled = fs::is_directory(fs::path(o.data) / "test");
  const std::vector<Sample> samples = labelled ? MVTecDataset::test(o.data) : MVTecDataset::train(o.data);
  const auto model = PatchCore::load_from_path(o.model, "cpu", threads);
  const std::string data = fs::absolute(o.data).lexically_normal().string();
  if (!model->provenance().data.empty() && !labelled && data == model->provenance().data)
    spdlog::warn(
        "calibrating on the images the model was fitted on: their scores are lower than new good images' "
        "will be, so the threshold is too; prefer good images the model has not seen");
  CalibrationOptions options;
  options.quantile = o.quantile;
  options.scoring.batch_size = o.batch_size;
  options.scoring.mask_rule = o.mask_rule == "reference" ? MaskRule::kReference : MaskRule::kHalf;
  spdlog::info("calibrating on {} {} images from {}", samples.size(), labelled ? "labelled" : "good", o.data);
  const Calibration c = patchcore::calibrate(*model, samples, data, options, progress_bar());
  write_model_calibration(o.model, c);
  for (const auto& [name, t] : {std::pair{"image", c.image}, std::pair{"pixel", c.pixel}}) {
    if (!t) continue;
    std::printf("%s_threshold %.6g (%s", name, t->value, to_string(t->method));
    if (t->method == Threshold::Method::kF1Max)
      std::printf(", F1 %.4f over %lld good and %lld defective images", t->f1, static_cast<long long>(t->good_images),
                  static_cast<long long>(t->defective_images));
    else
      std::printf(" %.4g of %lld good images' %s", t->quantile, static_cast<long long>(t->good_images),
                  std::string(name) == "image" ? "scores" : "highest map values");
    std::printf(")\n");
  }
  spdlog::info("thresholds written to {}", ModelDescription::path(o.model));
  return kExitSuccess;
}

int predict(const PredictOptions& o, int threads) {
  std::vector<std::string> inputs{o.model, o.weights};
  inputs.insert(inputs.end(), o.inputs.begin(), o.inputs.end());
  if (!o.out.empty()) OutputDirectory::check(o.out, inputs);
  const auto load_start = Clock::now();
  const PatchCoreEnsemble model = load_model(o.model, o.weights, threads);
  spdlog::info("model {} loaded in {:.0f} ms", o.model, ms_since(load_start));
  std::optional<ColourScale> scale;
  if (o.vmax > 0)
    scale = ColourScale{0.f, static_cast<float>(o.vmax)};
  else if (model.members().size() == 1)
    scale = model_colour_scale(*model.members().front());
  PredictRun run{model, std::nullopt, nullptr, scale, ResultLines(o.json || o.from_stdin, calibration_of(model).image)};
  if (!o.out.empty()) run.out.emplace(o.out, inputs);
  const ImageTransform& transform = model.params().transform;
  size_t images = 0;
  const auto start = Clock::now();
  if (o.from_stdin) {
    // A line per image, answered as soon as it is scored: a model that stays loaded for a production line.
    for (std::string line; std::getline(std::cin, line);) {
      const std::string path = line.substr(0, line.find_last_not_of(" \t\r") + 1);
      if (path.empty()) continue;
      ++images;
      const auto image_start = Clock::now();
      std::vector<at::Tensor> image;
      try {
        image.push_back(transform.load(path));
      } catch (const std::exception& e) {
        run.failure(path, e.what());
        continue;
      }
      const PredictResult result = model.predict(image);
      run.scored({path}, result, ms_since(image_start));
    }
  } else {
    const std::vector<std::string> paths = collect_images(o.inputs);
    images = paths.size();
    auto progress = progress_bar();
    ImageBatches batches(paths, transform, o.batch_size);
    for (ImageBatch batch; batches.next(batch);) {
      for (const auto& [index, error] : batch.failures) run.failure(paths[index], message_of(error));
      if (batch.indices.empty()) continue;
      const auto batch_start = Clock::now();
      const PredictResult result = model.predict(batch.images);
      std::vector<std::string> scored;
      for (size_t index : batch.indices) scored.push_back(paths[index]);
      run.scored(scored, result, ms_since(batch_start) / static_cast<double>(scored.size()));
      progress("predicting", batches.done(), paths.size());
    }
  }
  const double ms = images ? ms_since(start) / static_cast<double>(images) : 0.0;
  if (run.out && !run.writer) run.start_writer(1.0f);  // nothing scored: the failures still get their rows
  if (run.writer) run.writer->finish(ms, o.model);
  const size_t failed = run.failures.size();
  spdlog::info("{} images, {} failed, {:.1f} ms per image{}", images, failed, ms,
               o.out.empty() ? std::string() : "; results in " + o.out);
  return failed ? kExitSomeImagesFailed : kExitSuccess;
}

int evaluate(const EvaluateOptions& o, int threads) {
  const std::vector<std::string> inputs{o.model, o.weights, o.data};
  if (!o.out.empty()) OutputDirectory::check(o.out, inputs);
  if (!o.json_path.empty()) OutputDirectory::check_file(o.json_path, inputs);
  const auto test = MVTecDataset::test(o.data);
  require_both_classes(test, (fs::path(o.data) / "test").string());
  const PatchCoreEnsemble model = load_model(o.model, o.weights, threads);
  std::vector<const PatchCore*> members;
  for (const auto& member : model.members()) members.push_back(member.get());
  EvaluationOptions options;
  options.batch_size = o.batch_size;
  options.mask_rule = o.mask_rule == "reference" ? MaskRule::kReference : MaskRule::kHalf;
  options.coordinates = o.coordinates == "original" ? MapCoordinates::kOriginal : MapCoordinates::kView;
  const EvaluationResult r = patchcore::evaluate(members, test, options, progress_bar());
  const std::string metrics = evaluation_metrics_json(r, o.model, o.data, o.mask_rule);
  if (!o.out.empty()) write_evaluation_report(o.out, members, r, metrics, progress_bar());
  if (!o.json_path.empty()) write_file_atomically(o.json_path, metrics);
  std::printf("image_auroc %.4f\nimage_aupr %.4f\nimage_f1_max %.4f\n", r.image.auroc, r.image.aupr, r.image.f1_max.f1);
  if (r.pixel_metrics)
    std::printf("pixel_auroc %.4f\npixel_auroc_defective %.4f\npixel_aupr %.4f\npixel_f1_max %.4f\naupro %.4f\n",
                r.pixel.auroc, r.pixel_auroc_defective, r.pixel.aupr, r.pixel.f1_max.f1, r.pro.aupro);
  else
    std::printf("pixel metrics: none (%s)\n", r.pixel_note.c_str());
  if (r.image_confusion)
    std::printf("at the model's threshold %.4g: %lld of %lld defective images NG, %lld of %lld good images NG\n",
                r.image_confusion->threshold, static_cast<long long>(r.image_confusion->true_positives),
                static_cast<long long>(r.image_confusion->true_positives + r.image_confusion->false_negatives),
                static_cast<long long>(r.image_confusion->false_positives),
                static_cast<long long>(r.image_confusion->false_positives + r.image_confusion->true_negatives));
  std::printf("images %zu\nms_per_image %.1f\n", r.images.size(), r.ms_per_image);
  return kExitSuccess;
}

int bench(const ModelOptions& o, const BenchOptions& options, const std::string& json_path, int threads) {
  if (!json_path.empty()) OutputDirectory::check_file(json_path, {o.data, o.weights});
  const auto model = make_model(o, threads);
  const BenchResult r = patchcore::bench(*model, o.data, options, progress_bar());
  std::printf("%s", format_bench(r).c_str());
  if (!json_path.empty()) write_file_atomically(json_path, bench_json(r));
  return kExitSuccess;
}

int serve(serve::ServiceOptions options, int threads) {
  options.threads = threads;
  serve::serve(options);
  return kExitSuccess;
}

}  // namespace patchcore::cli

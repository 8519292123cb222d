// patchcore: fit, predict and evaluate from the command line. A thin layer over the library.
#include <unistd.h>

#include <spdlog/spdlog.h>
#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <sstream>
#include <thread>

#include "patchcore/bench.h"
#include "patchcore/core/device.h"
#include "patchcore/core/file.h"
#include "patchcore/core/parallel.h"
#include "patchcore/evaluation/evaluation.h"
#include "patchcore/evaluation/report.h"
#include "patchcore/io/dataset.h"
#include "patchcore/io/image_batches.h"
#include "patchcore/io/npy.h"
#include "patchcore/patchcore.h"
#include "patchcore/published_model.h"

namespace fs = std::filesystem;
using namespace patchcore;

namespace {

// A bar on a terminal; on a pipe or log file, one line per tenth so logs stay readable.
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

struct ModelOptions {
  std::string data, weights, out, backbone = "resnet18", layers = "layer2,layer3", sampler = "approx_greedy";
  std::string device = "cpu", nn = "exact", batchnorm = "reference_update", reference_randomness;
  double coreset = 0.1;
  int64_t k = 1, patchsize = 3, dim = 1024;
  int resize = 256, crop = 224;
  uint64_t seed = 0;
  FitOptions fit;
};

// A loaded, unfitted model as the fit options describe it.
std::unique_ptr<PatchCore> make_model(const ModelOptions& o, int threads) {
  PatchCoreParams params;
  params.layers_to_extract_from = split_commas(o.layers);
  params.pretrain_embed_dimension = params.target_embed_dimension = o.dim;
  params.patchsize = o.patchsize;
  params.anomaly_scorer_num_nn = o.k;
  params.transform.resize = o.resize;
  params.transform.crop = o.crop;
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

int run_fit(const ModelOptions& o, int threads) {
  const auto start = std::chrono::steady_clock::now();
  const auto train = MVTecDataset::train(o.data);
  std::vector<std::string> paths;
  for (const auto& s : train) paths.push_back(s.image_path);
  const auto model = make_model(o, threads);
  spdlog::info("fitting on {} training images from {}", paths.size(), o.data);
  model->fit(paths, o.fit, progress_bar());
  model->save_to_path(o.out);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  spdlog::info("model written to {}: memory bank of {} patches, {:.1f} s", o.out, model->memory_bank_size(), seconds);
  return 0;
}

int run_bench(const ModelOptions& o, const BenchOptions& options, const std::string& json_path, int threads) {
  const auto model = make_model(o, threads);
  const BenchResult r = bench(*model, o.data, options, progress_bar());
  std::printf("%s", format_bench(r).c_str());
  if (!json_path.empty()) write_file_atomically(json_path, bench_json(r));
  return 0;
}

std::vector<std::string> collect_images(const std::vector<std::string>& inputs) {
  std::vector<std::string> images;
  for (const auto& input : inputs) {
    if (fs::is_directory(input)) {
      std::vector<std::string> found;
      for (const auto& entry : fs::directory_iterator(input))
        if (entry.is_regular_file() && is_image_file_name(entry.path().filename().string()))
          found.push_back(entry.path().string());
      if (found.empty()) throw std::runtime_error(input + ": no images in this directory");
      std::sort(found.begin(), found.end());
      images.insert(images.end(), found.begin(), found.end());
    } else if (fs::is_regular_file(input)) {
      images.push_back(input);
    } else {
      throw std::runtime_error(input + ": no such file or directory");
    }
  }
  return images;
}

// A model directory of this build's, or one the published PatchCore saved, whose backbone weights come from `weights`.
PatchCoreEnsemble load_model(const std::string& model_dir, const std::string& weights, int threads) {
  PublishedModelOptions options;
  options.num_workers = threads;
  PatchCoreEnsemble model = load_model_directory(model_dir, weights, options);
  for (const auto& member : model.members())
    if (!member->batchnorm_note().empty())
      spdlog::warn("keeping the checkpoint's BatchNorm statistics: {}", member->batchnorm_note());
  return model;
}

int run_predict(const std::string& model_dir, const std::string& weights, const std::vector<std::string>& inputs,
                const std::string& out, double vmax, int64_t batch_size, int threads) {
  const PatchCoreEnsemble model = load_model(model_dir, weights, threads);
  const auto paths = collect_images(inputs);
  const auto& transform = model.params().transform;
  std::vector<PredictedImage> images;
  auto progress = progress_bar();
  const auto start = std::chrono::steady_clock::now();
  ImageBatches batches(paths, transform, batch_size);
  for (at::Tensor batch; batches.next(batch);) {
    const auto result = model.predict(batch);
    for (size_t i = 0; i < result.scores.size(); ++i)
      images.push_back({paths[images.size()], result.scores[i], to_mat(result.masks[i])});
    progress("predicting", batches.done(), paths.size());
  }
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count() /
                    static_cast<double>(paths.size());
  write_prediction_report(out, transform, images, static_cast<float>(vmax), ms, model_dir);
  for (const auto& image : images) std::printf("%s\t%.6f\n", image.image_path.c_str(), image.score);
  spdlog::info("{} images, {:.1f} ms per image; results in {}", images.size(), ms, out);
  return 0;
}

int run_evaluate(const std::string& model_dir, const std::string& weights, const std::string& data,
                 const std::string& out, const std::string& json_path, const std::string& mask_rule, int64_t batch_size,
                 int threads) {
  const PatchCoreEnsemble model = load_model(model_dir, weights, threads);
  std::vector<const PatchCore*> members;
  for (const auto& member : model.members()) members.push_back(member.get());
  const auto test = MVTecDataset::test(data);
  EvaluationOptions options;
  options.batch_size = batch_size;
  options.mask_rule = mask_rule == "reference" ? MaskRule::kReference : MaskRule::kHalf;
  const EvaluationResult r = evaluate(members, test, options, progress_bar());
  const std::string metrics = evaluation_metrics_json(r, model_dir, data, mask_rule);
  if (!out.empty()) write_evaluation_report(out, model.params().transform, r, metrics, progress_bar());
  if (!json_path.empty()) write_file_atomically(json_path, metrics);
  std::printf(
      "image_auroc %.4f\npixel_auroc %.4f\npixel_auroc_defective %.4f\naupro %.4f\nimages %zu\nms_per_image %.1f\n",
      r.image_auroc, r.pixel_auroc, r.pixel_auroc_defective, r.aupro, r.images.size(), r.ms_per_image);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"patchcore: PatchCore anomaly detection (Roth et al., CVPR 2022) on the CPU"};
  app.require_subcommand(1);
  int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  app.add_option("--threads", threads, "threads for torch, OpenMP and FAISS")->check(CLI::Range(1, 1024));

  // The model options, shared by fit and bench.
  auto add_model_options = [](CLI::App* cmd, ModelOptions& o) {
    cmd->add_option("--data", o.data, "data set root with train/good")->required()->check(CLI::ExistingDirectory);
    cmd->add_option("--weights", o.weights,
                    "torchvision .pth checkpoint (or TorchScript file with --backbone torchscript)")
        ->required()
        ->check(CLI::ExistingFile);
    cmd->add_option("--backbone", o.backbone, "resnet18, wide_resnet50_2, ... or torchscript")->capture_default_str();
    cmd->add_option("--layers", o.layers, "comma-separated layers to extract from")->capture_default_str();
    cmd->add_option("--sampler", o.sampler, "coreset sampler")
        ->capture_default_str()
        ->check(CLI::IsMember({"approx_greedy", "greedy", "random", "identity"}));
    cmd->add_option("--coreset", o.coreset, "fraction of patches kept in the memory bank, in (0, 1)")
        ->capture_default_str()
        ->check(CLI::Range(0.0, 1.0));
    cmd->add_option("--k", o.k, "nearest neighbours averaged per patch score")
        ->capture_default_str()
        ->check(CLI::PositiveNumber);
    cmd->add_option("--patchsize", o.patchsize, "patch neighbourhood size")
        ->capture_default_str()
        ->check(CLI::PositiveNumber);
    cmd->add_option("--dim", o.dim, "embedding dimension (pretrain and target)")
        ->capture_default_str()
        ->check(CLI::PositiveNumber);
    cmd->add_option("--resize", o.resize, "shorter side after resizing")
        ->capture_default_str()
        ->check(CLI::Range(1, ImageTransform::kMaxSide));
    cmd->add_option("--crop", o.crop, "center crop size")
        ->capture_default_str()
        ->check(CLI::Range(1, ImageTransform::kMaxSide));
    cmd->add_option("--seed", o.seed, "sampler seed")->capture_default_str();
    cmd->add_option("--batch-size", o.fit.batch_size, "images per forward pass")
        ->capture_default_str()
        ->check(CLI::PositiveNumber);
    cmd->add_option("--memory-budget", o.fit.memory_budget_bytes,
                    "most resident memory fit may use, e.g. 2GiB (fit refuses at once what would not fit; 0: no limit)")
        ->transform(CLI::AsSizeValue(true))
        ->check(CLI::NonNegativeNumber);
    cmd->add_option(
           "--scratch-dir", o.fit.scratch_directory,
           "where the training features wait for the coreset, 4 bytes per value (default: the temporary directory)")
        ->check(CLI::ExistingDirectory);
    cmd->add_option("--reference-randomness", o.reference_randomness,
                    "the published code's coreset randomness from its oracle's --dump .npz (arrays projection and "
                    "start_points), so that the coreset selects the published code's rows")
        ->check(CLI::ExistingFile);
    cmd->add_option("--batchnorm", o.batchnorm,
                    "reference_update: move the BatchNorm statistics once as the published PatchCore.load does, "
                    "which its numbers rest on; checkpoint: keep the checkpoint's, for plain eval-mode features")
        ->capture_default_str()
        ->check(CLI::IsMember({"reference_update", "checkpoint"}));
    cmd->add_option("--nn", o.nn,
                    "exact (ExactPrunedNN: brute force's neighbours, pruned), flat (FaissNN: the reference's brute "
                    "force) or approximate (ApproximateFaissNN, IVF-PQ)")
        ->capture_default_str()
        ->check(CLI::IsMember({"exact", "flat", "approximate"}));
    cmd->add_option("--device", o.device, "cpu or cuda[:N]")->capture_default_str();
  };
  ModelOptions fit, bench_model;
  auto* fit_cmd = app.add_subcommand("fit", "fit a model on the good training images of an MVTec-layout folder");
  add_model_options(fit_cmd, fit);
  fit_cmd->add_option("--out", fit.out, "model directory to write")->required();

  std::string model_dir, out, json_path, data, mask_rule = "half";
  std::vector<std::string> inputs;
  double vmax = 0;
  int64_t batch_size = 2;
  auto* predict_cmd = app.add_subcommand("predict", "score images and write heatmaps");
  std::string model_weights;
  const char* model_help = "model directory from fit, or one the published PatchCore saved (then with --weights)";
  const char* weights_help = "the backbone's weights, for a model the published PatchCore saved";
  predict_cmd->add_option("--model", model_dir, model_help)->required()->check(CLI::ExistingDirectory);
  predict_cmd->add_option("--weights", model_weights, weights_help)->check(CLI::ExistingFile);
  predict_cmd->add_option("inputs", inputs, "images or directories of images")->required();
  predict_cmd->add_option("--out", out, "output directory")->required();
  predict_cmd->add_option("--vmax", vmax, "score shown as full red in overlays (default: the highest in this run)");
  predict_cmd->add_option("--batch-size", batch_size, "images per forward pass")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);

  auto* evaluate_cmd = app.add_subcommand("evaluate", "MVTec-style metrics on the test split of a data set");
  evaluate_cmd->add_option("--model", model_dir, model_help)->required()->check(CLI::ExistingDirectory);
  evaluate_cmd->add_option("--weights", model_weights, weights_help)->check(CLI::ExistingFile);
  evaluate_cmd->add_option("--data", data, "data set root with test/ and ground_truth/")
      ->required()
      ->check(CLI::ExistingDirectory);
  evaluate_cmd->add_option("--out", out, "report directory: scores.csv, overlays, ROC plots");
  evaluate_cmd->add_option("--json", json_path, "write the metrics as JSON to this file");
  evaluate_cmd
      ->add_option("--mask-rule", mask_rule, "half: resampled mask >= 0.5; reference: == 255 as the Python code")
      ->capture_default_str()
      ->check(CLI::IsMember({"half", "reference"}));
  evaluate_cmd->add_option("--batch-size", batch_size, "images per forward pass")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);

  BenchOptions bench_options;
  auto* bench_cmd =
      app.add_subcommand("bench", "fit on train/good, predict the test split, and report time per stage and memory");
  add_model_options(bench_cmd, bench_model);
  bench_cmd->add_option("--repeat", bench_options.repeat, "predict passes over the test split (figures are medians)")
      ->capture_default_str()
      ->check(CLI::Range(1, 1000));
  bench_cmd->add_option("--json", json_path, "also write the figures as JSON to this file");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    for (const ModelOptions* o : {&fit, &bench_model})
      if (o->sampler != "identity" && !(o->coreset > 0 && o->coreset < 1))
        throw std::invalid_argument("--coreset must be strictly between 0 and 1, got " + std::to_string(o->coreset));
    set_num_threads(threads);
    if (fit_cmd->parsed()) return run_fit(fit, threads);
    if (bench_cmd->parsed()) {
      bench_options.fit = bench_model.fit;
      return run_bench(bench_model, bench_options, json_path, threads);
    }
    if (predict_cmd->parsed()) return run_predict(model_dir, model_weights, inputs, out, vmax, batch_size, threads);
    return run_evaluate(model_dir, model_weights, data, out, json_path, mask_rule, batch_size, threads);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "patchcore: error: %s\n", e.what());
    return 1;
  }
}

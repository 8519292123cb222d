// patchcore: fit, predict, evaluate, bench and serve from the command line. This file only parses the options and
// dispatches; the commands are in commands.cpp.
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <malloc.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <thread>

#include "commands.h"
#include "patchcore/core/parallel.h"
#include "patchcore/io/image.h"

using namespace patchcore;
using namespace patchcore::cli;

namespace {

constexpr const char* kExitStatus =
    "Exit status: 0 success; 1 error (one line on stderr names the file or option); 2 usage error; 3 predict "
    "scored some images but not all (the others have error rows in scores.csv and a line on stderr).";

// Every option the user gave, by its long name, for the model's provenance.
std::vector<std::pair<std::string, std::string>> given_options(const CLI::App& command) {
  std::vector<std::pair<std::string, std::string>> given;
  for (const CLI::Option* option : command.get_options())
    if (option->count() > 0 && !option->get_lnames().empty())
      given.emplace_back(option->get_lnames().front(), option->as<std::string>());
  return given;
}

// Every batch allocates and frees tensors of a few to tens of MB, and fit some of up to 80 MB (the bank, the coreset's
// summary). With glibc's defaults the larger ones are mapped afresh or handed back to the system each time, and
// faulting their pages in again is expensive on virtual machines: fit on magnetic_tile spends 1.2 s of system time
// more (docs/performance.md). Keeping freed memory for reuse costs no peak memory in a command that runs once, as the
// largest batch's tensors are in use at once anyway.
void keep_freed_memory() {
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  mallopt(M_TOP_PAD, 64 << 20);
}

// The service runs for months, and what a reload frees must go back to the system: it keeps glibc's thresholds, and
// trims once a replaced model is freed (ModelRegistry). malloc_trim cannot shrink the top of a thread's own arena,
// though, and with an arena per busy thread each keeps up to 64 MiB of freed forward-pass buffers resident: on tire,
// 240-500 MiB at rest after reloads against 200 MiB after loading. In one arena it stays within 25 MiB of that
// (docs/service.md).
void one_arena() { mallopt(M_ARENA_MAX, 1); }

}  // namespace

int main(int argc, char** argv) {
  // stdout carries results only; logs and progress go to stderr.
  spdlog::set_default_logger(spdlog::stderr_color_mt("patchcore"));
  spdlog::set_pattern("%^[%l]%$ %v");

  CLI::App app{"patchcore: PatchCore anomaly detection (Roth et al., CVPR 2022) on the CPU"};
  app.require_subcommand(1);
  app.fallthrough();  // global options after the subcommand too
  app.footer(kExitStatus);
  app.set_version_flag("--version", std::string("patchcore ") + version());
  int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  app.add_option("--threads", threads, "threads for torch, OpenMP and FAISS (default: every core)")
      ->check(CLI::Range(1, 1024));

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
    cmd->add_option("--view", o.view,
                    "what the model sees: crop (the published resize and centre crop), full (the whole frame, "
                    "shorter side resized to --resize) or tiles (the whole frame at its own resolution, in --crop "
                    "tiles whose maps are stitched)")
        ->capture_default_str()
        ->check(CLI::IsMember({"crop", "full", "tiles"}));
    cmd->add_option("--resize", o.resize, "shorter side after resizing (crop and full views)")
        ->capture_default_str()
        ->check(CLI::Range(1, ImageTransform::kMaxSide));
    cmd->add_option("--crop", o.crop, "center crop size (crop view), tile side (tiles view)")
        ->capture_default_str()
        ->check(CLI::Range(1, ImageTransform::kMaxSide));
    cmd->add_option("--tile-overlap", o.tile_overlap, "least overlap of neighbouring tiles, in pixels (tiles view)")
        ->capture_default_str()
        ->check(CLI::NonNegativeNumber);
    cmd->add_option("--seed", o.seed, "sampler seed")->capture_default_str();
    cmd->add_option("--batch-size", o.fit.batch_size, "images per forward pass")
        ->capture_default_str()
        ->check(CLI::PositiveNumber);
    cmd->add_option("--memory-budget", o.fit.memory_budget_bytes,
                    "most resident memory fit may use, e.g. 2GiB (fit refuses at once what would not fit; 0: no limit)")
        ->transform(CLI::AsSizeValue(true))
        ->check(CLI::NonNegativeNumber);
    cmd->add_option("--scratch-dir", o.fit.scratch_directory,
                    "a directory where the training features wait for the coreset, 4 bytes per value (default: in "
                    "memory where they fit, else the temporary directory)")
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
  ModelOptions fit_options, bench_model;
  auto* fit_cmd = app.add_subcommand("fit", "fit a model on the good training images of an MVTec-layout folder");
  add_model_options(fit_cmd, fit_options);
  fit_cmd->add_option("--out", fit_options.out, "model directory to write: new, empty, or one fit wrote")->required();

  const char* model_help = "model directory from fit, or one the published PatchCore saved (then with --weights)";
  const char* weights_help = "the backbone's weights, for a model the published PatchCore saved";
  PredictOptions predict_options;
  auto* predict_cmd = app.add_subcommand("predict", "score images and write heatmaps, image by image");
  predict_cmd->add_option("--model", predict_options.model, model_help)->required()->check(CLI::ExistingDirectory);
  predict_cmd->add_option("--weights", predict_options.weights, weights_help)->check(CLI::ExistingFile);
  predict_cmd->add_option("inputs", predict_options.inputs, "images or directories of images");
  predict_cmd->add_flag("--stdin", predict_options.from_stdin,
                        "read image paths from standard input, one per line, and answer each with a JSON line as soon "
                        "as it is scored: the model stays loaded");
  predict_cmd->add_flag("--json", predict_options.json,
                        "JSON lines on stdout instead of tab-separated image and score");
  predict_cmd->add_option("--out", predict_options.out,
                          "directory for overlays, maps and scores.csv: new, empty, or one predict wrote");
  predict_cmd->add_option("--vmax", predict_options.vmax,
                          "score shown as full red in overlays, from 0 (default: the model's: its calibrated pixel "
                          "threshold in the middle of the scale, or twice its training patches' highest score)");
  predict_cmd->add_option("--batch-size", predict_options.batch_size, "images per forward pass")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);

  CalibrateOptions calibrate_options;
  auto* calibrate_cmd = app.add_subcommand(
      "calibrate", "store decision thresholds in a model: F1-optimal from labelled images, or a quantile of good ones");
  calibrate_cmd->add_option("--model", calibrate_options.model, "model directory from fit; its thresholds are replaced")
      ->required()
      ->check(CLI::ExistingDirectory);
  calibrate_cmd
      ->add_option("--data", calibrate_options.data,
                   "validation folder in the MVTec layout: test/<defect> (labelled) or, without test/, train/good "
                   "(good images only; use images the model was not fitted on)")
      ->required()
      ->check(CLI::ExistingDirectory);
  calibrate_cmd
      ->add_option("--quantile", calibrate_options.quantile,
                   "for good images only: the quantile of their scores taken as the threshold")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1.0));
  calibrate_cmd
      ->add_option("--mask-rule", calibrate_options.mask_rule,
                   "half: resampled mask >= 0.5; reference: == 255 as the Python code")
      ->capture_default_str()
      ->check(CLI::IsMember({"half", "reference"}));
  calibrate_cmd->add_option("--batch-size", calibrate_options.batch_size, "images per forward pass")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);

  EvaluateOptions evaluate_options;
  auto* evaluate_cmd = app.add_subcommand("evaluate", "MVTec-style metrics on the test split of a data set");
  evaluate_cmd->add_option("--model", evaluate_options.model, model_help)->required()->check(CLI::ExistingDirectory);
  evaluate_cmd->add_option("--weights", evaluate_options.weights, weights_help)->check(CLI::ExistingFile);
  evaluate_cmd
      ->add_option("--data", evaluate_options.data, "data set root with test/ and, for pixel metrics, ground_truth/")
      ->required()
      ->check(CLI::ExistingDirectory);
  evaluate_cmd->add_option("--out", evaluate_options.out,
                           "report directory (scores.csv, overlays, ROC plots): new, empty, or one evaluate wrote");
  evaluate_cmd->add_option("--json", evaluate_options.json_path, "write the metrics as JSON to this new file");
  evaluate_cmd
      ->add_option("--mask-rule", evaluate_options.mask_rule,
                   "half: resampled mask >= 0.5; reference: == 255 as the Python code")
      ->capture_default_str()
      ->check(CLI::IsMember({"half", "reference"}));
  evaluate_cmd
      ->add_option("--coordinates", evaluate_options.coordinates,
                   "where pixel metrics count: view (the model's view, as the published evaluation) or original "
                   "(every pixel of the original images and masks; pixels outside the view score lowest)")
      ->capture_default_str()
      ->check(CLI::IsMember({"view", "original"}));
  evaluate_cmd->add_option("--batch-size", evaluate_options.batch_size, "images per forward pass")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);

  BenchOptions bench_options;
  std::string bench_json_path;
  auto* bench_cmd =
      app.add_subcommand("bench", "fit on train/good, predict the test split, and report time per stage and memory");
  add_model_options(bench_cmd, bench_model);
  bench_cmd->add_option("--repeat", bench_options.repeat, "predict passes over the test split (figures are medians)")
      ->capture_default_str()
      ->check(CLI::Range(1, 1000));
  bench_cmd->add_option("--json", bench_json_path, "also write the figures as JSON to this new file");

  serve::ServiceOptions serve_options;
  auto* serve_cmd = app.add_subcommand(
      "serve", "answer predictions over HTTP with every model under a folder loaded once (docs/service.md)");
  serve_cmd
      ->add_option("--models", serve_options.models,
                   "folder of model directories from fit, each served under its folder name")
      ->required()
      ->check(CLI::ExistingDirectory);
  serve_cmd->add_option("--host", serve_options.host, "address to listen on")->capture_default_str();
  serve_cmd->add_option("--port", serve_options.port, "TCP port")->capture_default_str()->check(CLI::Range(0, 65535));
  serve_cmd
      ->add_option("--workers", serve_options.queue.workers,
                   "threads running forward passes, each with --threads threads (workers x threads <= cores)")
      ->capture_default_str()
      ->check(CLI::Range(1, 256));
  serve_cmd->add_option("--max-batch", serve_options.queue.max_batch, "waiting images of one model per forward pass")
      ->capture_default_str()
      ->check(CLI::Range(1, 256));
  serve_cmd->add_option("--queue", serve_options.queue.capacity, "images waiting at most; beyond, 503 and Retry-After")
      ->capture_default_str()
      ->check(CLI::Range(1, 100000));
  serve_cmd->add_option("--max-body", serve_options.max_body_bytes, "largest request body, e.g. 16MiB; beyond, 413")
      ->capture_default_str()
      ->transform(CLI::AsSizeValue(true));
  serve_cmd
      ->add_option("--max-pixels", serve_options.limits.max_pixels, "largest decoded image, in pixels; beyond, 400")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  serve_cmd
      ->add_option("--timeout", serve_options.timeout_seconds,
                   "seconds a request may take; a request not scored by then gets 503 and costs nothing more")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  serve_cmd->add_option("--http-threads", serve_options.http_threads, "connections served at once")
      ->capture_default_str()
      ->check(CLI::Range(1, 1024));

  if (argc == 1) {
    std::fputs(app.help().c_str(), stderr);
    return kExitUsage;
  }
  try {
    app.parse(argc, argv);
    if (predict_cmd->parsed() && predict_options.from_stdin == !predict_options.inputs.empty())
      throw CLI::ValidationError("predict", "give images or directories, or --stdin, not both");
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? kExitSuccess : kExitUsage;
  }
  try {
    for (const ModelOptions* o : {&fit_options, &bench_model})
      if (o->sampler != "identity" && !(o->coreset > 0 && o->coreset < 1))
        throw std::invalid_argument("--coreset must be strictly between 0 and 1, got " + std::to_string(o->coreset));
    set_num_threads(threads);
    if (serve_cmd->parsed())
      one_arena();
    else
      keep_freed_memory();
    if (fit_cmd->parsed()) {
      fit_options.given = given_options(*fit_cmd);
      return fit(fit_options, threads);
    }
    if (bench_cmd->parsed()) {
      bench_options.fit = bench_model.fit;
      return bench(bench_model, bench_options, bench_json_path, threads);
    }
    if (predict_cmd->parsed()) return predict(predict_options, threads);
    if (calibrate_cmd->parsed()) return calibrate(calibrate_options, threads);
    if (serve_cmd->parsed()) return cli::serve(serve_options, threads);
    return evaluate(evaluate_options, threads);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "patchcore: error: %s\n", e.what());
    return kExitError;
  }
}

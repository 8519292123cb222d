#pragma once
// The commands of the patchcore tool, each a thin layer over the library: main.cpp parses the options into these
// structures and calls one function. Each returns the process's exit status (kExit*); errors throw.
#include <string>
#include <vector>

#include "patchcore/bench.h"
#include "patchcore/patchcore.h"
#include "patchcore/serve/service.h"

namespace patchcore::cli {

constexpr int kExitSuccess = 0;
constexpr int kExitError = 1;
constexpr int kExitUsage = 2;
constexpr int kExitSomeImagesFailed = 3;

struct ModelOptions {
  std::string data, weights, out, backbone = "resnet18", layers = "layer2,layer3", sampler = "approx_greedy";
  std::string device = "cpu", nn = "exact", batchnorm = "reference_update", reference_randomness;
  double coreset = 0.1;
  int64_t k = 1, patchsize = 3, dim = 1024;
  int resize = 256, crop = 224, tile_overlap = 32;
  std::string view = "crop";
  uint64_t seed = 0;
  FitOptions fit;
  // The options as given on the command line, for the model's provenance.
  std::vector<std::pair<std::string, std::string>> given;
};

struct PredictOptions {
  std::string model, weights, out;
  std::vector<std::string> inputs;
  bool from_stdin = false;  // image paths from standard input, a JSON line answered per image
  bool json = false;        // JSON lines on stdout instead of tab-separated ones
  double vmax = 0;          // top of the overlays' colour scale (from 0); 0: the model's
  int64_t batch_size = 2;
};

struct EvaluateOptions {
  std::string model, weights, data, out, json_path, mask_rule = "half", coordinates = "view";
  int64_t batch_size = 2;
};

struct CalibrateOptions {
  std::string model, data, mask_rule = "half";
  double quantile = 0.995;
  int64_t batch_size = 2;
};

int fit(const ModelOptions& options, int threads);
int calibrate(const CalibrateOptions& options, int threads);
int predict(const PredictOptions& options, int threads);
int evaluate(const EvaluateOptions& options, int threads);
int bench(const ModelOptions& model, const BenchOptions& options, const std::string& json_path, int threads);
int serve(serve::ServiceOptions options, int threads);

}  // namespace patchcore::cli

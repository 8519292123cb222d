#include "patchcore/patchcore.h"

#include <zlib.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "patchcore/core/file.h"
#include "patchcore/io/image_batches.h"
#include "patchcore/memory_bank/feature_store.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace patchcore {
namespace {

constexpr const char* kFormat = "patchcore-model";
constexpr int kFormatVersion = 1;
constexpr const char* kParamsFile = "patchcore_params.json";

struct FileDigest {
  uint64_t bytes = 0;
  uint32_t crc32 = 0;
};

FileDigest digest(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open file");
  FileDigest d;
  uLong crc = crc32(0L, Z_NULL, 0);
  std::vector<char> buffer(1 << 20);
  while (in) {
    in.read(buffer.data(), static_cast<std::streamsize>(buffer.size()));
    const auto n = in.gcount();
    crc = crc32(crc, reinterpret_cast<const Bytef*>(buffer.data()), static_cast<uInt>(n));
    d.bytes += static_cast<uint64_t>(n);
  }
  if (in.bad()) throw std::runtime_error(path + ": read error");
  d.crc32 = static_cast<uint32_t>(crc);
  return d;
}

void check_range(const std::string& what, int64_t value, int64_t low, int64_t high) {
  if (value < low || value > high)
    throw std::invalid_argument(what + " must be in [" + std::to_string(low) + ", " + std::to_string(high) + "], got " +
                                std::to_string(value));
}

void check_params(const PatchCoreParams& p) {
  if (p.layers_to_extract_from.empty()) throw std::invalid_argument("PatchCore: no layers to extract from");
  check_range("PatchCore: pretrain_embed_dimension", p.pretrain_embed_dimension, 1,
              PatchCoreParams::kMaxEmbedDimension);
  check_range("PatchCore: target_embed_dimension", p.target_embed_dimension, 1, PatchCoreParams::kMaxEmbedDimension);
  check_range("PatchCore: patchsize", p.patchsize, 1, PatchCoreParams::kMaxPatchsize);
  check_range("PatchCore: patchstride", p.patchstride, 1, PatchCoreParams::kMaxPatchsize);
  check_range("PatchCore: k (anomaly_scorer_num_nn)", p.anomaly_scorer_num_nn, 1,
              PatchCoreParams::kMaxNearestNeighbours);
  p.transform.validate();
}

// An integer of the model description, range-checked before it is narrowed or used for a size. Floats
// are refused rather than converted: converting one beyond int64's range is undefined behaviour.
int64_t bounded(const json& value, const std::string& key, int64_t low, int64_t high) {
  // nlohmann keeps integers above INT64_MAX as unsigned; read as int64 they would wrap to negatives.
  if (!value.is_number_integer() || (value.is_number_unsigned() && value.get<uint64_t>() > static_cast<uint64_t>(high)))
    throw std::invalid_argument(key + " must be an integer in [" + std::to_string(low) + ", " + std::to_string(high) +
                                "], got " + value.dump());
  check_range(key, value.get<int64_t>(), low, high);
  return value.get<int64_t>();
}

}  // namespace

PatchCore::PatchCore(const std::string& device) : device_(device) { parse_device(device); }

void PatchCore::load(std::shared_ptr<Backbone> backbone, const PatchCoreParams& params,
                     std::shared_ptr<BaseSampler> featuresampler, std::shared_ptr<NearestNeighbourSearch> nn_method) {
  check_params(params);
  if (!featuresampler) throw std::invalid_argument("PatchCore: featuresampler is null");
  params_ = params;
  feature_aggregator_ =
      std::make_unique<NetworkFeatureAggregator>(std::move(backbone), params.layers_to_extract_from, device_);
  const auto feature_dimensions = feature_aggregator_->feature_dimensions(params.input_shape());
  patch_maker_ = std::make_unique<PatchMaker>(params.patchsize, params.patchstride);
  preprocessing_ = std::make_unique<Preprocessing>(feature_dimensions, params.pretrain_embed_dimension);
  preadapt_aggregator_ = std::make_unique<Aggregator>(params.target_embed_dimension);
  patch_embedder_ = std::make_unique<PatchEmbedder>(feature_dimensions, params.patchsize, params.patchstride,
                                                    params.pretrain_embed_dimension, params.target_embed_dimension);
  featuresampler_ = std::move(featuresampler);
  anomaly_scorer_ = std::make_unique<NearestNeighbourScorer>(params.anomaly_scorer_num_nn, std::move(nn_method));
  anomaly_segmentor_ = std::make_unique<RescaleSegmentor>(device_, params.transform.crop);
}

void PatchCore::require_loaded(const char* what) const {
  if (!feature_aggregator_) throw std::logic_error(std::string("PatchCore::") + what + " before load()");
}

torch::Tensor PatchCore::embed(const torch::Tensor& images, std::vector<int64_t>* patch_shape,
                               StageTimer* timer) const {
  require_loaded("embed");
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> features;
  {
    StageTimer::Scope scope(timer, "backbone");
    const auto by_layer = feature_aggregator_->forward(images);
    for (const auto& layer : params_.layers_to_extract_from) features.push_back(by_layer[layer]);
  }
  StageTimer::Scope scope(timer, "embedding");
  return patch_embedder_->forward(features, patch_shape);
}

void PatchCore::fit(const std::vector<std::string>& image_paths, const FitOptions& options,
                    const ProgressCallback& progress, StageTimer* timer) {
  require_loaded("fit");
  if (image_paths.empty()) throw std::invalid_argument("PatchCore::fit: no training images");
  if (options.batch_size < 1) throw std::invalid_argument("PatchCore::fit: batch size must be at least 1");
  if (options.memory_budget_bytes < 0) throw std::invalid_argument("PatchCore::fit: the memory budget must be >= 0");
  std::unique_ptr<FeatureStore> store;
  torch::Tensor summary;  // of all rows, allocated once: growing it chunk by chunk would hold it twice
  ImageBatches batches(image_paths, params_.transform, options.batch_size, timer);
  for (torch::Tensor images; batches.next(images);) {
    const torch::Tensor embedded = embed(images, nullptr, timer);
    torch::Tensor chunk;
    {
      StageTimer::Scope scope(timer, "coreset");
      chunk = featuresampler_->summarize(embedded);
    }
    if (!store) {
      // Every image gives the same number of patches, so the first batch tells what the whole fit will hold.
      const int64_t rows = embedded.size(0) / images.size(0) * static_cast<int64_t>(image_paths.size());
      check_fit_memory(rows, embedded.size(1), options.memory_budget_bytes);
      StageTimer::Scope scope(timer, "store");
      store = std::make_unique<FeatureStore>(embedded.size(1), options.scratch_directory);
      store->reserve(rows);
      summary = torch::empty({rows, chunk.size(1)}, torch::kFloat32);
    }
    summary.slice(0, store->rows(), store->rows() + chunk.size(0)).copy_(chunk);
    {
      StageTimer::Scope scope(timer, "store");
      store->append(embedded);
    }
    if (progress) progress("embedding training images", batches.done(), image_paths.size());
  }
  if (progress) progress("coreset", 0, 1);
  std::vector<int64_t> selected;
  {
    StageTimer::Scope scope(timer, "coreset");
    selected = featuresampler_->select_from_summary(summary);
    summary = torch::Tensor();
  }
  if (progress) progress("coreset", 1, 1);
  torch::Tensor bank;
  {
    StageTimer::Scope scope(timer, "store");
    bank = store->gather(selected);
    store.reset();
  }
  fit_memory_bank(bank, timer);
}

void PatchCore::fit_features(const torch::Tensor& features, StageTimer* timer) {
  require_loaded("fit");
  torch::Tensor sampled;
  {
    StageTimer::Scope scope(timer, "coreset");
    sampled = featuresampler_->run(features);
  }
  fit_memory_bank(sampled, timer);
}

void PatchCore::fit_memory_bank(const torch::Tensor& bank, StageTimer* timer) {
  StageTimer::Scope scope(timer, "index");
  anomaly_scorer_->fit({bank});
}

void PatchCore::check_fit_memory(int64_t rows, int64_t dim, int64_t budget_bytes) const {
  if (budget_bytes == 0) return;
  const int64_t in_use = current_rss_bytes();
  const int64_t selection = rows * featuresampler_->selection_bytes_per_row(dim);
  // The bank tensor, the index's copy of it and the index's own working data, which is no larger.
  const int64_t bank = 3 * featuresampler_->selection_size(rows) * dim * static_cast<int64_t>(sizeof(float));
  const int64_t needed = in_use + std::max(selection, bank);
  if (needed > budget_bytes) {
    const auto mib = [](int64_t bytes) { return std::to_string(bytes >> 20) + " MiB"; };
    throw std::runtime_error("PatchCore::fit: " + std::to_string(rows) + " training patches need about " + mib(needed) +
                             " (" + mib(in_use) + " in use, " + mib(selection) + " for the coreset selection, " +
                             mib(bank) + " for the memory bank and its index), more than the memory budget of " +
                             mib(budget_bytes) + "; fit fewer images or keep a smaller fraction");
  }
}

PredictResult PatchCore::predict(const torch::Tensor& images, StageTimer* timer) const {
  require_loaded("predict");
  if (!anomaly_scorer_->nn_method().is_fitted())
    throw std::logic_error("PatchCore::predict before fit() or load_from_path()");
  const int64_t batch = images.size(0);
  std::vector<int64_t> grid;
  const torch::Tensor features = embed(images, &grid, timer);
  torch::Tensor patch_scores;
  {
    StageTimer::Scope scope(timer, "search");
    patch_scores = patch_maker_->unpatch_scores(std::get<0>(anomaly_scorer_->predict({features})), batch);
  }
  StageTimer::Scope scope(timer, "segmentation");
  const torch::Tensor image_scores = patch_maker_->score(patch_scores).contiguous();
  PredictResult result;
  result.scores.assign(image_scores.data_ptr<float>(), image_scores.data_ptr<float>() + batch);
  result.masks = anomaly_segmentor_->convert_to_segmentation(patch_scores.reshape({batch, grid[0], grid[1]}));
  return result;
}

void PatchCore::save_to_path(const std::string& save_path, const std::string& prepend) const {
  require_loaded("save_to_path");
  const Backbone& net = backbone();
  if (net.weights_path().empty())
    throw std::logic_error("PatchCore::save_to_path: the backbone's weights were not loaded from a file");
  const bool scripted = net.architecture() == "torchscript";
  const std::string weights_file = prepend + (scripted ? "backbone.pt" : "backbone.pth");
  const FileDigest weights = digest(net.weights_path());
  json j = {
      {"format", kFormat},
      {"version", kFormatVersion},
      {"backbone.name", net.architecture()},
      {"backbone.weights", {{"file", weights_file}, {"bytes", weights.bytes}, {"crc32", weights.crc32}}},
      {"layers_to_extract_from", params_.layers_to_extract_from},
      {"input_shape", params_.input_shape()},
      {"pretrain_embed_dimension", params_.pretrain_embed_dimension},
      {"target_embed_dimension", params_.target_embed_dimension},
      {"patchsize", params_.patchsize},
      {"patchstride", params_.patchstride},
      {"anomaly_scorer_num_nn", params_.anomaly_scorer_num_nn},
      {"resize", params_.transform.resize},
      {"mean", params_.transform.mean},
      {"std", params_.transform.std},
      {"nn_method", anomaly_scorer_->nn_method().kind()},
      {"memory_bank_size", memory_bank_size()},
  };
  write_directory_atomically(save_path, [&](const std::string& dir) {
    anomaly_scorer_->save(dir, false, prepend);
    fs::copy_file(net.weights_path(), fs::path(dir) / weights_file);
    std::ofstream out(fs::path(dir) / (prepend + kParamsFile));
    out << j.dump(2) << "\n";
    if (!out) throw std::runtime_error(save_path + ": cannot write " + kParamsFile);
  });
}

std::unique_ptr<PatchCore> PatchCore::load_from_path(const std::string& load_path, const std::string& device,
                                                     int num_workers, const std::string& prepend) {
  const std::string params_path = (fs::path(load_path) / (prepend + kParamsFile)).string();
  if (!fs::is_directory(load_path)) throw std::runtime_error(load_path + ": no such model directory");
  json j;
  try {
    j = json::parse(read_file(params_path));
  } catch (const json::exception& e) {
    throw std::runtime_error(params_path + ": malformed JSON: " + e.what());
  }
  try {
    if (!j.is_object() || j.value("format", "") != kFormat)
      throw std::runtime_error(params_path + ": not a patchcore model description");
    const int64_t version = bounded(j.at("version"), "version", 1, std::numeric_limits<int32_t>::max());
    if (version > kFormatVersion)
      throw std::runtime_error(params_path + ": written by a newer patchcore (format version " +
                               std::to_string(version) + ", this build reads up to " + std::to_string(kFormatVersion) +
                               ")");
    PatchCoreParams params;
    params.layers_to_extract_from = j.at("layers_to_extract_from").get<std::vector<std::string>>();
    const auto field = [&](const char* key, int64_t high) { return bounded(j.at(key), key, 1, high); };
    params.pretrain_embed_dimension = field("pretrain_embed_dimension", PatchCoreParams::kMaxEmbedDimension);
    params.target_embed_dimension = field("target_embed_dimension", PatchCoreParams::kMaxEmbedDimension);
    params.patchsize = field("patchsize", PatchCoreParams::kMaxPatchsize);
    params.patchstride = field("patchstride", PatchCoreParams::kMaxPatchsize);
    params.anomaly_scorer_num_nn = field("anomaly_scorer_num_nn", PatchCoreParams::kMaxNearestNeighbours);
    const json& input_shape = j.at("input_shape");
    if (!input_shape.is_array() || input_shape.size() != 3 || input_shape[1] != input_shape[2] ||
        bounded(input_shape[0], "input_shape[0]", 3, 3) != 3)
      throw std::runtime_error(params_path + ": input_shape must be [3, crop, crop]");
    params.transform.crop = static_cast<int>(bounded(input_shape[1], "input_shape[1]", 1, ImageTransform::kMaxSide));
    params.transform.resize = static_cast<int>(field("resize", ImageTransform::kMaxSide));
    params.transform.mean = j.at("mean").get<std::array<float, 3>>();
    params.transform.std = j.at("std").get<std::array<float, 3>>();

    const json& weights = j.at("backbone.weights");
    const std::string weights_file = weights.at("file").get<std::string>();
    // Only a file of the model directory itself: the description must not send the loader elsewhere.
    if (weights_file.empty() || weights_file == "." || weights_file == ".." ||
        fs::path(weights_file).filename().string() != weights_file)
      throw std::runtime_error(params_path +
                               ": backbone.weights.file must name a file inside the model directory, got '" +
                               weights_file + "'");
    const std::string weights_path = (fs::path(load_path) / weights_file).string();
    if (!fs::is_regular_file(weights_path))
      throw std::runtime_error(weights_path + ": backbone weights missing from the model");
    const FileDigest found = digest(weights_path);
    if (found.bytes != weights.at("bytes").get<uint64_t>() || found.crc32 != weights.at("crc32").get<uint32_t>())
      throw std::runtime_error(weights_path + ": backbone weights do not match the size/CRC-32 recorded in " +
                               params_path);

    const std::shared_ptr<NearestNeighbourSearch> nn = make_nn_method(j.at("nn_method").get<std::string>(), num_workers);

    auto model = std::make_unique<PatchCore>(device);
    model->load(load_backbone(j.at("backbone.name").get<std::string>(), weights_path, params.layers_to_extract_from),
                params, std::make_shared<IdentitySampler>(), nn);
    model->anomaly_scorer_->load(load_path, prepend);
    if (nn->dimension() != params.target_embed_dimension)
      throw std::runtime_error(NearestNeighbourScorer::index_filename(load_path, prepend) + ": index has dimension " +
                               std::to_string(nn->dimension()) + ", the model's embedding has " +
                               std::to_string(params.target_embed_dimension));
    return model;
  } catch (const json::exception& e) {
    throw std::runtime_error(params_path + ": bad or missing field: " + e.what());
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error(params_path + ": " + e.what());
  }
}

}  // namespace patchcore

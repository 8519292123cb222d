#include "patchcore/patchcore.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <limits>
#include <stdexcept>

#include "patchcore/core/device.h"
#include "patchcore/core/file.h"
#include "patchcore/core/process_memory.h"
#include "patchcore/io/image_batches.h"
#include "patchcore/memory_bank/feature_store.h"
#include "patchcore/model_dir.h"
#include "patchcore/segmentation/tiling.h"

namespace fs = std::filesystem;

namespace patchcore {
namespace {

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

}  // namespace

std::string utc_now() {
  const std::time_t now = std::time(nullptr);
  std::tm utc{};
  gmtime_r(&now, &utc);
  char text[32];
  std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%SZ", &utc);
  return text;
}

const char* version() { return PATCHCORE_VERSION; }

PatchCore::PatchCore(const std::string& device) : device_(device) { parse_device(device); }

void PatchCore::load(std::shared_ptr<Backbone> backbone, const PatchCoreParams& params,
                     std::shared_ptr<BaseSampler> featuresampler, std::shared_ptr<NearestNeighbourSearch> nn_method) {
  check_params(params);
  if (!featuresampler) throw std::invalid_argument("PatchCore: featuresampler is null");
  params_ = params;
  feature_aggregator_ =
      std::make_unique<NetworkFeatureAggregator>(std::move(backbone), params.layers_to_extract_from, device_);
  batchnorm_note_.clear();
  if (params.batchnorm_statistics == BatchNormStatistics::kReferenceUpdate) {
    // As the published PatchCore.load does, with the feature_dimensions probe it runs in training mode.
    if (!feature_aggregator_->update_batchnorm_statistics(params.input_shape(), &batchnorm_note_))
      params_.batchnorm_statistics = BatchNormStatistics::kCheckpoint;
  } else if (feature_aggregator_->backbone()->batchnorm_statistics() != BatchNormStatistics::kCheckpoint) {
    throw std::invalid_argument(
        "PatchCore: the backbone's BatchNorm statistics were already updated, so the checkpoint's are not available");
  }
  const auto feature_dimensions = feature_aggregator_->feature_dimensions(params.input_shape());
  patch_maker_ = std::make_unique<PatchMaker>(params.patchsize, params.patchstride);
  patch_embedder_ = std::make_unique<PatchEmbedder>(feature_dimensions, params.patchsize, params.patchstride,
                                                    params.pretrain_embed_dimension, params.target_embed_dimension);
  featuresampler_ = std::move(featuresampler);
  anomaly_scorer_ = std::make_unique<NearestNeighbourScorer>(params.anomaly_scorer_num_nn, std::move(nn_method));
  anomaly_segmentor_ = std::make_unique<RescaleSegmentor>(device_, params.transform.crop);
}

void PatchCore::require_loaded(const char* what) const {
  if (!feature_aggregator_) throw std::logic_error(std::string("PatchCore::") + what + " before load()");
}

at::Tensor PatchCore::embed(const at::Tensor& images, std::vector<int64_t>* patch_shape, StageTimer* timer) const {
  require_loaded("embed");
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> features;
  {
    StageTimer::Scope scope(timer, "backbone");
    const auto by_layer = feature_aggregator_->forward(images);
    for (const auto& layer : params_.layers_to_extract_from) features.push_back(by_layer[layer]);
  }
  StageTimer::Scope scope(timer, "embedding");
  return patch_embedder_->forward(features, patch_shape);
}

FitReport PatchCore::fit(const std::vector<std::string>& image_paths, const FitOptions& options,
                         const ProgressCallback& progress, StageTimer* timer) {
  require_loaded("fit");
  if (image_paths.empty()) throw std::invalid_argument("PatchCore::fit: no training images");
  if (options.batch_size < 1) throw std::invalid_argument("PatchCore::fit: batch size must be at least 1");
  if (options.memory_budget_bytes < 0) throw std::invalid_argument("PatchCore::fit: the memory budget must be >= 0");
  provenance_.tool = std::string("patchcore ") + version();
  provenance_.created = utc_now();
  provenance_.train_images = static_cast<int64_t>(image_paths.size());
  std::unique_ptr<FeatureStore> store;
  at::Tensor summary;  // of all rows, allocated once: growing it chunk by chunk would hold it twice
  ImageBatches batches(image_paths, params_.transform, options.batch_size, timer);
  int64_t filled = 0;  // rows of `summary` written
  for (std::vector<at::Tensor> images; batches.next(images);) {
    const at::Tensor embedded = embed(images, timer);
    at::Tensor chunk;
    {
      StageTimer::Scope scope(timer, "coreset");
      chunk = featuresampler_->summarize(embedded);
    }
    if (!store) {
      // In the crop view every image gives the same number of patches, so the first batch tells what the whole fit
      // will hold; in the others it is an estimate, and the summary grows where it falls short.
      const int64_t rows =
          embedded.size(0) / static_cast<int64_t>(images.size()) * static_cast<int64_t>(image_paths.size());
      const bool in_memory = plan_fit_memory(rows, embedded.size(1), options);
      StageTimer::Scope scope(timer, "store");
      store = in_memory ? FeatureStore::in_memory(embedded.size(1))
                        : std::make_unique<FeatureStore>(embedded.size(1), options.scratch_directory);
      store->reserve(rows);
      summary = at::empty({rows, chunk.size(1)}, at::kFloat);
    }
    if (filled + chunk.size(0) > summary.size(0)) {
      const auto remaining = static_cast<int64_t>(image_paths.size() - batches.done());
      const int64_t needed = filled + chunk.size(0) + remaining * chunk.size(0) / static_cast<int64_t>(images.size());
      at::Tensor grown = at::empty({needed, chunk.size(1)}, at::kFloat);
      grown.slice(0, 0, filled).copy_(summary.slice(0, 0, filled));
      summary = grown;
    }
    summary.slice(0, filled, filled + chunk.size(0)).copy_(chunk);
    filled += chunk.size(0);
    {
      StageTimer::Scope scope(timer, "store");
      store->append(embedded);
    }
    if (progress) progress("embedding training images", batches.done(), image_paths.size());
  }
  summary = summary.slice(0, 0, filled);
  if (progress) progress("coreset", 0, 1);
  std::vector<int64_t> selected;
  {
    StageTimer::Scope scope(timer, "coreset");
    selected = featuresampler_->select_from_summary(summary);
    summary = at::Tensor();
  }
  if (progress) progress("coreset", 1, 1);
  at::Tensor bank;
  {
    StageTimer::Scope scope(timer, "store");
    bank = store->gather(selected);
  }
  fit_memory_bank(bank, timer);
  {
    StageTimer::Scope scope(timer, "normal scores");
    measure_normal_scores(store->rows(), [&](const std::vector<int64_t>& rows) { return store->gather(rows); });
  }
  return FitReport{store->rows(), store->rows() * store->dim() * static_cast<int64_t>(sizeof(float)),
                   store->directory()};
}

void PatchCore::fit_features(const at::Tensor& features, StageTimer* timer) {
  require_loaded("fit");
  at::Tensor sampled;
  {
    StageTimer::Scope scope(timer, "coreset");
    sampled = featuresampler_->run(features);
  }
  fit_memory_bank(sampled, timer);
  StageTimer::Scope scope(timer, "normal scores");
  measure_normal_scores(features.size(0), [&](const std::vector<int64_t>& rows) {
    return features.index_select(0, at::tensor(rows, at::kLong));
  });
}

void PatchCore::measure_normal_scores(int64_t patches,
                                      const std::function<at::Tensor(const std::vector<int64_t>&)>& rows) {
  // Enough evenly spaced patches for a stable 99th percentile, at the cost of a few images' search.
  constexpr int64_t kSamples = 20000;
  // Searched a few images' worth at a time, so that each block reuses the last one's memory: on a virtual machine
  // every page touched for the first time costs a fault.
  constexpr int64_t kBlock = 2048;
  const int64_t samples = std::min(patches, kSamples);
  std::vector<float> scores;
  scores.reserve(static_cast<size_t>(samples));
  for (int64_t begin = 0; begin < samples; begin += kBlock) {
    std::vector<int64_t> block;
    for (int64_t i = begin; i < std::min(samples, begin + kBlock); ++i) block.push_back(i * patches / samples);
    const at::Tensor found = std::get<0>(anomaly_scorer_->predict({rows(block)})).contiguous();
    scores.insert(scores.end(), found.data_ptr<float>(), found.data_ptr<float>() + found.numel());
  }
  std::sort(scores.begin(), scores.end());
  normal_scores_.patches = samples;
  normal_scores_.max = scores[samples - 1];
  normal_scores_.p99 = scores[std::min(samples - 1, samples * 99 / 100)];
}

void PatchCore::fit_memory_bank(const at::Tensor& bank, StageTimer* timer) {
  StageTimer::Scope scope(timer, "index");
  anomaly_scorer_->fit({bank});
}

bool PatchCore::plan_fit_memory(int64_t rows, int64_t dim, const FitOptions& options) const {
  const int64_t features = rows * dim * static_cast<int64_t>(sizeof(float));
  const int64_t selection = rows * featuresampler_->selection_bytes_per_row(dim);
  // The bank tensor, the index's copy of it and the index's own working data, which is no larger.
  const int64_t bank = 3 * featuresampler_->selection_size(rows) * dim * static_cast<int64_t>(sizeof(float));
  const int64_t budget = options.memory_budget_bytes;
  if (budget > 0) {
    const int64_t in_use = current_rss_bytes();
    const int64_t needed = in_use + std::max(selection, bank);
    if (needed > budget) {
      const auto mib = [](int64_t bytes) { return std::to_string(bytes >> 20) + " MiB"; };
      throw std::runtime_error("PatchCore::fit: " + std::to_string(rows) + " training patches need about " +
                               mib(needed) + " (" + mib(in_use) + " in use, " + mib(selection) +
                               " for the coreset selection, " + mib(bank) +
                               " for the memory bank and its index), more than the memory budget of " + mib(budget) +
                               "; fit fewer images or keep a smaller fraction");
    }
    return options.scratch_directory.empty() && needed + features <= budget;
  }
  // Half of what is available, as the backbone, the decoder and the rest of the system need room too.
  return options.scratch_directory.empty() && features + std::max(selection, bank) <= available_memory_bytes() / 2;
}

at::Tensor PatchCore::embed(const std::vector<at::Tensor>& images, StageTimer* timer) const {
  std::vector<at::Tensor> rows;
  if (params_.transform.view == View::kTiles) {
    for (const at::Tensor& image : images) {
      const at::Tensor tiles = cut_tiles(image, tile_grid_of(image));
      for (int64_t begin = 0; begin < tiles.size(0); begin += kTilesPerPass)
        rows.push_back(embed(tiles.slice(0, begin, begin + kTilesPerPass), nullptr, timer));
    }
  } else {
    for_each_size_run(images, [&](const at::Tensor& run) { rows.push_back(embed(run, nullptr, timer)); });
  }
  return rows.size() == 1 ? rows.front() : at::cat(rows);
}

void PatchCore::for_each_size_run(const std::vector<at::Tensor>& images,
                                  const std::function<void(const at::Tensor&)>& run) {
  for (size_t begin = 0, end; begin < images.size(); begin = end) {
    for (end = begin + 1; end < images.size() && images[end].sizes() == images[begin].sizes();) ++end;
    run(end - begin == 1 ? images[begin].unsqueeze(0)
                         : at::stack(std::vector<at::Tensor>(images.begin() + begin, images.begin() + end)));
  }
}

TileGrid PatchCore::tile_grid_of(const at::Tensor& image) const {
  if (image.dim() != 3) throw std::invalid_argument("PatchCore: an image must be [3, H, W]");
  return tile_grid(static_cast<int>(image.size(2)), static_cast<int>(image.size(1)), params_.transform.crop,
                   params_.transform.tile_overlap);
}

at::Tensor PatchCore::patch_scores(const at::Tensor& images, StageTimer* timer) const {
  std::vector<int64_t> grid;
  const at::Tensor features = embed(images, &grid, timer);
  StageTimer::Scope scope(timer, "search");
  return patch_maker_->unpatch_scores(std::get<0>(anomaly_scorer_->predict({features})), images.size(0))
      .reshape({images.size(0), grid[0], grid[1]});
}

void PatchCore::require_fitted() const {
  require_loaded("predict");
  if (!anomaly_scorer_->nn_method().is_fitted())
    throw std::logic_error("PatchCore::predict before fit() or load_from_path()");
}

PredictResult PatchCore::predict(const at::Tensor& images, StageTimer* timer) const {
  require_fitted();
  if (images.dim() != 4) throw std::invalid_argument("PatchCore::predict: images must be [B, 3, H, W]");
  PredictResult result;
  if (params_.transform.view == View::kTiles) {
    for (int64_t b = 0; b < images.size(0); ++b) {
      const at::Tensor image = images[b];
      const TileGrid grid = tile_grid_of(image);
      const at::Tensor tiles = cut_tiles(image, grid);
      std::vector<at::Tensor> maps;
      float score = -std::numeric_limits<float>::infinity();
      for (int64_t begin = 0; begin < tiles.size(0); begin += kTilesPerPass) {
        const at::Tensor scores = patch_scores(tiles.slice(0, begin, begin + kTilesPerPass), timer);
        StageTimer::Scope scope(timer, "segmentation");
        score = std::max(score, scores.max().item<float>());
        maps.push_back(anomaly_segmentor_->rescale(scores, grid.tile, grid.tile));
      }
      StageTimer::Scope scope(timer, "segmentation");
      result.scores.push_back(score);
      result.masks.push_back(
          anomaly_segmentor_->smooth(stitch_tiles(at::cat(maps), grid, image.size(1), image.size(2))));
    }
    return result;
  }
  const at::Tensor scores = patch_scores(images, timer);
  StageTimer::Scope scope(timer, "segmentation");
  const at::Tensor image_scores = patch_maker_->score(scores).contiguous();
  result.scores.assign(image_scores.data_ptr<float>(), image_scores.data_ptr<float>() + images.size(0));
  result.masks = anomaly_segmentor_->convert_to_segmentation(scores, images.size(2), images.size(3));
  return result;
}

PredictResult PatchCore::predict(const std::vector<at::Tensor>& images, StageTimer* timer) const {
  require_fitted();
  PredictResult result;
  for_each_size_run(images, [&](const at::Tensor& run) {
    PredictResult part = predict(run, timer);
    result.scores.insert(result.scores.end(), part.scores.begin(), part.scores.end());
    for (auto& map : part.masks) result.masks.push_back(std::move(map));
  });
  return result;
}

void PatchCore::save_to_path(const std::string& save_path, const std::string& prepend) const {
  require_loaded("save_to_path");
  const Backbone& net = backbone();
  ModelDescription description;
  description.backbone = net.architecture();
  description.weights_file = prepend + (description.backbone == "torchscript" ? "backbone.pt" : "backbone.pth");
  description.params = params_;
  description.nn_method = anomaly_scorer_->nn_method().kind();
  description.memory_bank_size = memory_bank_size();
  description.normal_scores = normal_scores_;
  description.provenance = provenance_;
  description.calibration = calibration_;
  write_directory_atomically(save_path, [&](const std::string& dir) {
    anomaly_scorer_->save(dir, false, prepend);
    net.write_weights(description.weights_path(dir));
    description.weights = file_digest(description.weights_path(dir));
    write_model_description(dir, prepend, description);
  });
}

std::unique_ptr<PatchCore> PatchCore::load_from_path(const std::string& load_path, const std::string& device,
                                                     int num_workers, const std::string& prepend) {
  const ModelDescription d = read_model_description(load_path, prepend);
  std::shared_ptr<NearestNeighbourSearch> nn;
  auto model = std::make_unique<PatchCore>(device);
  try {
    nn = make_nn_method(d.nn_method, num_workers);
    model->load(load_backbone(d.backbone, d.weights_path(load_path), d.params.layers_to_extract_from), d.params,
                std::make_shared<IdentitySampler>(), nn);
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error(ModelDescription::path(load_path, prepend) + ": " + e.what());
  }
  model->load_index(load_path, prepend);
  model->normal_scores_ = d.normal_scores;
  model->provenance_ = d.provenance;
  model->calibration_ = d.calibration;
  return model;
}

void PatchCore::load_index(const std::string& dir, const std::string& prepend) {
  require_loaded("load_index");
  try {
    anomaly_scorer_->load(dir, prepend);
  } catch (const std::runtime_error&) {
    throw;
  } catch (const std::exception& e) {
    // Whatever else a damaged bank makes fail (a PCA that does not converge, ...) is reported as that file's fault.
    throw std::runtime_error(NearestNeighbourScorer::index_filename(dir, prepend) +
                             ": cannot use this memory bank: " + e.what());
  }
  const int64_t dimension = anomaly_scorer_->nn_method().dimension();
  if (dimension != params_.target_embed_dimension)
    throw std::runtime_error(NearestNeighbourScorer::index_filename(dir, prepend) + ": index has dimension " +
                             std::to_string(dimension) + ", the model's embedding has " +
                             std::to_string(params_.target_embed_dimension));
}

}  // namespace patchcore

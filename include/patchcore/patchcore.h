#pragma once
// patchcore.PatchCore: the whole method. Images → backbone features → locally aggregated patches →
// embedding → memory bank (coreset) → nearest-neighbour patch scores → image score and segmentation.
#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "patchcore/backbone/backbone.h"
#include "patchcore/backbone/network_feature_aggregator.h"
#include "patchcore/core/stage_timer.h"
#include "patchcore/decision/threshold.h"
#include "patchcore/embedding/patch_embedder.h"
#include "patchcore/embedding/patch_maker.h"
#include "patchcore/io/image.h"
#include "patchcore/memory_bank/sampler.h"
#include "patchcore/nn/faiss_nn.h"
#include "patchcore/nn/nearest_neighbour_scorer.h"
#include "patchcore/segmentation/rescale_segmentor.h"

namespace patchcore {

struct TileGrid;

// The settings the reference pickles as patchcore_params.pkl, plus the image transform, which a model
// directory must carry so that predict needs no other flags.
struct PatchCoreParams {
  // Far beyond any published setting; they bound the memory and time a model description can demand.
  static constexpr int64_t kMaxPatchsize = 31;
  static constexpr int64_t kMaxEmbedDimension = 16384;
  static constexpr int64_t kMaxNearestNeighbours = 1024;

  std::vector<std::string> layers_to_extract_from{"layer2", "layer3"};
  int64_t pretrain_embed_dimension = 1024;
  int64_t target_embed_dimension = 1024;
  int64_t patchsize = 3;
  int64_t patchstride = 1;
  int64_t anomaly_scorer_num_nn = 1;
  ImageTransform transform;  // view, resize, crop; input_shape is (3, crop, crop), a tile in the tiles view
  // Requested of load(); what it could apply is in PatchCore::params() afterwards.
  BatchNormStatistics batchnorm_statistics = BatchNormStatistics::kReferenceUpdate;
  std::vector<int64_t> input_shape() const { return {3, transform.crop, transform.crop}; }
};

struct PredictResult {
  std::vector<float> scores;      // one per image: the highest patch score
  std::vector<at::Tensor> masks;  // one float32 map per image, of its input's height and width
};

// How the training patches score against the memory bank, measured by fit on up to 20,000 evenly spaced ones.
// The coreset leaves most training patches out of the bank, so these are the scores of normal patches: a scale
// known from the model alone (all zero when every patch is in the bank).
struct NormalScores {
  float max = 0;
  float p99 = 0;
  int64_t patches = 0;  // how many were scored; 0 when not measured (a model loaded from an older directory)
};

// Where a fitted model came from, recorded in its model directory.
struct Provenance {
  std::string tool;     // "patchcore <version>"
  std::string created;  // UTC, ISO 8601
  std::string data;     // the training data's folder, where the caller says
  int64_t train_images = 0;
  std::vector<std::pair<std::string, std::string>> options;  // as the caller gave them (the CLI: its flags)
};

// This build's version, e.g. "0.2.0".
const char* version();
// The current time as models record it: UTC, ISO 8601.
std::string utc_now();

// How fit holds the training features.
struct FitOptions {
  int64_t batch_size = 2;  // images per forward pass
  // Bound on the process's resident memory during fit, in bytes; 0 for none. Once the first batch shows how
  // many patches the training set has, fit refuses to go on, before the long work, if what it must then hold
  // (the memory already in use, plus the larger of the sampler's selection data and the memory bank with its
  // index) would exceed it.
  int64_t memory_budget_bytes = 0;
  // Where the patch features wait for the coreset (FeatureStore), 4 bytes per feature value: patches x
  // target_embed_dimension x 4. Given, an unnamed file in that directory. Empty, in memory where they fit (within
  // the budget with everything else fit holds; without a budget, in half the memory available), else an unnamed
  // file in the system's temporary directory.
  std::string scratch_directory;
};

// Where fit kept the training features, for its report.
struct FitReport {
  int64_t patches = 0;            // training patches embedded
  int64_t feature_bytes = 0;      // their features: patches x target_embed_dimension x 4
  std::string scratch_directory;  // the directory of the file they waited in; empty when they were held in memory
};

// Reports progress of long steps: stage name, items done, items in total.
using ProgressCallback = std::function<void(const std::string& stage, size_t done, size_t total)>;

class PatchCore {
 public:
  explicit PatchCore(const std::string& device = "cpu");

  // As the reference's PatchCore.load(): applies its BatchNorm update to the backbone (unless
  // params.batchnorm_statistics asks for the checkpoint's), then wires backbone, patch maker, embedding, sampler
  // and scorer.
  void load(std::shared_ptr<Backbone> backbone, const PatchCoreParams& params,
            std::shared_ptr<BaseSampler> featuresampler = std::make_shared<IdentitySampler>(),
            std::shared_ptr<NearestNeighbourSearch> nn_method = std::make_shared<FaissNN>(false, 4));

  // images [B, 3, H, W] → patch embeddings [B·h·w, target_embed_dimension]; patch_shape receives {h, w}.
  // `timer` (optional) receives stages "backbone" and "embedding".
  at::Tensor embed(const at::Tensor& images, std::vector<int64_t>* patch_shape = nullptr,
                   StageTimer* timer = nullptr) const;
  // Images of the model's view ([3, H, W] each, sizes free: ImageTransform::load) → the patch embeddings of all,
  // image after image; in the tiles view, tile after tile of each image.
  at::Tensor embed(const std::vector<at::Tensor>& images, StageTimer* timer = nullptr) const;

  // Fits the memory bank on training images (files, read with params.transform), batch by batch. Each batch's
  // embeddings go to a FeatureStore, in memory or on disk (FitOptions::scratch_directory), beside the sampler's
  // summary of them; the selected rows are read back and indexed. The result equals fit_features() on all
  // embeddings at once. The next batch is decoded while the current one is embedded. `timer` (optional) receives
  // stages "decode", "backbone", "embedding", "store", "coreset" and "index".
  FitReport fit(const std::vector<std::string>& image_paths, const FitOptions& options = {},
                const ProgressCallback& progress = {}, StageTimer* timer = nullptr);
  // Fits on already-embedded features [N, D] (e.g. from embed()); `timer` receives "coreset" and "index".
  void fit_features(const at::Tensor& features, StageTimer* timer = nullptr);

  // Thread-safe once fitted: one loaded model can serve many threads. `timer` (optional) receives
  // stages "backbone", "embedding", "search" and "segmentation". images [B, 3, H, W]; each map is H x W. In the
  // tiles view each image is cut into tiles of the model's input size, whose maps are stitched (tiling.h), and its
  // score is the highest patch score of all its tiles.
  PredictResult predict(const at::Tensor& images, StageTimer* timer = nullptr) const;
  // The same for images of any sizes ([3, H, W] each): each run of equal sizes is one batch.
  PredictResult predict(const std::vector<at::Tensor>& images, StageTimer* timer = nullptr) const;

  // A model directory (model_dir.h), written to a temporary directory, then renamed.
  void save_to_path(const std::string& save_path, const std::string& prepend = "") const;
  // Needs nothing but the directory; every file is checked and errors name it.
  static std::unique_ptr<PatchCore> load_from_path(const std::string& load_path, const std::string& device = "cpu",
                                                   int num_workers = 4, const std::string& prepend = "");

  // Loads the memory bank's index, {prepend}nnscorer_search_index.faiss in `dir`, into the loaded model (what
  // load_from_path does after load(), and what a model saved by the published code needs). Throws naming the file
  // when it is damaged or does not fit the model's embedding.
  void load_index(const std::string& dir, const std::string& prepend = "");
  // The memory bank's rows, [memory_bank_size(), target_embed_dimension] float32.
  at::Tensor memory_bank() const { return anomaly_scorer_->nn_method().rows(); }

  const PatchCoreParams& params() const { return params_; }
  const NormalScores& normal_scores() const { return normal_scores_; }
  // Set by fit (tool, date, image count); the caller adds the data folder and options before save_to_path.
  Provenance& provenance() { return provenance_; }
  const Provenance& provenance() const { return provenance_; }
  void set_normal_scores(const NormalScores& scores) { normal_scores_ = scores; }
  // The decision thresholds calibrate found, saved with the model; none until then.
  const Calibration& calibration() const { return calibration_; }
  void set_calibration(const Calibration& calibration) { calibration_ = calibration; }
  // Why load() kept the checkpoint's BatchNorm statistics although the reference update was requested; empty
  // when it applied the update or was asked not to.
  const std::string& batchnorm_note() const { return batchnorm_note_; }
  const Backbone& backbone() const { return *feature_aggregator_->backbone(); }
  const NearestNeighbourScorer& anomaly_scorer() const { return *anomaly_scorer_; }
  int64_t memory_bank_size() const { return anomaly_scorer_->nn_method().size(); }

 private:
  // Tiles embedded in one pass, which bounds the memory of a large frame's tiles.
  static constexpr int64_t kTilesPerPass = 8;

  void require_loaded(const char* what) const;
  void require_fitted() const;
  // Calls `run` with each run of consecutive equal-size images, stacked into [b, 3, H, W].
  static void for_each_size_run(const std::vector<at::Tensor>& images,
                                const std::function<void(const at::Tensor&)>& run);
  TileGrid tile_grid_of(const at::Tensor& image) const;
  // images [B, 3, H, W] → patch scores [B, h, w].
  at::Tensor patch_scores(const at::Tensor& images, StageTimer* timer) const;
  void fit_memory_bank(const at::Tensor& bank, StageTimer* timer);
  // Scores a sample of the `patches` training patches, read by `rows`, against the fitted bank.
  void measure_normal_scores(int64_t patches, const std::function<at::Tensor(const std::vector<int64_t>&)>& rows);
  // Whether the features of `rows` patches of `dim` values wait for the coreset in memory (true) or in a scratch
  // file (FitOptions::scratch_directory). Throws when what fit must hold would exceed the budget.
  bool plan_fit_memory(int64_t rows, int64_t dim, const FitOptions& options) const;

  std::string device_;
  PatchCoreParams params_;
  std::string batchnorm_note_;
  NormalScores normal_scores_;
  Provenance provenance_;
  Calibration calibration_;
  std::unique_ptr<NetworkFeatureAggregator> feature_aggregator_;
  std::unique_ptr<PatchMaker> patch_maker_;
  // The reference's patch_maker, preprocessing and preadapt_aggregator in one pass (patch_embedder.h).
  std::unique_ptr<PatchEmbedder> patch_embedder_;
  std::shared_ptr<BaseSampler> featuresampler_;
  std::unique_ptr<NearestNeighbourScorer> anomaly_scorer_;
  std::unique_ptr<RescaleSegmentor> anomaly_segmentor_;
};

}  // namespace patchcore

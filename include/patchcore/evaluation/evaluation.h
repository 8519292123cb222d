#pragma once
// MVTec-style evaluation of a fitted PatchCore on a data set's test split: image metrics always, pixel metrics where
// the defective images have masks, per defect type, and the confusion matrix at the model's own threshold.
#include <opencv2/core.hpp>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "patchcore/evaluation/metrics.h"
#include "patchcore/io/dataset.h"
#include "patchcore/patchcore.h"

namespace patchcore {

// How a resampled ground-truth byte becomes a defect label.
enum class MaskRule {
  kHalf,       // byte / 255 >= 0.5 (masks resized and cropped like the images, then binarised at 0.5)
  kReference,  // byte == 255, the reference's astype(int) truncation of byte / 255
};

// Where maps and masks meet for the pixel metrics.
enum class MapCoordinates {
  kView,      // in the model's view (ImageTransform::view_size), as the published evaluation counts them
  kOriginal,  // on the original images, every mask pixel counted; pixels outside the view score the test set's
              // lowest map value, as never flagged
};

struct EvaluationOptions {
  int64_t batch_size = 2;
  MaskRule mask_rule = MaskRule::kHalf;  // for masks resampled into the view; original masks are binarised at 128
  MapCoordinates coordinates = MapCoordinates::kView;
  double fpr_limit = 0.3;  // for AUPRO
};

struct EvaluatedImage {
  Sample sample;
  float score = 0;
  cv::Mat anomaly_map;  // CV_32F, of the view's size or the original's (EvaluationOptions::coordinates)
  cv::Mat mask;         // CV_8U of the map's size, 1 = defect; empty for a defective image without a mask
};

// The threshold-free metrics of one kind of score (image scores, or map values); the curves keep about 4,096 points.
struct ScoreMetrics {
  double auroc = 0;
  double aupr = 0;  // average precision
  F1Max f1_max;     // the best F1 over all thresholds, and the threshold that reaches it
  RocCurve roc;
  PrCurve pr;
};

// Counts at a threshold; positive = anomalous (defective image, or defect pixel).
struct ConfusionMatrix {
  double threshold = 0;
  int64_t true_positives = 0, false_positives = 0, true_negatives = 0, false_negatives = 0;
};

struct DefectTypeMetrics {
  std::string defect_type;
  int64_t images = 0;
  double mean_score = 0;
  std::optional<double> image_auroc;  // this type's images against the good ones; none for "good" itself
  std::optional<int64_t> flagged;     // images at or above the model's image threshold, where it has one
  std::optional<double> pixel_auroc;  // the good images and this type's images with masks, where they have them
  std::optional<double> aupro;
};

struct EvaluationResult {
  ScoreMetrics image;
  // Pixel metrics count the good images and the defective images that have masks, and are computed only where at
  // least one defective image has a mask; pixel_note says which images they count, or why there are none.
  bool pixel_metrics = false;
  std::string pixel_note;
  ScoreMetrics pixel;                           // over every pixel of those images
  double pixel_auroc_defective = 0;             // over the images whose mask has any defect pixel
  ProCurve pro;                                 // up to EvaluationOptions::fpr_limit, with its aupro
  std::vector<DefectTypeMetrics> defect_types;  // in the test set's order, "good" included
  // At the model's calibrated thresholds, where it has them.
  std::optional<ConfusionMatrix> image_confusion, pixel_confusion;
  MapCoordinates coordinates = MapCoordinates::kView;  // of the maps and masks in `images`
  double ms_per_image = 0;                             // load + predict, wall clock
  std::vector<EvaluatedImage> images;
};

// A float32 [h, w] anomaly map (PredictResult::masks) as a CV_32F matrix of its own.
cv::Mat to_mat(const at::Tensor& map);
// Lowest and highest value over all maps: one colour scale for a whole run, so images compare.
std::pair<float, float> value_range(const std::vector<cv::Mat>& anomaly_maps);

// Scores `samples` batch by batch: each image's score and map, and its mask in the model's view where it has one.
// Members beyond the first are combined as the ensemble evaluate() below describes.
std::vector<EvaluatedImage> score_samples(const std::vector<const PatchCore*>& members,
                                          const std::vector<Sample>& samples, const EvaluationOptions& options = {},
                                          const ProgressCallback& progress = {});

// Throws std::invalid_argument, before any work, for a test set whose images are all good or all defective: its
// metrics are not defined. `what` names the set in the message.
void require_both_classes(const std::vector<Sample>& samples, const std::string& what);

EvaluationResult evaluate(const PatchCore& model, const std::vector<Sample>& test_set,
                          const EvaluationOptions& options = {}, const ProgressCallback& progress = {});
// An ensemble (a published model's members, which share their image transform) combined as the published
// load_and_evaluate_patchcore.py combines them: each member's image scores min-max normalised over the test set,
// its maps by their lowest and highest value over all test maps, then the mean over members. One member is
// evaluated on its raw scores, which give the same metrics. Confusion matrices use the first member's calibration,
// and only for a single member (an ensemble's combined scores are on another scale).
EvaluationResult evaluate(const std::vector<const PatchCore*>& members, const std::vector<Sample>& test_set,
                          const EvaluationOptions& options = {}, const ProgressCallback& progress = {});

}  // namespace patchcore

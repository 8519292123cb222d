#pragma once
// MVTec-style evaluation of a fitted PatchCore on a data set's test split.
#include <opencv2/core.hpp>

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

struct EvaluationOptions {
  int64_t batch_size = 2;
  MaskRule mask_rule = MaskRule::kHalf;
  double fpr_limit = 0.3;  // for AUPRO
};

struct EvaluatedImage {
  Sample sample;
  float score = 0;
  cv::Mat anomaly_map;  // CV_32F crop x crop
  cv::Mat mask;         // CV_8U crop x crop, 1 = defect
};

struct EvaluationResult {
  double image_auroc = 0;
  double pixel_auroc = 0;            // over every pixel of every test image
  double pixel_auroc_defective = 0;  // over the images whose mask has any defect pixel
  double aupro = 0;
  double ms_per_image = 0;  // load + predict, wall clock
  std::vector<EvaluatedImage> images;
  RocCurve image_roc, pixel_roc;
};

// A float32 [h, w] anomaly map (PredictResult::masks) as a CV_32F matrix of its own.
cv::Mat to_mat(const at::Tensor& map);
// Lowest and highest value over all maps: one colour scale for a whole run, so images compare.
std::pair<float, float> value_range(const std::vector<cv::Mat>& anomaly_maps);

EvaluationResult evaluate(const PatchCore& model, const std::vector<Sample>& test_set,
                          const EvaluationOptions& options = {}, const ProgressCallback& progress = {});
// An ensemble (a published model's members, which share their image transform) combined as the published
// load_and_evaluate_patchcore.py combines them: each member's image scores min-max normalised over the test set,
// its maps by their lowest and highest value over all test maps, then the mean over members. One member is
// evaluated on its raw scores, which give the same metrics.
EvaluationResult evaluate(const std::vector<const PatchCore*>& members, const std::vector<Sample>& test_set,
                          const EvaluationOptions& options = {}, const ProgressCallback& progress = {});

}  // namespace patchcore

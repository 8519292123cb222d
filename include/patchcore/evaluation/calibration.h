#pragma once
// Decision thresholds for a fitted model from validation images (decision/threshold.h says what they are):
//   - good and defective images: the F1-optimal image threshold, and the F1-optimal pixel threshold over the good
//     images and the defective ones with masks;
//   - good images only, for a line with no defect samples yet: the `quantile` of their image scores, and the same
//     quantile of each image's highest map value, so that that share of good images gets an empty defect mask.
//     Labelled images without any mask get their pixel threshold this way, from their good images.
// Each threshold records how it was found and the images it rests on; its normalisation range is the lowest and
// highest calibration score (image scores, or map values).
#include <string>
#include <vector>

#include "patchcore/decision/threshold.h"
#include "patchcore/evaluation/evaluation.h"

namespace patchcore {

struct CalibrationOptions {
  EvaluationOptions scoring;  // batch size and mask rule, as evaluate reads them
  double quantile = 0.995;    // for good images only
};

// Throws std::invalid_argument before any work for an empty set, one without good images, or a quantile outside
// [0, 1]. `data` is recorded as the calibration's source.
Calibration calibrate(const PatchCore& model, const std::vector<Sample>& samples, const std::string& data,
                      const CalibrationOptions& options = {}, const ProgressCallback& progress = {});

}  // namespace patchcore

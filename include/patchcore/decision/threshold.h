#pragma once
// From a score to a decision: the thresholds a model keeps for image scores and map values, how they were found
// (evaluation/calibration.h finds them), and anomalib's normalisation around them.
#include <cstdint>
#include <optional>
#include <string>

namespace patchcore {

struct Threshold {
  enum class Method {
    kF1Max,     // the F1-optimal threshold on labelled images (anomalib's F1AdaptiveThreshold)
    kQuantile,  // a quantile of good images' scores, for a line with no defect samples yet
  };
  double value = 0;
  Method method = Method::kF1Max;
  double quantile = 0;  // kQuantile: the quantile taken
  double f1 = 0;        // kF1Max: the F1 reached on the calibration data
  int64_t good_images = 0, defective_images = 0;  // the calibration images it rests on
  int64_t scores = 0;                             // the scores it rests on: images, or pixels
  double min = 0, max = 0;                        // lowest and highest calibration score: the normalisation's range

  // anomalib's min-max normalisation: (score - value) / (max - min) + 0.5, clipped to [0, 1], so 0.5 is the
  // threshold and a higher score never normalises lower.
  double normalize(double score) const;
  // The decision: anomalous (NG) at and above the threshold, as precision_recall_curve counts a positive.
  bool is_anomalous(double score) const { return score >= value; }
};

const char* to_string(Threshold::Method method);
// "f1_max" or "quantile"; throws std::invalid_argument naming the value otherwise.
Threshold::Method parse_threshold_method(const std::string& name);

// What a model keeps from calibrate: either threshold may be absent (pixel thresholds need masks or good images).
struct Calibration {
  std::optional<Threshold> image, pixel;
  std::string data;     // the validation folder
  std::string created;  // UTC, ISO 8601
};

}  // namespace patchcore

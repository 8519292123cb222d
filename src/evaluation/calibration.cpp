#include "patchcore/evaluation/calibration.h"

#include <algorithm>
#include <limits>
#include <stdexcept>

#include "patchcore/evaluation/metrics.h"

namespace patchcore {
namespace {

Threshold f1_threshold(const std::vector<float>& scores, const std::vector<uint8_t>& labels) {
  const F1Max best = precision_recall(scores.data(), labels.data(), scores.size(), 1).f1_max;
  Threshold t;
  t.method = Threshold::Method::kF1Max;
  t.value = best.threshold;
  t.f1 = best.f1;
  t.scores = static_cast<int64_t>(scores.size());
  return t;
}

Threshold quantile_threshold(const std::vector<float>& scores, double q) {
  Threshold t;
  t.method = Threshold::Method::kQuantile;
  t.value = quantile(scores, q);
  t.quantile = q;
  t.scores = static_cast<int64_t>(scores.size());
  return t;
}

}  // namespace

Calibration calibrate(const PatchCore& model, const std::vector<Sample>& samples, const std::string& data,
                      const CalibrationOptions& options, const ProgressCallback& progress) {
  if (samples.empty()) throw std::invalid_argument("calibrate: no validation images");
  if (!(options.quantile >= 0.0 && options.quantile <= 1.0))
    throw std::invalid_argument("calibrate: the quantile must be in [0, 1]");
  int64_t defective = 0;
  for (const auto& s : samples) defective += s.is_anomalous;
  const int64_t good = static_cast<int64_t>(samples.size()) - defective;
  if (good == 0)
    throw std::invalid_argument("calibrate: the validation images hold no good image; thresholds need good images");

  const std::vector<EvaluatedImage> images = score_samples({&model}, samples, options.scoring, progress);
  std::vector<float> scores, pixel_scores, good_peaks;
  std::vector<uint8_t> labels, pixel_labels;
  float pixel_low = std::numeric_limits<float>::max(), pixel_high = std::numeric_limits<float>::lowest();
  bool defect_pixels = false;
  int64_t masked = 0;  // defective images with masks
  for (const auto& image : images) {
    scores.push_back(image.score);
    labels.push_back(image.sample.is_anomalous);
    double low, high;
    cv::minMaxLoc(image.anomaly_map, &low, &high);
    pixel_low = std::min(pixel_low, static_cast<float>(low));
    pixel_high = std::max(pixel_high, static_cast<float>(high));
    if (!image.sample.is_anomalous) good_peaks.push_back(static_cast<float>(high));
    if (image.mask.empty()) continue;  // a defective image without a mask: no pixel labels
    const cv::Mat map = image.anomaly_map.clone(), mask = image.mask.clone();
    pixel_scores.insert(pixel_scores.end(), map.ptr<float>(), map.ptr<float>() + map.total());
    pixel_labels.insert(pixel_labels.end(), mask.ptr<uint8_t>(), mask.ptr<uint8_t>() + mask.total());
    masked += image.sample.is_anomalous;
    defect_pixels = defect_pixels || (image.sample.is_anomalous && cv::countNonZero(mask) > 0);
  }

  Calibration c;
  c.data = data;
  c.created = utc_now();
  if (defective > 0) {
    c.image = f1_threshold(scores, labels);
  } else {
    c.image = quantile_threshold(scores, options.quantile);
  }
  const auto [low, high] = std::minmax_element(scores.begin(), scores.end());
  c.image->min = *low;
  c.image->max = *high;
  c.image->good_images = good;
  c.image->defective_images = defective;

  if (defect_pixels) {
    c.pixel = f1_threshold(pixel_scores, pixel_labels);
    c.pixel->defective_images = masked;
  } else {
    c.pixel = quantile_threshold(good_peaks, options.quantile);
  }
  c.pixel->good_images = good;
  c.pixel->min = pixel_low;
  c.pixel->max = pixel_high;
  return c;
}

}  // namespace patchcore

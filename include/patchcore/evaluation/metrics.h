#pragma once
// Evaluation metrics of the reference: sklearn's roc_auc_score / roc_curve for image and pixel AUROC,
// and the MVTec AD per-region-overlap AUPRO. All are exact over every distinct score (no threshold grid)
// and run in O(n) memory and O(n) time after an O(n) radix sort, so 5.6 million pixels take well under
// a second.
//
// Conventions shared by all functions:
//   - labels / mask pixels: 0 = normal (negative), any nonzero value = anomalous (positive), so MVTec's
//     0/255 masks can be passed unchanged;
//   - a sample counts as positive at threshold t when score >= t; tied scores form one curve step;
//   - -0.0 and +0.0 are the same score; NaN or infinite scores are rejected (sklearn rejects them too);
//   - invalid input throws std::invalid_argument whose message names the function and the problem.
#include <cstddef>
#include <cstdint>
#include <vector>

#include <opencv2/core.hpp>

namespace patchcore {

// sklearn.metrics.roc_auc_score(labels, scores) for binary labels. Computed from integer counts, so the
// only rounding is one final division. Throws if sizes differ, n == 0, or only one class is present.
double auroc(const float* scores, const uint8_t* labels, size_t n);
double auroc(const std::vector<float>& scores, const std::vector<uint8_t>& labels);

struct RocCurve {
  std::vector<double> fpr, tpr, thresholds;
};

// sklearn.metrics.roc_curve(labels, scores) with drop_intermediate=True, as in sklearn 1.2: points are
// the distinct scores in decreasing order, a point is dropped when both its fps and tps second differences
// are zero, and a leading (0, 0) point gets the threshold max(scores) + 1 computed in float32 (sklearn
// keeps float32 scores as float32). Where sklearn would only warn and return NaN rates (one class
// present), this throws, as auroc does.
RocCurve roc_curve(const float* scores, const uint8_t* labels, size_t n);

// Normalised area under the per-region-overlap curve up to fpr_limit (Bergmann et al., "The MVTec Anomaly
// Detection Dataset", IJCV 2021; the definition of MVTec's evaluation code):
//   - regions are the 8-connected components of each mask's nonzero pixels, image by image;
//   - for each distinct score t, PRO(t) = mean over all regions of all images of the fraction of the
//     region's pixels with score >= t, and FPR(t) = fraction of all mask == 0 pixels with score >= t;
//   - the curve starts at (0, 0), its points are joined by straight lines (trapezoid rule), PRO is
//     linearly interpolated at exactly fpr_limit, and the area over [0, fpr_limit] is divided by fpr_limit.
// FPRs and PROs are kept in double (MVTec's script rounds its FPRs to float32, so it agrees only to ~1e-7).
// A perfect map gives 1; a constant map gives fpr_limit / 2. Maps: CV_32FC1; masks: CV_8UC1 of the same
// size as their map (pairs may differ in size from each other). Throws on mismatched counts, sizes or
// types, when there is no defect region or no normal pixel at all, or when fpr_limit is not in (0, 1].
double aupro(const std::vector<cv::Mat>& anomaly_maps, const std::vector<cv::Mat>& masks, double fpr_limit = 0.3);

// The PRO curve that aupro integrates: (0, 0), then a point per distinct score up to fpr_limit, the last one
// interpolated at exactly fpr_limit; `aupro` is aupro()'s value. With max_points > 0 a point is kept only once
// the FPR has advanced by fpr_limit / max_points since the last kept one (the area still counts every point).
struct ProCurve {
  std::vector<double> fpr, pro;
  double aupro = 0;
};
ProCurve pro_curve(const std::vector<cv::Mat>& anomaly_maps, const std::vector<cv::Mat>& masks,
                   double fpr_limit = 0.3, size_t max_points = 0);

// sklearn.metrics.precision_recall_curve(labels, scores) as in sklearn 1.2: every distinct score as a threshold,
// increasing; precision and recall have one point more, the final (precision 1, recall 0).
struct PrCurve {
  std::vector<double> precision, recall, thresholds;
};

// The threshold of highest F1, chosen as anomalib's F1AdaptiveThreshold chooses it on the precision-recall curve:
// F1 = 2PR / (P + R + 1e-10) at each point, and among equal F1s the lowest threshold. A sample is positive at
// threshold t when score >= t.
struct F1Max {
  double f1 = 0, precision = 0, recall = 0;
  double threshold = 0;
};

struct PrMetrics {
  double aupr = 0;  // sklearn.metrics.average_precision_score: precision times the step in recall, summed
  F1Max f1_max;
  PrCurve curve;
};

// All three in one pass over the sorted scores, with memory for the curve only. max_points > 0 keeps about that
// many of the curve's points, evenly by index, with both ends (AUPR and F1-max still count every point); 0 keeps
// every point, as sklearn returns them. Throws as auroc does.
PrMetrics precision_recall(const float* scores, const uint8_t* labels, size_t n, size_t max_points = 0);

// numpy.quantile(values, q) with its default linear interpolation; q in [0, 1], values not empty and finite.
double quantile(std::vector<float> values, double q);

}  // namespace patchcore

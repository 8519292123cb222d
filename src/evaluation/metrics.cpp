#include "patchcore/evaluation/metrics.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include <opencv2/imgproc.hpp>

namespace patchcore {
namespace {

// Scores are sorted as 32-bit keys whose unsigned order is the float order, packed above a 32-bit
// payload (label or region id) in one uint64: a single array, radix-sortable, one copy of n.
uint32_t score_key(float v, const char* function) {
  if (!std::isfinite(v))
    throw std::invalid_argument(std::string(function) + ": scores must be finite (got NaN or inf)");
  if (v == 0.0f) v = 0.0f;  // -0.0 ties with +0.0, as numpy's comparisons say
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

float key_score(uint32_t key) {
  const uint32_t bits = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

uint32_t key_of(uint64_t packed) { return static_cast<uint32_t>(packed >> 32); }
uint32_t payload_of(uint64_t packed) { return static_cast<uint32_t>(packed); }

// Stable LSD radix sort on the upper 32 bits (11 + 11 + 10 bit digits). Digits on which every element
// agrees are skipped, which is common for scores confined to [0, 1].
void sort_by_key(std::vector<uint64_t>& values) {
  constexpr std::array<int, 3> kShift{32, 43, 54};
  constexpr std::array<int, 3> kBits{11, 11, 10};
  std::array<std::vector<size_t>, 3> counts;
  for (int p = 0; p < 3; ++p) counts[p].assign(size_t{1} << kBits[p], 0);
  for (uint64_t v : values)
    for (int p = 0; p < 3; ++p) ++counts[p][(v >> kShift[p]) & ((uint64_t{1} << kBits[p]) - 1)];

  std::vector<uint64_t> buffer;
  for (int p = 0; p < 3; ++p) {
    std::vector<size_t>& c = counts[p];
    bool single_bucket = false;
    for (size_t b : c)
      if (b == values.size()) single_bucket = true;
    if (single_bucket) continue;
    if (buffer.empty()) buffer.resize(values.size());
    size_t offset = 0;
    for (size_t& b : c) {
      const size_t count = b;
      b = offset;
      offset += count;
    }
    const uint64_t mask = (uint64_t{1} << kBits[p]) - 1;
    for (uint64_t v : values) buffer[c[(v >> kShift[p]) & mask]++] = v;
    values.swap(buffer);
  }
}

// Sorted (key, label) pairs with the class counts; labels are reduced to 0/1.
struct SortedLabels {
  std::vector<uint64_t> packed;
  uint64_t positives = 0, negatives = 0;
};

SortedLabels sort_labelled(const float* scores, const uint8_t* labels, size_t n, const char* function) {
  if (n == 0) throw std::invalid_argument(std::string(function) + ": no samples");
  // The tp/fp area products below must fit in 64 bits.
  if (n > (size_t{1} << 32)) throw std::invalid_argument(std::string(function) + ": more than 2^32 samples");
  SortedLabels s;
  s.packed.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const uint64_t positive = labels[i] != 0;
    s.positives += positive;
    s.packed[i] = (uint64_t{score_key(scores[i], function)} << 32) | positive;
  }
  s.negatives = n - s.positives;
  if (s.positives == 0 || s.negatives == 0)
    throw std::invalid_argument(std::string(function) +
                                ": only one class present in labels; the metric is not defined in that case");
  sort_by_key(s.packed);
  return s;
}

// Calls step(tp, fp, key) after each group of tied scores, visiting scores from highest to lowest.
template <typename Step>
void for_each_threshold(const std::vector<uint64_t>& packed, Step step) {
  uint64_t tp = 0, fp = 0;
  size_t i = packed.size();
  while (i > 0) {
    const uint32_t key = key_of(packed[i - 1]);
    while (i > 0 && key_of(packed[i - 1]) == key) {
      const uint64_t positive = payload_of(packed[i - 1]);
      tp += positive;
      fp += 1 - positive;
      --i;
    }
    step(tp, fp, key);
  }
}

}  // namespace

double auroc(const float* scores, const uint8_t* labels, size_t n) {
  const SortedLabels s = sort_labelled(scores, labels, n, "auroc");
  // Twice the area in units of one (negative, positive) pair: integers, so ties and order are exact.
  uint64_t twice_area = 0, prev_tp = 0, prev_fp = 0;
  for_each_threshold(s.packed, [&](uint64_t tp, uint64_t fp, uint32_t) {
    twice_area += (fp - prev_fp) * (tp + prev_tp);
    prev_tp = tp;
    prev_fp = fp;
  });
  return static_cast<double>(twice_area) / (2.0 * static_cast<double>(s.positives) * static_cast<double>(s.negatives));
}

double auroc(const std::vector<float>& scores, const std::vector<uint8_t>& labels) {
  if (scores.size() != labels.size())
    throw std::invalid_argument("auroc: " + std::to_string(scores.size()) + " scores but " +
                                std::to_string(labels.size()) + " labels");
  return auroc(scores.data(), labels.data(), scores.size());
}

RocCurve roc_curve(const float* scores, const uint8_t* labels, size_t n) {
  const SortedLabels s = sort_labelled(scores, labels, n, "roc_curve");
  RocCurve curve;
  const auto keep = [&](uint64_t tp, uint64_t fp, uint32_t key) {
    curve.fpr.push_back(static_cast<double>(fp) / static_cast<double>(s.negatives));
    curve.tpr.push_back(static_cast<double>(tp) / static_cast<double>(s.positives));
    curve.thresholds.push_back(static_cast<double>(key_score(key)));
  };
  // sklearn's drop_intermediate: keep the ends and every point where either count's second difference is nonzero
  // (counts are exact integers in sklearn's float64 too). A point is decided when the next one arrives.
  struct Point {
    int64_t tp, fp;
    uint32_t key;
  };
  std::vector<Point> window;  // the two points before the current one
  for_each_threshold(s.packed, [&](uint64_t tp, uint64_t fp, uint32_t key) {
    const Point p{static_cast<int64_t>(tp), static_cast<int64_t>(fp), key};
    if (window.empty()) {
      // The leading (0, 0) point, at the highest score + 1 computed in float32.
      curve.fpr.push_back(0.0);
      curve.tpr.push_back(0.0);
      curve.thresholds.push_back(static_cast<double>(key_score(key) + 1.0f));
    } else {
      const Point& middle = window.back();
      const bool first = window.size() == 1;
      if (first || p.fp - 2 * middle.fp + window.front().fp != 0 || p.tp - 2 * middle.tp + window.front().tp != 0)
        keep(static_cast<uint64_t>(middle.tp), static_cast<uint64_t>(middle.fp), middle.key);
      if (window.size() == 2) window.erase(window.begin());
    }
    window.push_back(p);
  });
  const Point& last = window.back();
  keep(static_cast<uint64_t>(last.tp), static_cast<uint64_t>(last.fp), last.key);
  return curve;
}

ProCurve pro_curve(const std::vector<cv::Mat>& anomaly_maps, const std::vector<cv::Mat>& masks, double fpr_limit,
                   size_t max_points) {
  if (!(fpr_limit > 0.0 && fpr_limit <= 1.0))
    throw std::invalid_argument("aupro: fpr_limit must be in (0, 1], got " + std::to_string(fpr_limit));
  if (anomaly_maps.size() != masks.size())
    throw std::invalid_argument("aupro: " + std::to_string(anomaly_maps.size()) + " anomaly maps but " +
                                std::to_string(masks.size()) + " masks");
  size_t total = 0;
  for (size_t i = 0; i < masks.size(); ++i) {
    const cv::Mat& map = anomaly_maps[i];
    const cv::Mat& mask = masks[i];
    const std::string which = "aupro: image " + std::to_string(i) + ": ";
    if (map.type() != CV_32FC1) throw std::invalid_argument(which + "anomaly map must be CV_32FC1");
    if (mask.type() != CV_8UC1) throw std::invalid_argument(which + "mask must be CV_8UC1");
    if (map.dims != 2 || mask.dims != 2 || map.size() != mask.size())
      throw std::invalid_argument(which + "anomaly map " + std::to_string(map.rows) + "x" + std::to_string(map.cols) +
                                  " and mask " + std::to_string(mask.rows) + "x" + std::to_string(mask.cols) +
                                  " differ in size");
    total += map.total();
  }
  // The payload holds a region id, and ids never outnumber pixels.
  if (total >= (size_t{1} << 32)) throw std::invalid_argument("aupro: more than 2^32 pixels");

  // Payload 0 = normal pixel, r >= 1 = region r; inverse_size[r] is what one pixel adds to the PRO sum.
  std::vector<double> inverse_size{0.0};
  std::vector<uint64_t> packed;
  packed.reserve(total);
  uint64_t normal_pixels = 0;
  cv::Mat components;
  for (size_t i = 0; i < masks.size(); ++i) {
    const int count = cv::connectedComponents(masks[i], components, 8, CV_32S);
    const uint32_t first = static_cast<uint32_t>(inverse_size.size()) - 1;  // region ids of this image: first + label
    std::vector<uint64_t> sizes(static_cast<size_t>(count), 0);
    for (int y = 0; y < components.rows; ++y) {
      const float* score = anomaly_maps[i].ptr<float>(y);
      const int32_t* label = components.ptr<int32_t>(y);
      for (int x = 0; x < components.cols; ++x) {
        ++sizes[static_cast<size_t>(label[x])];
        const uint32_t region = label[x] == 0 ? 0 : first + static_cast<uint32_t>(label[x]);
        packed.push_back((uint64_t{score_key(score[x], "aupro")} << 32) | region);
      }
    }
    normal_pixels += sizes[0];
    for (int r = 1; r < count; ++r) inverse_size.push_back(1.0 / static_cast<double>(sizes[static_cast<size_t>(r)]));
  }
  const size_t regions = inverse_size.size() - 1;
  if (regions == 0) throw std::invalid_argument("aupro: the masks contain no defect region");
  if (normal_pixels == 0) throw std::invalid_argument("aupro: the masks contain no normal (zero) pixel");

  sort_by_key(packed);

  // Sweep thresholds from the highest score down, integrating each new segment and stopping at the
  // segment that crosses fpr_limit. The final point is always (1, 1), so that segment exists.
  ProCurve curve;
  curve.fpr.push_back(0.0);
  curve.pro.push_back(0.0);
  long double pro_sum = 0.0L;  // sum over regions of covered fractions, accumulated pixel by pixel
  uint64_t false_positives = 0;
  double prev_fpr = 0.0, prev_pro = 0.0, area = 0.0;
  size_t i = packed.size();
  while (i > 0) {
    const uint32_t key = key_of(packed[i - 1]);
    while (i > 0 && key_of(packed[i - 1]) == key) {
      const uint32_t region = payload_of(packed[i - 1]);
      if (region == 0)
        ++false_positives;
      else
        pro_sum += inverse_size[region];
      --i;
    }
    const double fpr = static_cast<double>(false_positives) / static_cast<double>(normal_pixels);
    const double pro = static_cast<double>(pro_sum / static_cast<long double>(regions));
    if (fpr > fpr_limit) {
      const double pro_at_limit = prev_pro + (pro - prev_pro) * (fpr_limit - prev_fpr) / (fpr - prev_fpr);
      area += (fpr_limit - prev_fpr) * (pro_at_limit + prev_pro) / 2.0;
      curve.fpr.push_back(fpr_limit);
      curve.pro.push_back(pro_at_limit);
      break;
    }
    area += (fpr - prev_fpr) * (pro + prev_pro) / 2.0;
    if (max_points == 0 || fpr - curve.fpr.back() >= fpr_limit / static_cast<double>(max_points)) {
      curve.fpr.push_back(fpr);
      curve.pro.push_back(pro);
    }
    prev_fpr = fpr;
    prev_pro = pro;
  }
  curve.aupro = area / fpr_limit;
  return curve;
}

double aupro(const std::vector<cv::Mat>& anomaly_maps, const std::vector<cv::Mat>& masks, double fpr_limit) {
  return pro_curve(anomaly_maps, masks, fpr_limit).aupro;
}

PrMetrics precision_recall(const float* scores, const uint8_t* labels, size_t n, size_t max_points) {
  const SortedLabels s = sort_labelled(scores, labels, n, "precision_recall");
  size_t points = 0;  // distinct scores
  for (size_t i = 0; i < s.packed.size(); ++i) points += i == 0 || key_of(s.packed[i]) != key_of(s.packed[i - 1]);
  const size_t step = max_points == 0 || points <= max_points ? 1 : (points + max_points - 1) / max_points;

  // From the highest threshold down, so recall grows; sklearn's arrays run the other way and are reversed at the
  // end. Among equal F1s the lower threshold wins, which comes later here.
  PrMetrics m;
  m.f1_max.f1 = -1.0;
  double previous_recall = 0.0;
  size_t index = 0;
  for_each_threshold(s.packed, [&](uint64_t tp, uint64_t fp, uint32_t key) {
    const double precision = static_cast<double>(tp) / static_cast<double>(tp + fp);
    const double recall = static_cast<double>(tp) / static_cast<double>(s.positives);
    const double threshold = key_score(key);
    m.aupr += (recall - previous_recall) * precision;
    previous_recall = recall;
    const double f1 = 2.0 * precision * recall / (precision + recall + 1e-10);
    if (f1 >= m.f1_max.f1) m.f1_max = {f1, precision, recall, threshold};
    if (index % step == 0 || index + 1 == points) {
      m.curve.precision.push_back(precision);
      m.curve.recall.push_back(recall);
      m.curve.thresholds.push_back(threshold);
    }
    ++index;
  });
  std::reverse(m.curve.precision.begin(), m.curve.precision.end());
  std::reverse(m.curve.recall.begin(), m.curve.recall.end());
  std::reverse(m.curve.thresholds.begin(), m.curve.thresholds.end());
  m.curve.precision.push_back(1.0);
  m.curve.recall.push_back(0.0);
  return m;
}

double quantile(std::vector<float> values, double q) {
  if (values.empty()) throw std::invalid_argument("quantile: no values");
  if (!(q >= 0.0 && q <= 1.0)) throw std::invalid_argument("quantile: q must be in [0, 1], got " + std::to_string(q));
  for (float v : values)
    if (!std::isfinite(v)) throw std::invalid_argument("quantile: values must be finite");
  const double position = q * static_cast<double>(values.size() - 1);
  const size_t below = static_cast<size_t>(position);
  std::nth_element(values.begin(), values.begin() + static_cast<std::ptrdiff_t>(below), values.end());
  const float low = values[below];
  if (below + 1 >= values.size()) return low;
  const float high = *std::min_element(values.begin() + static_cast<std::ptrdiff_t>(below) + 1, values.end());
  // numpy's _lerp on float32 values: the difference in float32, then a + diff * t, or b - diff * (1 - t) from
  // t = 0.5 on.
  const double t = position - static_cast<double>(below);
  const double diff = high - low;
  return t >= 0.5 ? high - diff * (1.0 - t) : low + diff * t;
}

}  // namespace patchcore

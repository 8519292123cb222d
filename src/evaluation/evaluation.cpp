#include "patchcore/evaluation/evaluation.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <limits>
#include <stdexcept>

#include "patchcore/segmentation/view_map.h"

namespace patchcore {
namespace {

cv::Mat binarise(const cv::Mat& resampled, MaskRule rule) {
  cv::Mat labels;
  // 0.5 · 255 = 127.5, so "at least half" is byte >= 128.
  cv::compare(resampled, rule == MaskRule::kHalf ? 127 : 254, labels, cv::CMP_GT);
  return labels / 255;
}

// Whether the pixel metrics may count an image: good images are all normal, defective ones need their mask.
bool has_known_pixels(const EvaluatedImage& image) { return !image.mask.empty(); }

bool has_defect_pixels(const EvaluatedImage& image) {
  return has_known_pixels(image) && cv::countNonZero(image.mask) > 0;
}

// The images of `images` that `keep` accepts.
template <typename Keep>
std::vector<const EvaluatedImage*> select(const std::vector<const EvaluatedImage*>& images, Keep keep) {
  std::vector<const EvaluatedImage*> kept;
  for (const auto* image : images)
    if (keep(*image)) kept.push_back(image);
  return kept;
}

// The pixel metrics' inputs from images with known pixels: every pixel's score and label flattened in image order,
// or the maps and masks whole.
void gather_pixels(const std::vector<const EvaluatedImage*>& images, std::vector<float>& scores,
                   std::vector<uint8_t>& labels) {
  scores.clear();
  labels.clear();
  for (const auto* image : images) {
    const cv::Mat map = image->anomaly_map.isContinuous() ? image->anomaly_map : image->anomaly_map.clone();
    const cv::Mat mask = image->mask.isContinuous() ? image->mask : image->mask.clone();
    scores.insert(scores.end(), map.ptr<float>(), map.ptr<float>() + map.total());
    labels.insert(labels.end(), mask.ptr<uint8_t>(), mask.ptr<uint8_t>() + mask.total());
  }
}

void gather_maps(const std::vector<const EvaluatedImage*>& images, std::vector<cv::Mat>& maps,
                 std::vector<cv::Mat>& masks) {
  maps.clear();
  masks.clear();
  for (const auto* image : images) maps.push_back(image->anomaly_map), masks.push_back(image->mask);
}

// Plots and reports need no more points than this; a pixel curve can have millions.
constexpr size_t kCurvePoints = 4096;

// At most about kCurvePoints of a ROC curve's points, evenly by index, with both ends.
void thin(RocCurve& roc) {
  const size_t n = roc.fpr.size();
  if (n <= kCurvePoints) return;
  const size_t step = (n + kCurvePoints - 1) / kCurvePoints;
  for (std::vector<double>* column : {&roc.fpr, &roc.tpr, &roc.thresholds}) {
    std::vector<double> kept;
    for (size_t i = 0; i < n; i += step) kept.push_back((*column)[i]);
    if ((n - 1) % step != 0) kept.push_back(column->back());
    column->swap(kept);
  }
}

ScoreMetrics score_metrics(const std::vector<float>& scores, const std::vector<uint8_t>& labels) {
  ScoreMetrics m;
  m.auroc = auroc(scores, labels);
  m.roc = roc_curve(scores.data(), labels.data(), scores.size());
  thin(m.roc);
  PrMetrics pr = precision_recall(scores.data(), labels.data(), scores.size(), kCurvePoints);
  m.aupr = pr.aupr;
  m.f1_max = pr.f1_max;
  m.pr = std::move(pr.curve);
  return m;
}

ConfusionMatrix confusion(const std::vector<float>& scores, const std::vector<uint8_t>& labels, const Threshold& t) {
  ConfusionMatrix c;
  c.threshold = t.value;
  for (size_t i = 0; i < scores.size(); ++i) {
    const bool flagged = t.is_anomalous(scores[i]);
    if (labels[i])
      ++(flagged ? c.true_positives : c.false_negatives);
    else
      ++(flagged ? c.false_positives : c.true_negatives);
  }
  return c;
}

}  // namespace

cv::Mat to_mat(const at::Tensor& map) {
  const at::Tensor m = map.to(at::kCPU, at::kFloat).contiguous();
  return cv::Mat(static_cast<int>(m.size(0)), static_cast<int>(m.size(1)), CV_32F, m.data_ptr<float>()).clone();
}

std::pair<float, float> value_range(const std::vector<cv::Mat>& anomaly_maps) {
  if (anomaly_maps.empty()) throw std::invalid_argument("value_range: no maps");
  double lo = std::numeric_limits<double>::max(), hi = std::numeric_limits<double>::lowest();
  for (const auto& m : anomaly_maps) {
    double a, b;
    cv::minMaxLoc(m, &a, &b);
    lo = std::min(lo, a);
    hi = std::max(hi, b);
  }
  return {static_cast<float>(lo), static_cast<float>(hi)};
}

void require_both_classes(const std::vector<Sample>& samples, const std::string& what) {
  size_t defective = 0;
  for (const auto& s : samples) defective += s.is_anomalous;
  if (defective == 0)
    throw std::invalid_argument(what + " holds only good images: its metrics need defective images too");
  if (defective == samples.size())
    throw std::invalid_argument(what + " holds no good image: its metrics need good images too");
}

std::vector<EvaluatedImage> score_samples(const std::vector<const PatchCore*>& members,
                                          const std::vector<Sample>& samples, const EvaluationOptions& options,
                                          const ProgressCallback& progress) {
  if (members.empty()) throw std::invalid_argument("score_samples: no model");
  if (options.batch_size < 1) throw std::invalid_argument("score_samples: batch size must be at least 1");
  const ImageTransform& transform = members.front()->params().transform;
  // Per member beyond the first: its raw scores and maps, combined with the first's after the loop.
  std::vector<std::vector<float>> member_scores(members.size());
  std::vector<std::vector<cv::Mat>> member_maps(members.size());
  const bool original = options.coordinates == MapCoordinates::kOriginal;
  std::vector<cv::Size> original_sizes;
  std::vector<EvaluatedImage> images;
  for (size_t begin = 0; begin < samples.size(); begin += static_cast<size_t>(options.batch_size)) {
    const size_t end = std::min(samples.size(), begin + static_cast<size_t>(options.batch_size));
    std::vector<at::Tensor> batch;
    for (size_t i = begin; i < end; ++i) {
      batch.push_back(transform.load(samples[i].image_path, {}, &original_sizes.emplace_back()));
    }
    for (size_t m = 0; m < members.size(); ++m) {
      const PredictResult predicted = members[m]->predict(batch);
      for (size_t i = 0; i < predicted.scores.size(); ++i) {
        member_scores[m].push_back(predicted.scores[i]);
        member_maps[m].push_back(to_mat(predicted.masks[i]));
      }
    }
    for (size_t i = begin; i < end; ++i) {
      EvaluatedImage image;
      image.sample = samples[i];
      image.score = member_scores[0][i];
      image.anomaly_map = member_maps[0][i];
      if (!samples[i].is_anomalous) {
        image.mask = cv::Mat::zeros(original ? original_sizes[i] : image.anomaly_map.size(), CV_8U);
      } else if (!samples[i].mask_path.empty() && original) {
        image.mask = binarise(load_mask(samples[i].mask_path), MaskRule::kHalf);
        if (image.mask.size() != original_sizes[i])
          throw ImageError(samples[i].mask_path + ": the mask is " + std::to_string(image.mask.cols) + "x" +
                           std::to_string(image.mask.rows) + ", its image " + samples[i].image_path + " is " +
                           std::to_string(original_sizes[i].width) + "x" + std::to_string(original_sizes[i].height));
      } else if (!samples[i].mask_path.empty()) {
        image.mask = binarise(transform.load_mask(samples[i].mask_path), options.mask_rule);
      }
      images.push_back(std::move(image));
    }
    if (progress) progress("scoring images", end, samples.size());
  }
  if (members.size() > 1) {
    for (auto& image : images) {
      image.score = 0.f;
      // A new matrix: assigning zeros would write them into the first member's map, which it shares.
      image.anomaly_map = cv::Mat(image.anomaly_map.size(), CV_32F, cv::Scalar(0));
    }
    for (size_t m = 0; m < members.size(); ++m) {
      const auto [low, high] = std::minmax_element(member_scores[m].begin(), member_scores[m].end());
      const float score_low = *low, score_range = *high - *low;
      const std::pair<float, float> map_range = value_range(member_maps[m]);
      const float weight = 1.0f / static_cast<float>(members.size());
      for (size_t i = 0; i < images.size(); ++i) {
        images[i].score += (member_scores[m][i] - score_low) / score_range * weight;
        images[i].anomaly_map += (member_maps[m][i] - map_range.first) / (map_range.second - map_range.first) * weight;
      }
    }
  }
  if (original && !images.empty()) {
    std::vector<cv::Mat> maps;
    for (const auto& image : images) maps.push_back(image.anomaly_map);
    const float lowest = value_range(maps).first;
    for (size_t i = 0; i < images.size(); ++i)
      images[i].anomaly_map = map_to_original(images[i].anomaly_map, transform, original_sizes[i], lowest);
  }
  return images;
}

EvaluationResult evaluate(const PatchCore& model, const std::vector<Sample>& test_set, const EvaluationOptions& options,
                          const ProgressCallback& progress) {
  return evaluate(std::vector<const PatchCore*>{&model}, test_set, options, progress);
}

EvaluationResult evaluate(const std::vector<const PatchCore*>& members, const std::vector<Sample>& test_set,
                          const EvaluationOptions& options, const ProgressCallback& progress) {
  if (members.empty()) throw std::invalid_argument("evaluate: no model");
  if (test_set.empty()) throw std::invalid_argument("evaluate: the test set is empty");
  require_both_classes(test_set, "the test set");
  EvaluationResult result;
  const auto start = std::chrono::steady_clock::now();
  result.images = score_samples(members, test_set, options, progress);
  result.coordinates = options.coordinates;
  const auto elapsed = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  result.ms_per_image = elapsed / static_cast<double>(test_set.size());
  const Calibration* calibration = members.size() == 1 ? &members.front()->calibration() : nullptr;

  std::vector<float> scores;
  std::vector<uint8_t> labels;
  for (const auto& image : result.images) {
    scores.push_back(image.score);
    labels.push_back(image.sample.is_anomalous ? 1 : 0);
  }
  result.image = score_metrics(scores, labels);
  if (calibration && calibration->image) result.image_confusion = confusion(scores, labels, *calibration->image);

  std::vector<const EvaluatedImage*> all;
  for (const auto& image : result.images) all.push_back(&image);
  const auto known = select(all, has_known_pixels);
  const size_t with_mask = select(known, [](const EvaluatedImage& i) { return i.sample.is_anomalous; }).size();
  const size_t without_mask = select(all, [](const EvaluatedImage& i) { return !has_known_pixels(i); }).size();
  const auto defective = select(known, has_defect_pixels);
  result.pixel_metrics = !defective.empty();
  std::vector<cv::Mat> maps, masks;
  if (!result.pixel_metrics) {
    result.pixel_note = with_mask ? "the masks of the defective images mark no defect pixel: image metrics only"
                                  : "no defective image has a mask (ground_truth/<defect>/<name>_mask.png): image "
                                    "metrics only";
  } else {
    result.pixel_note = "over the good images and the " + std::to_string(with_mask) + " defective images with masks";
    if (without_mask)
      result.pixel_note += "; " + std::to_string(without_mask) + " defective images without masks are left out";
    gather_pixels(known, scores, labels);
    result.pixel = score_metrics(scores, labels);
    if (calibration && calibration->pixel) result.pixel_confusion = confusion(scores, labels, *calibration->pixel);
    gather_pixels(defective, scores, labels);
    result.pixel_auroc_defective = auroc(scores, labels);
    gather_maps(known, maps, masks);
    result.pro = pro_curve(maps, masks, options.fpr_limit, kCurvePoints);
  }

  // Per defect type, in the test set's order; each defect type is measured against all good images.
  std::vector<std::string> order;
  for (const auto* image : all)
    if (std::find(order.begin(), order.end(), image->sample.defect_type) == order.end())
      order.push_back(image->sample.defect_type);
  const auto good = select(all, [](const EvaluatedImage& i) { return !i.sample.is_anomalous; });
  for (const std::string& type : order) {
    const auto group = select(all, [&](const EvaluatedImage& i) { return i.sample.defect_type == type; });
    DefectTypeMetrics d;
    d.defect_type = type;
    d.images = static_cast<int64_t>(group.size());
    for (const auto* image : group) d.mean_score += image->score / static_cast<double>(group.size());
    if (calibration && calibration->image) {
      d.flagged = 0;
      for (const auto* image : group) *d.flagged += calibration->image->is_anomalous(image->score);
    }
    if (type != "good" && !good.empty()) {
      std::vector<const EvaluatedImage*> subset = good;
      subset.insert(subset.end(), group.begin(), group.end());
      scores.clear();
      labels.clear();
      for (const auto* image : subset) scores.push_back(image->score), labels.push_back(image->sample.is_anomalous);
      d.image_auroc = auroc(scores, labels);
      if (!select(group, has_defect_pixels).empty()) {
        const auto pixels = select(subset, has_known_pixels);
        gather_pixels(pixels, scores, labels);
        d.pixel_auroc = auroc(scores, labels);
        gather_maps(pixels, maps, masks);
        d.aupro = aupro(maps, masks, options.fpr_limit);
      }
    }
    result.defect_types.push_back(d);
  }
  return result;
}

}  // namespace patchcore

#include "patchcore/evaluation/evaluation.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <limits>
#include <stdexcept>

namespace patchcore {
namespace {

cv::Mat binarise(const cv::Mat& resampled, MaskRule rule) {
  cv::Mat labels;
  // 0.5 · 255 = 127.5, so "at least half" is byte >= 128.
  cv::compare(resampled, rule == MaskRule::kHalf ? 127 : 254, labels, cv::CMP_GT);
  return labels / 255;
}

// Scores and labels of all pixels of the given images, flattened in image order.
void gather_pixels(const std::vector<EvaluatedImage>& images, bool defective_only, std::vector<float>& scores,
                   std::vector<uint8_t>& labels) {
  scores.clear();
  labels.clear();
  for (const auto& image : images) {
    if (defective_only && cv::countNonZero(image.mask) == 0) continue;
    const cv::Mat map = image.anomaly_map.isContinuous() ? image.anomaly_map : image.anomaly_map.clone();
    const cv::Mat mask = image.mask.isContinuous() ? image.mask : image.mask.clone();
    scores.insert(scores.end(), map.ptr<float>(), map.ptr<float>() + map.total());
    labels.insert(labels.end(), mask.ptr<uint8_t>(), mask.ptr<uint8_t>() + mask.total());
  }
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

EvaluationResult evaluate(const PatchCore& model, const std::vector<Sample>& test_set, const EvaluationOptions& options,
                          const ProgressCallback& progress) {
  return evaluate(std::vector<const PatchCore*>{&model}, test_set, options, progress);
}

EvaluationResult evaluate(const std::vector<const PatchCore*>& members, const std::vector<Sample>& test_set,
                          const EvaluationOptions& options, const ProgressCallback& progress) {
  if (members.empty()) throw std::invalid_argument("evaluate: no model");
  if (test_set.empty()) throw std::invalid_argument("evaluate: the test set is empty");
  if (options.batch_size < 1) throw std::invalid_argument("evaluate: batch size must be at least 1");
  const ImageTransform& transform = members.front()->params().transform;
  // Per member beyond the first: its raw scores and maps, combined with the first's after the loop.
  std::vector<std::vector<float>> member_scores(members.size());
  std::vector<std::vector<cv::Mat>> member_maps(members.size());
  const int crop = transform.crop;
  EvaluationResult result;
  const auto start = std::chrono::steady_clock::now();
  for (size_t begin = 0; begin < test_set.size(); begin += static_cast<size_t>(options.batch_size)) {
    const size_t end = std::min(test_set.size(), begin + static_cast<size_t>(options.batch_size));
    std::vector<at::Tensor> batch;
    for (size_t i = begin; i < end; ++i) batch.push_back(transform.load(test_set[i].image_path));
    const at::Tensor images = at::stack(batch);
    for (size_t m = 0; m < members.size(); ++m) {
      const PredictResult predicted = members[m]->predict(images);
      for (size_t i = 0; i < predicted.scores.size(); ++i) {
        member_scores[m].push_back(predicted.scores[i]);
        member_maps[m].push_back(to_mat(predicted.masks[i]));
      }
    }
    for (size_t i = begin; i < end; ++i) {
      EvaluatedImage image;
      image.sample = test_set[i];
      image.score = member_scores[0][i];
      image.anomaly_map = member_maps[0][i];
      image.mask = test_set[i].mask_path.empty()
                       ? cv::Mat::zeros(crop, crop, CV_8U)
                       : binarise(transform.load_mask(test_set[i].mask_path), options.mask_rule);
      result.images.push_back(std::move(image));
    }
    if (progress) progress("evaluating test images", end, test_set.size());
  }
  const auto elapsed = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  result.ms_per_image = elapsed / static_cast<double>(test_set.size());
  if (members.size() > 1) {
    for (auto& image : result.images) {
      image.score = 0.f;
      // A new matrix: assigning zeros would write them into the first member's map, which it shares.
      image.anomaly_map = cv::Mat(image.anomaly_map.size(), CV_32F, cv::Scalar(0));
    }
    for (size_t m = 0; m < members.size(); ++m) {
      const auto [low, high] = std::minmax_element(member_scores[m].begin(), member_scores[m].end());
      const float score_low = *low, score_range = *high - *low;
      const std::pair<float, float> map_range = value_range(member_maps[m]);
      const float weight = 1.0f / static_cast<float>(members.size());
      for (size_t i = 0; i < result.images.size(); ++i) {
        result.images[i].score += (member_scores[m][i] - score_low) / score_range * weight;
        result.images[i].anomaly_map +=
            (member_maps[m][i] - map_range.first) / (map_range.second - map_range.first) * weight;
      }
    }
  }

  std::vector<float> scores;
  std::vector<uint8_t> labels;
  for (const auto& image : result.images) {
    scores.push_back(image.score);
    labels.push_back(image.sample.is_anomalous ? 1 : 0);
  }
  result.image_auroc = auroc(scores, labels);
  result.image_roc = roc_curve(scores.data(), labels.data(), scores.size());
  gather_pixels(result.images, false, scores, labels);
  result.pixel_auroc = auroc(scores, labels);
  result.pixel_roc = roc_curve(scores.data(), labels.data(), scores.size());
  gather_pixels(result.images, true, scores, labels);
  result.pixel_auroc_defective = auroc(scores, labels);
  std::vector<cv::Mat> maps, masks;
  for (const auto& image : result.images) {
    maps.push_back(image.anomaly_map);
    masks.push_back(image.mask);
  }
  result.aupro = aupro(maps, masks, options.fpr_limit);
  return result;
}

}  // namespace patchcore

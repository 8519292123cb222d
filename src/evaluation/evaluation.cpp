#include "patchcore/evaluation/evaluation.h"

#include <ATen/ATen.h>

#include <chrono>
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

EvaluationResult evaluate(const PatchCore& model, const std::vector<Sample>& test_set, const EvaluationOptions& options,
                          const ProgressCallback& progress) {
  if (test_set.empty()) throw std::invalid_argument("evaluate: the test set is empty");
  if (options.batch_size < 1) throw std::invalid_argument("evaluate: batch size must be at least 1");
  const ImageTransform& transform = model.params().transform;
  const int crop = transform.crop;
  EvaluationResult result;
  const auto start = std::chrono::steady_clock::now();
  for (size_t begin = 0; begin < test_set.size(); begin += static_cast<size_t>(options.batch_size)) {
    const size_t end = std::min(test_set.size(), begin + static_cast<size_t>(options.batch_size));
    std::vector<at::Tensor> batch;
    for (size_t i = begin; i < end; ++i) batch.push_back(transform.load(test_set[i].image_path));
    const PredictResult predicted = model.predict(at::stack(batch));
    for (size_t i = begin; i < end; ++i) {
      EvaluatedImage image;
      image.sample = test_set[i];
      image.score = predicted.scores[i - begin];
      image.anomaly_map = to_mat(predicted.masks[i - begin]);
      image.mask = test_set[i].mask_path.empty()
                       ? cv::Mat::zeros(crop, crop, CV_8U)
                       : binarise(transform.load_mask(test_set[i].mask_path), options.mask_rule);
      result.images.push_back(std::move(image));
    }
    if (progress) progress("evaluating test images", end, test_set.size());
  }
  const auto elapsed = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  result.ms_per_image = elapsed / static_cast<double>(test_set.size());

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

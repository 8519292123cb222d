#pragma once
// What predict and evaluate leave for people and scripts: heatmap overlays and ROC plots as PNG, raw maps as .npy,
// scores as CSV and JSON.
#include <opencv2/core.hpp>

#include <fstream>
#include <map>

#include <string>
#include <utility>
#include <vector>

#include "patchcore/core/output_dir.h"
#include "patchcore/evaluation/evaluation.h"
#include "patchcore/evaluation/metrics.h"
#include "patchcore/patchcore.h"

namespace patchcore {

// The anomaly map (CV_32F) scaled from [vmin, vmax] to a JET colour map and blended over the RGB image
// (CV_8UC3, same size). Returns BGR for writing.
cv::Mat heatmap_overlay(const cv::Mat& rgb, const cv::Mat& anomaly_map, float vmin, float vmax, double alpha = 0.5);
// A ROC curve with its diagonal, axes and the AUROC in the title.
cv::Mat plot_roc(const RocCurve& roc, double auroc, const std::string& title, int size = 480);
// Encodes to PNG (8-bit BGR/gray or 16-bit gray) and writes it atomically; throws naming the path.
void write_png(const std::string& path, const cv::Mat& image);
// The map scaled from [vmin, vmax] to 0..65535, for tools that read raw maps as 16-bit PNG.
cv::Mat to_uint16(const cv::Mat& anomaly_map, float vmin, float vmax);
// A CSV field, quoted when it holds a comma, a quote or a line break.
std::string csv_field(const std::string& s);
// The crop of the image file that a model with this transform sees, as RGB, for overlays.
cv::Mat model_view(const ImageTransform& transform, const std::string& image_path);

// What predict leaves in its output directory, written as each image is scored, so that memory stays flat however
// many images there are and a stopped run keeps what it finished:
//   <stem>_overlay.png  the heatmap over the view the model saw, coloured from 0 to vmax
//   <stem>_map.npy      the raw map, float32, squared-L2 units
//   scores.csv          image,score,overlay,map,error: a row per image, appended and flushed when it is scored;
//                       an unreadable file gets its error and empty other fields
//   summary.json        counts, the colour scale and the time per image, at the end
// Images with the same file name get _1, _2, ... after their stem.
class PredictionWriter {
 public:
  PredictionWriter(OutputDirectory& out, const ImageTransform& transform, float vmax);
  void add(const std::string& image_path, float score, const at::Tensor& anomaly_map);
  void add_failure(const std::string& image_path, const std::string& error);
  void finish(double ms_per_image, const std::string& model_dir);
  size_t scored() const { return scored_; }
  size_t failed() const { return failed_; }

 private:
  std::string unique_stem(const std::string& image_path);
  void append_row(const std::string& row);

  OutputDirectory& out_;
  ImageTransform transform_;
  float vmax_;
  std::ofstream csv_;
  std::map<std::string, int> stems_;
  size_t scored_ = 0, failed_ = 0;
};

// The metrics of an evaluation as JSON text, with what they were computed from.
std::string evaluation_metrics_json(const EvaluationResult& result, const std::string& model_dir,
                                    const std::string& data, const std::string& mask_rule);
// An evaluation report in the directory `dir`, written whole or not at all: overlays/ (heatmap with the ground
// truth's outline, one colour scale for all), scores.csv, roc_image.png, roc_pixel.png and metrics.json
// (`metrics_json`).
void write_evaluation_report(const std::string& dir, const ImageTransform& transform, const EvaluationResult& result,
                             const std::string& metrics_json, const ProgressCallback& progress = {});

}  // namespace patchcore

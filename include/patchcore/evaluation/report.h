#pragma once
// What predict and evaluate leave for people and scripts: overlays and defect masks on the original images, raw
// maps as .npy, curves as PNG, scores as CSV and JSON, and evaluate's self-contained report.html.
#include <opencv2/core.hpp>

#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "patchcore/core/output_dir.h"
#include "patchcore/evaluation/evaluation.h"
#include "patchcore/evaluation/metrics.h"
#include "patchcore/patchcore.h"

namespace patchcore {

// Map values shown from cold (vmin) to hot (vmax).
struct ColourScale {
  float vmin = 0, vmax = 1;
};

// The colour scale a model gives its maps, so that the same value looks the same in every run: with a pixel
// threshold, anomalib's normalised range (the threshold in the middle of the scale); otherwise 0 to twice the
// highest score of its training patches, so that what looks like the training data stays in the cold half; none
// when the model records neither (a model the published code saved).
std::optional<ColourScale> model_colour_scale(const PatchCore& model);

// The anomaly map (CV_32F) coloured with JET over `scale` and blended over the RGB image (CV_8UC3, same size).
// Returns BGR for writing.
cv::Mat heatmap_overlay(const cv::Mat& rgb, const cv::Mat& anomaly_map, ColourScale scale, double alpha = 0.5);
// The same on the original image from a map put back on it (map_to_original, view_map.h): the part the model never
// saw is dimmed and the view outlined.
cv::Mat original_overlay(const cv::Mat& rgb_original, const cv::Mat& original_map, const ImageTransform& transform,
                         ColourScale scale);

// A curve in a square plot: axes from 0 to x_max and 0 to 1, optionally the diagonal, the title above.
struct Plot {
  std::string title, x_label, y_label;
  double x_max = 1.0;
  bool diagonal = false;
};
cv::Mat plot_curve(const std::vector<double>& x, const std::vector<double>& y, const Plot& plot, int size = 480);

// A predicted map (PredictResult::masks, in the model's view) put onto the original image of size `original`, CV_32F;
// outside the view, the map's lowest value: what predict writes as <stem>_map.npy and colours in its overlays.
cv::Mat prediction_map_on_original(const at::Tensor& anomaly_map, const ImageTransform& transform, cv::Size original);

// One image's result as a JSON object, as predict --json and --stdin print it and the service answers it: image and
// score, for a model with an image threshold its normalized_score and label (OK or NG), and ms.
std::string prediction_json(const std::string& image, float score, const std::optional<Threshold>& threshold,
                            double ms);
// A calibration's thresholds as a JSON object, as summary.json records them: image_threshold and pixel_threshold
// (value, method, the images it rests on), null where absent.
std::string thresholds_json(const Calibration& calibration);

// PNG bytes of an 8-bit BGR/gray or 16-bit gray image; throws naming `name` when it cannot be encoded.
std::vector<uchar> encode_png(const cv::Mat& image, const std::string& name);
// Standard base64 (RFC 4648, padded), for images inside HTML and JSON.
std::string base64(std::string_view bytes);

// Encodes to PNG (8-bit BGR/gray or 16-bit gray) and writes it atomically; throws naming the path.
void write_png(const std::string& path, const cv::Mat& image);
// A CSV field, quoted when it holds a comma, a quote or a line break.
std::string csv_field(const std::string& s);

// What predict leaves in its output directory, written as each image is scored, so that memory stays flat however
// many images there are and a stopped run keeps what it finished. Everything is in the original image's pixels:
//   <stem>_overlay.png  the heatmap over the image, coloured by the scale given
//   <stem>_mask.png     the defect mask (255 = defect) at the model's pixel threshold, where it has one
//   <stem>_map.npy      the raw map, float32, squared-L2 units; outside the model's view, the map's lowest value
//   scores.csv          image,score,normalized_score,label,overlay,mask,map,error: a row per image, appended and
//                       flushed when it is scored; normalized_score and label (OK or NG) where the model has an
//                       image threshold; an unreadable file gets its error and empty other fields
//   summary.json        counts, thresholds, the colour scale and the time per image, at the end
// Images with the same file name get _1, _2, ... after their stem.
class PredictionWriter {
 public:
  PredictionWriter(OutputDirectory& out, const ImageTransform& transform, const Calibration& calibration,
                   ColourScale scale);
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
  Calibration calibration_;
  ColourScale scale_;
  std::ofstream csv_;
  std::map<std::string, int> stems_;
  size_t scored_ = 0, failed_ = 0, flagged_ = 0;
};

// The metrics of an evaluation as JSON text, with what they were computed from.
std::string evaluation_metrics_json(const EvaluationResult& result, const std::string& model_dir,
                                    const std::string& data, const std::string& mask_rule);
// An evaluation report in the directory `dir`, written whole or not at all:
//   report.html         one self-contained page: metrics, per-defect table, confusion matrix, curves, and the worst
//                       false positives and false negatives with their overlays
//   overlays/           every test image's heatmap with the ground truth outlined, on the original image
//   scores.csv, per_defect.csv, metrics.json (`metrics_json`)
//   roc_image.png, pr_image.png, and where pixel metrics exist roc_pixel.png, pr_pixel.png, pro.png
// `model` gives the colour scale and thresholds: a single member's own, or for an ensemble the run's range.
void write_evaluation_report(const std::string& dir, const std::vector<const PatchCore*>& members,
                             const EvaluationResult& result, const std::string& metrics_json,
                             const ProgressCallback& progress = {});

}  // namespace patchcore

#include "patchcore/evaluation/report.h"

#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include <ATen/ATen.h>
#include <cstdio>

#include <filesystem>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <vector>

#include "patchcore/core/file.h"
#include "patchcore/io/image.h"
#include "patchcore/io/npy.h"

namespace patchcore {

cv::Mat heatmap_overlay(const cv::Mat& rgb, const cv::Mat& anomaly_map, float vmin, float vmax, double alpha) {
  if (rgb.type() != CV_8UC3 || anomaly_map.type() != CV_32F || rgb.size() != anomaly_map.size())
    throw std::invalid_argument("heatmap_overlay: needs an 8-bit RGB image and a float map of the same size");
  cv::Mat scaled, colour, bgr, blended;
  const double range = vmax > vmin ? vmax - vmin : 1.0;
  anomaly_map.convertTo(scaled, CV_8U, 255.0 / range, -vmin * 255.0 / range);
  cv::applyColorMap(scaled, colour, cv::COLORMAP_JET);
  cv::cvtColor(rgb, bgr, cv::COLOR_RGB2BGR);
  cv::addWeighted(bgr, 1.0 - alpha, colour, alpha, 0.0, blended);
  return blended;
}

cv::Mat plot_roc(const RocCurve& roc, double auroc, const std::string& title, int size) {
  const int margin = 50;
  const int side = size - 2 * margin;
  cv::Mat canvas(size, size, CV_8UC3, cv::Scalar(255, 255, 255));
  auto point = [&](double fpr, double tpr) {
    return cv::Point(margin + static_cast<int>(fpr * side), size - margin - static_cast<int>(tpr * side));
  };
  cv::rectangle(canvas, point(0, 0), point(1, 1), cv::Scalar(0, 0, 0), 1);
  cv::line(canvas, point(0, 0), point(1, 1), cv::Scalar(180, 180, 180), 1, cv::LINE_AA);
  for (int t = 0; t <= 4; ++t) {
    char label[8];
    std::snprintf(label, sizeof label, "%.2f", t / 4.0);
    cv::putText(canvas, label, point(t / 4.0, 0) + cv::Point(-14, 18), cv::FONT_HERSHEY_SIMPLEX, 0.35,
                cv::Scalar(0, 0, 0));
    cv::putText(canvas, label, point(0, t / 4.0) + cv::Point(-40, 4), cv::FONT_HERSHEY_SIMPLEX, 0.35,
                cv::Scalar(0, 0, 0));
  }
  // A curve with millions of points draws the same as one thinned to a point per pixel column change.
  std::vector<cv::Point> curve;
  for (size_t i = 0; i < roc.fpr.size(); ++i) {
    const cv::Point p = point(roc.fpr[i], roc.tpr[i]);
    if (curve.empty() || curve.back() != p) curve.push_back(p);
  }
  cv::polylines(canvas, curve, false, cv::Scalar(200, 80, 0), 2, cv::LINE_AA);
  char heading[160];
  std::snprintf(heading, sizeof heading, "%s  AUROC %.4f", title.c_str(), auroc);
  cv::putText(canvas, heading, cv::Point(margin, 30), cv::FONT_HERSHEY_SIMPLEX, 0.5, cv::Scalar(0, 0, 0), 1,
              cv::LINE_AA);
  cv::putText(canvas, "false positive rate", cv::Point(size / 2 - 60, size - 12), cv::FONT_HERSHEY_SIMPLEX, 0.4,
              cv::Scalar(0, 0, 0));
  return canvas;
}

void write_png(const std::string& path, const cv::Mat& image) {
  std::vector<uchar> bytes;
  if (image.empty() || !cv::imencode(".png", image, bytes)) throw std::runtime_error(path + ": cannot encode PNG");
  write_file_atomically(path, std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
}

cv::Mat to_uint16(const cv::Mat& anomaly_map, float vmin, float vmax) {
  cv::Mat out;
  const double range = vmax > vmin ? vmax - vmin : 1.0;
  anomaly_map.convertTo(out, CV_16U, 65535.0 / range, -vmin * 65535.0 / range);
  return out;
}

std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n\r") == std::string::npos) return s;
  std::string quoted = "\"";
  for (char c : s) quoted += c == '"' ? std::string("\"\"") : std::string(1, c);
  return quoted + "\"";
}

cv::Mat model_view(const ImageTransform& transform, const std::string& image_path) {
  return transform.resize_and_crop(load_image_rgb(image_path));
}

PredictionWriter::PredictionWriter(OutputDirectory& out, const ImageTransform& transform, float vmax)
    : out_(out), transform_(transform), vmax_(vmax) {
  if (!(vmax > 0)) throw std::invalid_argument("PredictionWriter: the colour scale's top must be positive");
  const std::string path = out_.claim("scores.csv");
  csv_.open(path, std::ios::trunc);
  if (!csv_) throw std::runtime_error(path + ": cannot write");
  append_row("image,score,overlay,map,error");
}

std::string PredictionWriter::unique_stem(const std::string& image_path) {
  std::string stem = std::filesystem::path(image_path).stem().string();
  const int seen = stems_[stem]++;
  return seen ? stem + "_" + std::to_string(seen) : stem;
}

void PredictionWriter::append_row(const std::string& row) {
  // One write per row, flushed: a stopped run leaves whole rows.
  csv_ << row + "\n" << std::flush;
  if (!csv_) throw std::runtime_error(out_.dir() + "/scores.csv: write failed");
}

void PredictionWriter::add(const std::string& image_path, float score, const at::Tensor& anomaly_map) {
  const std::string stem = unique_stem(image_path);
  const std::string overlay = stem + "_overlay.png", raw = stem + "_map.npy";
  const cv::Mat map = to_mat(anomaly_map);
  write_png(out_.claim(overlay), heatmap_overlay(model_view(transform_, image_path), map, 0.f, vmax_));
  write_npy(out_.claim(raw), map.ptr<float>(), {map.rows, map.cols});
  char score_text[32];
  std::snprintf(score_text, sizeof score_text, "%.6f", score);
  append_row(csv_field(image_path) + "," + score_text + "," + overlay + "," + raw + ",");
  ++scored_;
}

void PredictionWriter::add_failure(const std::string& image_path, const std::string& error) {
  append_row(csv_field(image_path) + ",,,," + csv_field(error));
  ++failed_;
}

void PredictionWriter::finish(double ms_per_image, const std::string& model_dir) {
  const nlohmann::json summary = {
      {"model", model_dir}, {"images", scored_ + failed_}, {"scored", scored_}, {"failed", failed_}, {"vmin", 0.0},
      {"vmax", vmax_},      {"ms_per_image", ms_per_image}};
  write_file_atomically(out_.claim("summary.json"), summary.dump(2) + "\n");
}

std::string evaluation_metrics_json(const EvaluationResult& r, const std::string& model_dir, const std::string& data,
                                    const std::string& mask_rule) {
  const nlohmann::json metrics = {{"written_by", std::string("patchcore ") + version()},
                                  {"image_auroc", r.image_auroc},
                                  {"pixel_auroc", r.pixel_auroc},
                                  {"pixel_auroc_defective", r.pixel_auroc_defective},
                                  {"aupro", r.aupro},
                                  {"images", r.images.size()},
                                  {"ms_per_image", r.ms_per_image},
                                  {"model", model_dir},
                                  {"data", data},
                                  {"mask_rule", mask_rule}};
  return metrics.dump(2) + "\n";
}

void write_evaluation_report(const std::string& dir, const ImageTransform& transform, const EvaluationResult& r,
                             const std::string& metrics_json, const ProgressCallback& progress) {
  std::vector<cv::Mat> maps;
  for (const auto& image : r.images) maps.push_back(image.anomaly_map);
  const std::pair<float, float> range = value_range(maps);
  const float vmin = range.first, vmax = range.second;
  write_directory_atomically(dir, [&](const std::string& tmp) {
    std::filesystem::create_directory(tmp + "/overlays");
    std::string csv = "image,defect_type,label,score,overlay\n";
    for (size_t i = 0; i < r.images.size(); ++i) {
      const auto& image = r.images[i];
      const std::string overlay = "overlays/" + image.sample.defect_type + "_" +
                                  std::filesystem::path(image.sample.image_path).stem().string() + ".png";
      cv::Mat picture = heatmap_overlay(model_view(transform, image.sample.image_path), image.anomaly_map, vmin, vmax);
      // The ground-truth outline on top, so misses and false alarms are visible at a glance.
      std::vector<std::vector<cv::Point>> contours;
      cv::findContours(image.mask, contours, cv::RETR_EXTERNAL, cv::CHAIN_APPROX_SIMPLE);
      cv::drawContours(picture, contours, -1, cv::Scalar(255, 255, 255), 1, cv::LINE_AA);
      write_png(tmp + "/" + overlay, picture);
      csv += csv_field(image.sample.image_path) + "," + image.sample.defect_type + "," +
             (image.sample.is_anomalous ? "1" : "0") + "," + std::to_string(image.score) + "," + overlay + "\n";
      if (progress) progress("writing report", i + 1, r.images.size());
    }
    write_file_atomically(tmp + "/scores.csv", csv);
    write_png(tmp + "/roc_image.png", plot_roc(r.image_roc, r.image_auroc, "image ROC"));
    write_png(tmp + "/roc_pixel.png", plot_roc(r.pixel_roc, r.pixel_auroc, "pixel ROC"));
    write_file_atomically(tmp + "/metrics.json", metrics_json);
  });
}

}  // namespace patchcore

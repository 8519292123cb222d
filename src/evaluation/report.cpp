#include "patchcore/evaluation/report.h"

#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include <cstdio>
#include <fstream>
#include <limits>
#include <stdexcept>
#include <vector>

#include "patchcore/core/file.h"

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
  write_file_atomically(path, [&](const std::string& tmp) {
    std::ofstream out(tmp, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    if (!out) throw std::runtime_error(path + ": write failed");
  });
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

cv::Mat to_uint16(const cv::Mat& anomaly_map, float vmin, float vmax) {
  cv::Mat out;
  const double range = vmax > vmin ? vmax - vmin : 1.0;
  anomaly_map.convertTo(out, CV_16U, 65535.0 / range, -vmin * 65535.0 / range);
  return out;
}

}  // namespace patchcore

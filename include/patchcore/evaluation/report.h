#pragma once
// Pictures for people: heatmap overlays and ROC plots, written as PNG.
#include <opencv2/core.hpp>

#include <string>
#include <utility>
#include <vector>

#include "patchcore/evaluation/metrics.h"

namespace patchcore {

// The anomaly map (CV_32F) scaled from [vmin, vmax] to a JET colour map and blended over the RGB image
// (CV_8UC3, same size). Returns BGR for writing.
cv::Mat heatmap_overlay(const cv::Mat& rgb, const cv::Mat& anomaly_map, float vmin, float vmax, double alpha = 0.5);
// A ROC curve with its diagonal, axes and the AUROC in the title.
cv::Mat plot_roc(const RocCurve& roc, double auroc, const std::string& title, int size = 480);
// Encodes to PNG (8-bit BGR/gray or 16-bit gray) and writes it atomically; throws naming the path.
void write_png(const std::string& path, const cv::Mat& image);
// Lowest and highest value over all maps: one colour scale for a whole run, so images compare.
std::pair<float, float> value_range(const std::vector<cv::Mat>& anomaly_maps);
// The map scaled from [vmin, vmax] to 0..65535, for tools that read raw maps as 16-bit PNG.
cv::Mat to_uint16(const cv::Mat& anomaly_map, float vmin, float vmax);

}  // namespace patchcore

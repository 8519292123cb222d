#include "patchcore/evaluation/report.h"

#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
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
#include "patchcore/segmentation/view_map.h"

namespace patchcore {
namespace {

std::string number(double v, const char* format = "%.4f") {
  char text[48];
  std::snprintf(text, sizeof text, format, v);
  return text;
}

nlohmann::json optional_json(const std::optional<double>& v) { return v ? nlohmann::json(*v) : nlohmann::json(); }

nlohmann::json threshold_json(const std::optional<Threshold>& t) {
  if (!t) return nullptr;
  return {{"value", t->value},
          {"method", to_string(t->method)},
          {"good_images", t->good_images},
          {"defective_images", t->defective_images}};
}

nlohmann::json score_metrics_json(const ScoreMetrics& m) {
  return {{"auroc", m.auroc},
          {"aupr", m.aupr},
          {"f1_max", m.f1_max.f1},
          {"f1_max_threshold", m.f1_max.threshold},
          {"f1_max_precision", m.f1_max.precision},
          {"f1_max_recall", m.f1_max.recall}};
}

nlohmann::json confusion_json(const std::optional<ConfusionMatrix>& c) {
  if (!c) return nullptr;
  return {{"threshold", c->threshold},
          {"true_positives", c->true_positives},
          {"false_positives", c->false_positives},
          {"true_negatives", c->true_negatives},
          {"false_negatives", c->false_negatives}};
}

std::string html_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

// An <img> holding the PNG itself, so the page needs no other file.
std::string inline_png(const std::vector<uchar>& png, const std::string& alt, int width = 0) {
  return "<img alt=\"" + html_escape(alt) + "\"" + (width ? " width=\"" + std::to_string(width) + "\"" : "") +
         " src=\"data:image/png;base64," + base64(std::string_view(reinterpret_cast<const char*>(png.data()), png.size())) + "\">";
}

// The evaluation overlay: the heatmap on the original image with the ground truth's outline in white.
cv::Mat evaluation_overlay(const EvaluatedImage& image, const ImageTransform& transform, MapCoordinates coordinates,
                           ColourScale scale) {
  const cv::Mat rgb = load_image_rgb(image.sample.image_path);
  const cv::Mat map = coordinates == MapCoordinates::kOriginal
                          ? image.anomaly_map
                          : map_to_original(image.anomaly_map, transform, rgb.size(), scale.vmin);
  cv::Mat picture = original_overlay(rgb, map, transform, scale);
  if (!image.sample.mask_path.empty()) {
    cv::Mat truth = load_mask(image.sample.mask_path);
    if (truth.size() != picture.size()) cv::resize(truth, truth, picture.size(), 0, 0, cv::INTER_NEAREST);
    std::vector<std::vector<cv::Point>> contours;
    cv::findContours(truth > 0, contours, cv::RETR_EXTERNAL, cv::CHAIN_APPROX_SIMPLE);
    cv::drawContours(picture, contours, -1, cv::Scalar(255, 255, 255), 1, cv::LINE_AA);
  }
  return picture;
}

}  // namespace

std::string base64(std::string_view bytes) {
  static const char* kAlphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  for (size_t i = 0; i < bytes.size(); i += 3) {
    const uint32_t b = (uint32_t{static_cast<uint8_t>(bytes[i])} << 16) | (i + 1 < bytes.size() ? uint32_t{static_cast<uint8_t>(bytes[i + 1])} << 8 : 0) |
                       (i + 2 < bytes.size() ? uint32_t{static_cast<uint8_t>(bytes[i + 2])} : 0);
    out += kAlphabet[(b >> 18) & 63];
    out += kAlphabet[(b >> 12) & 63];
    out += i + 1 < bytes.size() ? kAlphabet[(b >> 6) & 63] : '=';
    out += i + 2 < bytes.size() ? kAlphabet[b & 63] : '=';
  }
  return out;
}

std::vector<uchar> encode_png(const cv::Mat& image, const std::string& name) {
  std::vector<uchar> bytes;
  if (image.empty() || !cv::imencode(".png", image, bytes)) throw std::runtime_error(name + ": cannot encode PNG");
  return bytes;
}

std::optional<ColourScale> model_colour_scale(const PatchCore& model) {
  if (const auto& pixel = model.calibration().pixel) {
    // anomalib's normalised 0 and 1: the threshold +- half the calibration's range.
    const double half = pixel->max > pixel->min ? (pixel->max - pixel->min) / 2 : std::max(1e-6, pixel->value);
    return ColourScale{static_cast<float>(pixel->value - half), static_cast<float>(pixel->value + half)};
  }
  const NormalScores& normal = model.normal_scores();
  if (normal.patches > 0 && normal.max > 0) return ColourScale{0.f, 2.0f * normal.max};
  return std::nullopt;
}

cv::Mat heatmap_overlay(const cv::Mat& rgb, const cv::Mat& anomaly_map, ColourScale scale, double alpha) {
  if (rgb.type() != CV_8UC3 || anomaly_map.type() != CV_32F || rgb.size() != anomaly_map.size())
    throw std::invalid_argument("heatmap_overlay: needs an 8-bit RGB image and a float map of the same size");
  cv::Mat scaled, colour, bgr, blended;
  const double range = scale.vmax > scale.vmin ? scale.vmax - scale.vmin : 1.0;
  anomaly_map.convertTo(scaled, CV_8U, 255.0 / range, -scale.vmin * 255.0 / range);
  cv::applyColorMap(scaled, colour, cv::COLORMAP_JET);
  cv::cvtColor(rgb, bgr, cv::COLOR_RGB2BGR);
  cv::addWeighted(bgr, 1.0 - alpha, colour, alpha, 0.0, blended);
  return blended;
}

cv::Mat original_overlay(const cv::Mat& rgb_original, const cv::Mat& original_map, const ImageTransform& transform,
                         ColourScale scale) {
  const cv::Size size = rgb_original.size();
  const cv::Mat picture = heatmap_overlay(rgb_original, original_map, scale);
  // Outside the view: the plain image, darkened, so nobody reads it as inspected and clean; the view outlined.
  cv::Mat out;
  cv::cvtColor(rgb_original, out, cv::COLOR_RGB2BGR);
  out *= 0.45;
  const cv::Mat seen = view_mask(transform, size);
  picture.copyTo(out, seen);
  std::vector<std::vector<cv::Point>> outline;
  cv::findContours(seen, outline, cv::RETR_EXTERNAL, cv::CHAIN_APPROX_SIMPLE);
  cv::drawContours(out, outline, -1, cv::Scalar(255, 255, 255), 1);
  return out;
}

cv::Mat plot_curve(const std::vector<double>& x, const std::vector<double>& y, const Plot& plot, int size) {
  const int margin = 50;
  const int side = size - 2 * margin;
  cv::Mat canvas(size, size, CV_8UC3, cv::Scalar(255, 255, 255));
  auto point = [&](double px, double py) {
    return cv::Point(margin + static_cast<int>(px / plot.x_max * side), size - margin - static_cast<int>(py * side));
  };
  const cv::Scalar black(0, 0, 0);
  cv::rectangle(canvas, point(0, 0), point(plot.x_max, 1), black, 1);
  if (plot.diagonal) cv::line(canvas, point(0, 0), point(plot.x_max, 1), cv::Scalar(180, 180, 180), 1, cv::LINE_AA);
  for (int t = 0; t <= 4; ++t) {
    cv::putText(canvas, number(t / 4.0 * plot.x_max, "%.2f"), point(t / 4.0 * plot.x_max, 0) + cv::Point(-14, 18),
                cv::FONT_HERSHEY_SIMPLEX, 0.35, black);
    cv::putText(canvas, number(t / 4.0, "%.2f"), point(0, t / 4.0) + cv::Point(-28, 4), cv::FONT_HERSHEY_SIMPLEX, 0.35,
                black);
  }
  // A curve with millions of points draws the same as one thinned to a point per pixel change.
  std::vector<cv::Point> curve;
  for (size_t i = 0; i < std::min(x.size(), y.size()); ++i) {
    const cv::Point p = point(std::min(x[i], plot.x_max), y[i]);
    if (curve.empty() || curve.back() != p) curve.push_back(p);
  }
  cv::polylines(canvas, curve, false, cv::Scalar(200, 80, 0), 2, cv::LINE_AA);
  cv::putText(canvas, plot.title, cv::Point(margin, 30), cv::FONT_HERSHEY_SIMPLEX, 0.5, black, 1, cv::LINE_AA);
  cv::putText(canvas, plot.x_label, cv::Point(size / 2 - 60, size - 12), cv::FONT_HERSHEY_SIMPLEX, 0.4, black);
  cv::Mat label(20, side, CV_8UC3, cv::Scalar(255, 255, 255));
  cv::putText(label, plot.y_label, cv::Point(side / 2 - 50, 14), cv::FONT_HERSHEY_SIMPLEX, 0.4, black);
  cv::rotate(label, label, cv::ROTATE_90_COUNTERCLOCKWISE);
  label.copyTo(canvas(cv::Rect(0, margin, label.cols, label.rows)));
  return canvas;
}

void write_png(const std::string& path, const cv::Mat& image) {
  const std::vector<uchar> bytes = encode_png(image, path);
  write_file_atomically(path, std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
}

std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n\r") == std::string::npos) return s;
  std::string quoted = "\"";
  for (char c : s) quoted += c == '"' ? std::string("\"\"") : std::string(1, c);
  return quoted + "\"";
}

PredictionWriter::PredictionWriter(OutputDirectory& out, const ImageTransform& transform,
                                   const Calibration& calibration, ColourScale scale)
    : out_(out), transform_(transform), calibration_(calibration), scale_(scale) {
  if (!(scale.vmax > scale.vmin)) throw std::invalid_argument("PredictionWriter: the colour scale is empty");
  const std::string path = out_.claim("scores.csv");
  csv_.open(path, std::ios::trunc);
  if (!csv_) throw std::runtime_error(path + ": cannot write");
  append_row("image,score,normalized_score,label,overlay,mask,map,error");
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

cv::Mat prediction_map_on_original(const at::Tensor& anomaly_map, const ImageTransform& transform, cv::Size original) {
  const cv::Mat view_map = to_mat(anomaly_map);
  double lowest;
  cv::minMaxLoc(view_map, &lowest);
  return map_to_original(view_map, transform, original, static_cast<float>(lowest));
}

std::string prediction_json(const std::string& image, float score, const std::optional<Threshold>& threshold,
                            double ms) {
  nlohmann::json j{{"image", image}, {"score", score}};
  if (threshold) {
    j["normalized_score"] = threshold->normalize(score);
    j["label"] = threshold->is_anomalous(score) ? "NG" : "OK";
  }
  j["ms"] = ms;
  return j.dump();
}

std::string thresholds_json(const Calibration& calibration) {
  return nlohmann::json{{"image_threshold", threshold_json(calibration.image)},
                        {"pixel_threshold", threshold_json(calibration.pixel)}}
      .dump();
}

void PredictionWriter::add(const std::string& image_path, float score, const at::Tensor& anomaly_map) {
  const std::string stem = unique_stem(image_path);
  const std::string overlay = stem + "_overlay.png", raw = stem + "_map.npy";
  const cv::Mat rgb = load_image_rgb(image_path);
  const cv::Mat map = prediction_map_on_original(anomaly_map, transform_, rgb.size());
  write_png(out_.claim(overlay), original_overlay(rgb, map, transform_, scale_));
  write_npy(out_.claim(raw), map.ptr<float>(), {map.rows, map.cols});
  std::string mask;
  if (calibration_.pixel) {
    mask = stem + "_mask.png";
    // Pixels the model never saw are not called defects.
    const cv::Mat defect = (map >= calibration_.pixel->value) & view_mask(transform_, rgb.size());
    write_png(out_.claim(mask), defect);
  }
  std::string normalized, label;
  if (calibration_.image) {
    normalized = number(calibration_.image->normalize(score), "%.6f");
    const bool ng = calibration_.image->is_anomalous(score);
    label = ng ? "NG" : "OK";
    flagged_ += ng;
  }
  append_row(csv_field(image_path) + "," + number(score, "%.6f") + "," + normalized + "," + label + "," + overlay +
             "," + mask + "," + raw + ",");
  ++scored_;
}

void PredictionWriter::add_failure(const std::string& image_path, const std::string& error) {
  append_row(csv_field(image_path) + ",,,,,,," + csv_field(error));
  ++failed_;
}

void PredictionWriter::finish(double ms_per_image, const std::string& model_dir) {
  nlohmann::json summary = {{"model", model_dir},
                            {"images", scored_ + failed_},
                            {"scored", scored_},
                            {"failed", failed_},
                            {"vmin", scale_.vmin},
                            {"vmax", scale_.vmax},
                            {"image_threshold", threshold_json(calibration_.image)},
                            {"pixel_threshold", threshold_json(calibration_.pixel)},
                            {"ms_per_image", ms_per_image}};
  if (calibration_.image) summary["ng"] = flagged_;
  write_file_atomically(out_.claim("summary.json"), summary.dump(2) + "\n");
}

std::string evaluation_metrics_json(const EvaluationResult& r, const std::string& model_dir, const std::string& data,
                                    const std::string& mask_rule) {
  nlohmann::json per_defect = nlohmann::json::array();
  for (const auto& d : r.defect_types)
    per_defect.push_back({{"defect_type", d.defect_type},
                          {"images", d.images},
                          {"mean_score", d.mean_score},
                          {"image_auroc", optional_json(d.image_auroc)},
                          {"flagged", d.flagged ? nlohmann::json(*d.flagged) : nlohmann::json()},
                          {"pixel_auroc", optional_json(d.pixel_auroc)},
                          {"aupro", optional_json(d.aupro)}});
  const auto pixel_value = [&](double v) { return r.pixel_metrics ? nlohmann::json(v) : nlohmann::json(); };
  const nlohmann::json metrics = {{"written_by", std::string("patchcore ") + version()},
                                  {"image_auroc", r.image.auroc},
                                  {"pixel_auroc", pixel_value(r.pixel.auroc)},
                                  {"pixel_auroc_defective", pixel_value(r.pixel_auroc_defective)},
                                  {"aupro", pixel_value(r.pro.aupro)},
                                  {"image", score_metrics_json(r.image)},
                                  {"pixel", r.pixel_metrics ? score_metrics_json(r.pixel) : nlohmann::json()},
                                  {"pixel_metrics", r.pixel_note},
                                  {"coordinates", r.coordinates == MapCoordinates::kOriginal ? "original" : "view"},
                                  {"image_confusion", confusion_json(r.image_confusion)},
                                  {"pixel_confusion", confusion_json(r.pixel_confusion)},
                                  {"per_defect", per_defect},
                                  {"images", r.images.size()},
                                  {"ms_per_image", r.ms_per_image},
                                  {"model", model_dir},
                                  {"data", data},
                                  {"mask_rule", mask_rule}};
  return metrics.dump(2) + "\n";
}

void write_evaluation_report(const std::string& dir, const std::vector<const PatchCore*>& members,
                             const EvaluationResult& r, const std::string& metrics_json,
                             const ProgressCallback& progress) {
  if (members.empty()) throw std::invalid_argument("write_evaluation_report: no model");
  const ImageTransform& transform = members.front()->params().transform;
  std::optional<ColourScale> scale = members.size() == 1 ? model_colour_scale(*members.front()) : std::nullopt;
  if (!scale) {
    std::vector<cv::Mat> maps;
    for (const auto& image : r.images) maps.push_back(image.anomaly_map);
    const auto [low, high] = value_range(maps);
    scale = ColourScale{low, high > low ? high : low + 1.f};
  }
  const Calibration* calibration = members.size() == 1 ? &members.front()->calibration() : nullptr;

  // The worst mistakes, for the page: good images scoring highest, defective ones scoring lowest.
  std::vector<size_t> good, defective;
  for (size_t i = 0; i < r.images.size(); ++i) (r.images[i].sample.is_anomalous ? defective : good).push_back(i);
  const auto by_score = [&](size_t a, size_t b) { return r.images[a].score > r.images[b].score; };
  std::sort(good.begin(), good.end(), by_score);
  std::sort(defective.begin(), defective.end(), [&](size_t a, size_t b) { return by_score(b, a); });
  good.resize(std::min<size_t>(good.size(), 4));
  defective.resize(std::min<size_t>(defective.size(), 4));

  write_directory_atomically(dir, [&](const std::string& tmp) {
    std::filesystem::create_directory(tmp + "/overlays");
    std::map<size_t, std::vector<uchar>> shown;  // overlays the page shows
    std::string csv = "image,defect_type,label,score,predicted,overlay\n";
    for (size_t i = 0; i < r.images.size(); ++i) {
      const auto& image = r.images[i];
      const std::string overlay = "overlays/" + image.sample.defect_type + "_" +
                                  std::filesystem::path(image.sample.image_path).stem().string() + ".png";
      const std::vector<uchar> png = encode_png(evaluation_overlay(image, transform, r.coordinates, *scale), overlay);
      write_file_atomically(tmp + "/" + overlay,
                            std::string_view(reinterpret_cast<const char*>(png.data()), png.size()));
      if (std::find(good.begin(), good.end(), i) != good.end() ||
          std::find(defective.begin(), defective.end(), i) != defective.end())
        shown[i] = png;
      const std::string predicted =
          calibration && calibration->image ? (calibration->image->is_anomalous(image.score) ? "NG" : "OK") : "";
      csv += csv_field(image.sample.image_path) + "," + csv_field(image.sample.defect_type) + "," +
             (image.sample.is_anomalous ? "1" : "0") + "," + number(image.score, "%.6f") + "," + predicted + "," +
             overlay + "\n";
      if (progress) progress("writing report", i + 1, r.images.size());
    }
    write_file_atomically(tmp + "/scores.csv", csv);

    std::string per_defect = "defect_type,images,mean_score,image_auroc,flagged,pixel_auroc,aupro\n";
    const auto cell = [](const std::optional<double>& v) { return v ? number(*v) : std::string(); };
    for (const auto& d : r.defect_types)
      per_defect += csv_field(d.defect_type) + "," + std::to_string(d.images) + "," + number(d.mean_score) + "," +
                    cell(d.image_auroc) + "," + (d.flagged ? std::to_string(*d.flagged) : "") + "," +
                    cell(d.pixel_auroc) + "," + cell(d.aupro) + "\n";
    write_file_atomically(tmp + "/per_defect.csv", per_defect);

    std::vector<std::pair<std::string, std::vector<uchar>>> curves;
    const auto add_curve = [&](const std::string& name, const std::vector<double>& x, const std::vector<double>& y,
                               const Plot& plot) {
      curves.emplace_back(name, encode_png(plot_curve(x, y, plot), name));
      const auto& png = curves.back().second;
      write_file_atomically(tmp + "/" + name, std::string_view(reinterpret_cast<const char*>(png.data()), png.size()));
    };
    add_curve("roc_image.png", r.image.roc.fpr, r.image.roc.tpr,
              {"image ROC  AUROC " + number(r.image.auroc), "false positive rate", "true positive rate", 1, true});
    add_curve("pr_image.png", r.image.pr.recall, r.image.pr.precision,
              {"image PR  AUPR " + number(r.image.aupr), "recall", "precision", 1, false});
    if (r.pixel_metrics) {
      add_curve("roc_pixel.png", r.pixel.roc.fpr, r.pixel.roc.tpr,
                {"pixel ROC  AUROC " + number(r.pixel.auroc), "false positive rate", "true positive rate", 1, true});
      add_curve("pr_pixel.png", r.pixel.pr.recall, r.pixel.pr.precision,
                {"pixel PR  AUPR " + number(r.pixel.aupr), "recall", "precision", 1, false});
      add_curve("pro.png", r.pro.fpr, r.pro.pro,
                {"PRO  AUPRO " + number(r.pro.aupro), "false positive rate", "per-region overlap",
                 r.pro.fpr.empty() ? 0.3 : r.pro.fpr.back(), false});
    }
    write_file_atomically(tmp + "/metrics.json", metrics_json);

    // The page: plain HTML with every picture inline, so it opens from anywhere, alone.
    std::string html =
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>PatchCore evaluation</title>\n"
        "<style>body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #bbb;padding:4px 10px;text-align:right}th{background:#eee}"
        "td:first-child,th:first-child{text-align:left}figure{display:inline-block;margin:0 1em 1em 0;"
        "vertical-align:top}figcaption{font-size:90%;max-width:420px;word-break:break-all}</style></head><body>\n";
    html += "<h1>PatchCore evaluation</h1>\n<p>" + std::to_string(r.images.size()) + " test images, " +
            number(r.ms_per_image, "%.1f") + " ms per image. Pixel metrics: " + html_escape(r.pixel_note) + ".</p>\n";
    const auto row = [](const std::vector<std::string>& cells, const char* tag = "td") {
      std::string s = "<tr>";
      for (const auto& c : cells) s += std::string("<") + tag + ">" + c + "</" + tag + ">";
      return s + "</tr>\n";
    };
    html += "<h2 id=\"metrics\">Metrics</h2>\n<table>" +
            row({"", "AUROC", "AUPR", "F1-max", "at threshold", "AUPRO"}, "th") +
            row({"image", number(r.image.auroc), number(r.image.aupr), number(r.image.f1_max.f1),
                 number(r.image.f1_max.threshold, "%.4g"), ""});
    if (r.pixel_metrics)
      html += row({"pixel", number(r.pixel.auroc), number(r.pixel.aupr), number(r.pixel.f1_max.f1),
                   number(r.pixel.f1_max.threshold, "%.4g"), number(r.pro.aupro)});
    html += "</table>\n";
    for (const auto& [name, c] : {std::pair{"image", &r.image_confusion}, std::pair{"pixel", &r.pixel_confusion}}) {
      if (!*c) continue;
      const ConfusionMatrix& m = **c;
      html += std::string("<h3>Confusion matrix, ") + name + "s, at the model's threshold " +
              number(m.threshold, "%.4g") + "</h3>\n<table>" + row({"", "predicted NG", "predicted OK"}, "th") +
              row({"defective", std::to_string(m.true_positives), std::to_string(m.false_negatives)}) +
              row({"good", std::to_string(m.false_positives), std::to_string(m.true_negatives)}) + "</table>\n";
    }
    html += "<h2 id=\"defect-types\">Per defect type</h2>\n<table>" +
            row({"defect type", "images", "mean score", "image AUROC", "flagged NG", "pixel AUROC", "AUPRO"}, "th");
    for (const auto& d : r.defect_types)
      html +=
          row({html_escape(d.defect_type), std::to_string(d.images), number(d.mean_score, "%.4g"), cell(d.image_auroc),
               d.flagged ? std::to_string(*d.flagged) : "", cell(d.pixel_auroc), cell(d.aupro)});
    html += "</table>\n<h2 id=\"curves\">Curves</h2>\n";
    for (const auto& [name, png] : curves) html += "<figure>" + inline_png(png, name, 400) + "</figure>\n";
    const auto gallery = [&](const std::string& title, const std::vector<size_t>& indices) {
      html += "<h2>" + title + "</h2>\n";
      for (size_t i : indices)
        html += "<figure>" + inline_png(shown.at(i), r.images[i].sample.image_path, 400) + "<figcaption>" +
                html_escape(r.images[i].sample.defect_type) + ", score " + number(r.images[i].score, "%.4g") + "<br>" +
                html_escape(r.images[i].sample.image_path) + "</figcaption></figure>\n";
    };
    gallery("Worst false positives: good images scoring highest", good);
    gallery("Worst false negatives: defective images scoring lowest", defective);
    // The page checks itself: every picture must decode, or it says so at the top.
    html +=
        "<script>window.addEventListener('load', () => {\n"
        "  const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length;\n"
        "  document.body.dataset.rendered = broken ? 'broken images: ' + broken : 'ok';\n"
        "  if (broken) document.body.insertAdjacentHTML('afterbegin', '<p><b>' + broken + ' pictures of this report "
        "could not be shown.</b></p>');\n"
        "});</script>\n</body></html>\n";
    write_file_atomically(tmp + "/report.html", html);
  });
}

}  // namespace patchcore

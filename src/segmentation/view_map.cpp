#include "patchcore/segmentation/view_map.h"

#include <opencv2/imgproc.hpp>

#include <cmath>
#include <stdexcept>
#include <string>

namespace patchcore {

cv::Rect2d view_in_original(const ImageTransform& transform, cv::Size original) {
  if (transform.view != View::kCrop)
    return {0, 0, static_cast<double>(original.width), static_cast<double>(original.height)};
  const auto [width, height] = resized_size_shorter_side(original.width, original.height, transform.resize);
  const auto [left, top] = center_crop_offsets(width, height, transform.crop);
  const double sx = static_cast<double>(original.width) / width, sy = static_cast<double>(original.height) / height;
  return {left * sx, top * sy, transform.crop * sx, transform.crop * sy};
}

cv::Mat view_mask(const ImageTransform& transform, cv::Size original) {
  const cv::Rect2d view = view_in_original(transform, original);
  // The first pixel whose centre x + 0.5 is at or beyond `edge`.
  const auto first = [](double edge) { return static_cast<int>(std::ceil(edge - 0.5)); };
  const cv::Rect inside(cv::Point(first(view.x), first(view.y)),
                        cv::Point(first(view.x + view.width), first(view.y + view.height)));
  cv::Mat seen(original, CV_8U, cv::Scalar(0));
  seen(inside & cv::Rect(cv::Point(0, 0), original)).setTo(255);
  return seen;
}

cv::Mat map_to_original(const cv::Mat& view_map, const ImageTransform& transform, cv::Size original, float outside) {
  const cv::Size size = transform.view_size(original);
  if (view_map.type() != CV_32F || view_map.size() != size)
    throw std::invalid_argument("map_to_original: needs a " + std::to_string(size.width) + "x" +
                                std::to_string(size.height) + " float map");
  const cv::Rect2d view = view_in_original(transform, original);
  const double sx = view.width / size.width, sy = view.height / size.height;
  // Map pixel centre u + 0.5 lies at view.x + (u + 0.5) * sx in the original, whose pixel centres are at x + 0.5.
  const cv::Matx23d to_original(sx, 0, view.x + 0.5 * sx - 0.5, 0, sy, view.y + 0.5 * sy - 0.5);
  cv::Mat out;
  // Replicated edges, so that pixels just inside the view do not blend with `outside`; then the pixels whose centre
  // lies outside the view get it.
  cv::warpAffine(view_map, out, to_original, original, cv::INTER_LINEAR, cv::BORDER_REPLICATE);
  out.setTo(cv::Scalar(outside), view_mask(transform, original) == 0);
  return out;
}

}  // namespace patchcore

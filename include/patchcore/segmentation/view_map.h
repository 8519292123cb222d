#pragma once
// Anomaly maps live in the model's view (ImageTransform::view_size): the crop x crop window of the resized image, or
// the whole frame resized. These functions put a map back onto the original image, so that masks and overlays come
// in its coordinates.
#include <opencv2/core.hpp>

#include "patchcore/io/image.h"

namespace patchcore {

// The view's window in the original image's pixel coordinates (x, y, width, height; fractional where the resize
// does not divide evenly), for an image of size `original`.
cv::Rect2d view_in_original(const ImageTransform& transform, cv::Size original);

// CV_8U of the original's size: 255 at the pixels whose centre lies in the view, 0 at those the model never saw.
cv::Mat view_mask(const ImageTransform& transform, cv::Size original);

// The view's CV_32F map (of the view's size) resampled bilinearly onto the original image's pixel grid (pixel centres
// aligned, as the resize aligns them); pixels outside the view, which the model never saw, get `outside`.
cv::Mat map_to_original(const cv::Mat& view_map, const ImageTransform& transform, cv::Size original, float outside);

}  // namespace patchcore

#pragma once
// Image files read, transformed and stacked into [B, 3, crop, crop] batches in order, the next batch on
// a background thread while the caller computes on the current one, so decoding overlaps the backbone.
#include <torch/torch.h>

#include <future>
#include <string>
#include <vector>

#include "patchcore/image.h"
#include "patchcore/stage_timer.h"

namespace patchcore {

class ImageBatches {
 public:
  // Reading starts at once. `timer` (optional) receives the time spent reading under stage "decode".
  ImageBatches(std::vector<std::string> paths, ImageTransform transform, int64_t batch_size, StageTimer* timer = nullptr);
  // Waits for a read still in flight.
  ~ImageBatches();
  ImageBatches(const ImageBatches&) = delete;
  ImageBatches& operator=(const ImageBatches&) = delete;

  // The next batch into `batch`; false after the last one. A file that cannot be read throws here, for
  // the batch it belongs to, with the file named.
  bool next(torch::Tensor& batch);
  // Images in the batches returned so far.
  size_t done() const { return done_; }
  size_t size() const { return paths_.size(); }

 private:
  void start_reading();

  std::vector<std::string> paths_;
  ImageTransform transform_;
  size_t batch_size_;
  StageTimer* timer_;
  size_t next_start_ = 0;  // first image of the batch being read
  size_t done_ = 0;
  std::future<torch::Tensor> pending_;
};

}  // namespace patchcore

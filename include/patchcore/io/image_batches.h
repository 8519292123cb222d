#pragma once
// Image files read and transformed into batches of their views in order, the next batch on
// a background thread while the caller computes on the current one, so decoding overlaps the backbone.
#include <ATen/core/Tensor.h>

#include <atomic>
#include <exception>
#include <future>
#include <memory>
#include <string>
#include <vector>

#include "patchcore/core/stage_timer.h"
#include "patchcore/io/image.h"

namespace patchcore {

// One batch: the images that could be read, and the files that could not, with why.
struct ImageBatch {
  std::vector<at::Tensor> images;  // [3, H, W] each, in the transform's view; one per index
  std::vector<size_t> indices;     // the images' positions in the path list
  std::vector<std::pair<size_t, std::exception_ptr>> failures;  // the unreadable files' positions and errors
};

class ImageBatches {
 public:
  // Reading starts at once. `timer` (optional) receives the background thread's reading time under stage
  // "decode" and the caller's time in next() under "decode wait": the part of decoding that the compute
  // did not hide.
  ImageBatches(std::vector<std::string> paths, ImageTransform transform, int64_t batch_size,
               StageTimer* timer = nullptr);
  // Waits for a read still in flight.
  ~ImageBatches();
  ImageBatches(const ImageBatches&) = delete;
  ImageBatches& operator=(const ImageBatches&) = delete;

  // The next batch into `batch`; false after the last one. Images of the batch that the background thread
  // has not started yet are read by the caller, so both cores decode while the compute waits. A file that cannot
  // be read costs only itself: it is listed in batch.failures.
  bool next(ImageBatch& batch);
  // The same where every file must be readable: a failure throws here, naming the batch's first unreadable file;
  // the batches after it can still be read.
  bool next(std::vector<at::Tensor>& images);
  // Images in the batches returned so far.
  size_t done() const { return done_; }
  size_t size() const { return paths_.size(); }

 private:
  // One batch being read. Its images are claimed one at a time, by the background thread and by next().
  struct Reading {
    size_t begin = 0;
    std::vector<at::Tensor> images;
    std::vector<std::exception_ptr> errors;
    std::atomic<size_t> claimed{0};
    std::future<void> reader;
  };

  void start_reading();
  void read_claimed(Reading& reading) const;

  std::vector<std::string> paths_;
  ImageTransform transform_;
  size_t batch_size_;
  StageTimer* timer_;
  size_t next_start_ = 0;  // first image of the batch to read next
  size_t done_ = 0;
  std::unique_ptr<Reading> reading_;
};

}  // namespace patchcore

#include "patchcore/image_batches.h"

#include <sys/resource.h>
#include <unistd.h>

#include <stdexcept>

namespace patchcore {

ImageBatches::ImageBatches(std::vector<std::string> paths, ImageTransform transform, int64_t batch_size, StageTimer* timer)
    : paths_(std::move(paths)), transform_(std::move(transform)), batch_size_(static_cast<size_t>(batch_size)), timer_(timer) {
  if (batch_size < 1) throw std::invalid_argument("ImageBatches: batch size must be at least 1");
  start_reading();
}

ImageBatches::~ImageBatches() {
  if (pending_.valid()) pending_.wait();
}

void ImageBatches::start_reading() {
  if (next_start_ >= paths_.size()) return;
  const size_t begin = next_start_, end = std::min(paths_.size(), begin + batch_size_);
  next_start_ = end;
  pending_ = std::async(std::launch::async, [this, begin, end] {
    // Below the compute threads: when it takes a core from one of them, every thread of that parallel region
    // waits at the next barrier (measured: the backbone's 28 ms per image became 46 ms). At a low priority it
    // runs in the gaps between and around parallel regions instead. Failure only costs that speed.
    setpriority(PRIO_PROCESS, static_cast<id_t>(gettid()), 19);
    StageTimer::Scope scope(timer_, "decode");
    std::vector<torch::Tensor> images;
    for (size_t i = begin; i < end; ++i) images.push_back(transform_.load(paths_[i]));
    return torch::stack(images);
  });
}

bool ImageBatches::next(torch::Tensor& batch) {
  if (!pending_.valid()) return false;
  batch = pending_.get();
  done_ += static_cast<size_t>(batch.size(0));
  start_reading();
  return true;
}

}  // namespace patchcore

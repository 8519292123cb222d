#include "patchcore/io/image_batches.h"

#include <ATen/ATen.h>

#include <sys/resource.h>
#include <unistd.h>

#include <stdexcept>

namespace patchcore {

ImageBatches::ImageBatches(std::vector<std::string> paths, ImageTransform transform, int64_t batch_size,
                           StageTimer* timer)
    : paths_(std::move(paths)),
      transform_(std::move(transform)),
      batch_size_(static_cast<size_t>(batch_size)),
      timer_(timer) {
  if (batch_size < 1) throw std::invalid_argument("ImageBatches: batch size must be at least 1");
  start_reading();
}

ImageBatches::~ImageBatches() {
  if (reading_) reading_->reader.wait();
}

void ImageBatches::read_claimed(Reading& reading) const {
  for (size_t i; (i = reading.claimed.fetch_add(1)) < reading.images.size();) {
    try {
      reading.images[i] = transform_.load(paths_[reading.begin + i]);
    } catch (...) {
      reading.errors[i] = std::current_exception();
    }
  }
}

void ImageBatches::start_reading() {
  if (next_start_ >= paths_.size()) return;
  auto reading = std::make_unique<Reading>();
  reading->begin = next_start_;
  const size_t count = std::min(paths_.size() - next_start_, batch_size_);
  next_start_ += count;
  reading->images.resize(count);
  reading->errors.resize(count);
  reading->reader = std::async(std::launch::async, [this, r = reading.get()] {
    // Below the compute threads: when it takes a core from one of them, every thread of that parallel region
    // waits at the next barrier, which slows the backbone by more than the decoding it overlaps. At a low
    // priority it runs in the gaps between and around parallel regions instead. Failure only costs that speed.
    setpriority(PRIO_PROCESS, static_cast<id_t>(gettid()), 19);
    StageTimer::Scope scope(timer_, "decode");
    read_claimed(*r);
  });
  reading_ = std::move(reading);
}

bool ImageBatches::next(ImageBatch& batch) {
  batch = ImageBatch{};
  if (!reading_) return false;
  const std::unique_ptr<Reading> reading = std::move(reading_);
  {
    // Nothing computes while the caller waits here, so the caller reads too rather than leave a core idle.
    StageTimer::Scope scope(timer_, "decode wait");
    read_claimed(*reading);
    reading->reader.get();
  }
  start_reading();
  for (size_t i = 0; i < reading->images.size(); ++i) {
    if (reading->errors[i]) {
      batch.failures.emplace_back(reading->begin + i, reading->errors[i]);
    } else {
      batch.images.push_back(std::move(reading->images[i]));
      batch.indices.push_back(reading->begin + i);
    }
  }
  done_ += reading->images.size();
  return true;
}

bool ImageBatches::next(std::vector<at::Tensor>& images) {
  ImageBatch batch;
  if (!next(batch)) return false;
  if (!batch.failures.empty()) std::rethrow_exception(batch.failures.front().second);
  images = batch.images;
  return true;
}

}  // namespace patchcore

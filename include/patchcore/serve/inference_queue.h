#pragma once
// The inference service's work queue: a bounded queue of images in front of a fixed set of worker threads. A worker
// takes the oldest image and, with it, up to max_batch - 1 more queued images of the same model, which it scores in
// one forward pass. When the queue is full, submit refuses at once rather than letting memory grow; an image whose
// caller stopped waiting is dropped before it costs a forward pass.
#include <ATen/core/Tensor.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "patchcore/patchcore.h"

namespace patchcore::serve {

struct QueueOptions {
  int workers = 1;       // threads that run forward passes; each uses the process's thread setting
  size_t capacity = 32;  // images waiting, beyond those being scored
  size_t max_batch = 1;  // images of one model per forward pass; batching gained nothing on 2 cores (docs/service.md)
};

// One image's place in the queue; its submitter waits on it.
class Ticket {
 public:
  enum class State { kQueued, kRunning, kDone, kFailed, kAbandoned };
  // Waits until the image is scored or failed, or the deadline passes; true when it finished.
  bool wait_until(std::chrono::steady_clock::time_point deadline);
  // The submitter stops waiting: a queued image is dropped, a running one finishes and is discarded.
  void abandon();
  State state() const;
  // After wait_until returned true: the score and map, or the error rethrown.
  float score() const;
  const at::Tensor& map() const;
  void rethrow_error() const;
  // How many images its forward pass held.
  size_t batch_size() const;

 private:
  friend class InferenceQueue;
  mutable std::mutex mutex_;
  std::condition_variable done_;
  State state_ = State::kQueued;
  float score_ = 0;
  at::Tensor map_;
  std::exception_ptr error_;
  size_t batch_size_ = 0;
};

class InferenceQueue {
 public:
  // Scores a batch of images of one model: PatchCore::predict or PatchCoreEnsemble::predict.
  using Predict = std::function<PredictResult(const std::vector<at::Tensor>&)>;

  explicit InferenceQueue(const QueueOptions& options);
  // Drops what is queued (their tickets fail) and joins the workers after their current batch.
  ~InferenceQueue();
  InferenceQueue(const InferenceQueue&) = delete;
  InferenceQueue& operator=(const InferenceQueue&) = delete;

  // Queues `image` for the model `model` (its identity groups images into batches, and the queue holds it alive
  // until the image is scored), scored by `predict`. Returns null when the queue is full.
  std::shared_ptr<Ticket> submit(std::shared_ptr<const void> model, Predict predict, at::Tensor image);

  size_t depth() const;      // images waiting
  size_t in_flight() const;  // images in a forward pass now

 private:
  struct Job {
    std::shared_ptr<const void> model;
    Predict predict;
    at::Tensor image;
    std::shared_ptr<Ticket> ticket;
  };
  void work();

  QueueOptions options_;
  mutable std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<Job> queue_;
  bool stopping_ = false;
  size_t in_flight_ = 0;
  std::vector<std::thread> workers_;
};

}  // namespace patchcore::serve

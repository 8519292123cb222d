#include "patchcore/serve/inference_queue.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <stdexcept>

namespace patchcore::serve {

bool Ticket::wait_until(std::chrono::steady_clock::time_point deadline) {
  std::unique_lock<std::mutex> lock(mutex_);
  return done_.wait_until(lock, deadline, [&] { return state_ == State::kDone || state_ == State::kFailed; });
}

void Ticket::abandon() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (state_ == State::kQueued || state_ == State::kRunning) state_ = State::kAbandoned;
}

Ticket::State Ticket::state() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return state_;
}

float Ticket::score() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return score_;
}

const at::Tensor& Ticket::map() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return map_;
}

void Ticket::rethrow_error() const {
  std::lock_guard<std::mutex> lock(mutex_);
  if (error_) std::rethrow_exception(error_);
}

size_t Ticket::batch_size() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return batch_size_;
}

InferenceQueue::InferenceQueue(const QueueOptions& options) : options_(options) {
  if (options.workers < 1) throw std::invalid_argument("InferenceQueue: workers must be at least 1");
  if (options.capacity < 1) throw std::invalid_argument("InferenceQueue: capacity must be at least 1");
  if (options.max_batch < 1) throw std::invalid_argument("InferenceQueue: max_batch must be at least 1");
  for (int i = 0; i < options.workers; ++i) workers_.emplace_back([this] { work(); });
}

InferenceQueue::~InferenceQueue() {
  std::deque<Job> dropped;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
    dropped.swap(queue_);
  }
  ready_.notify_all();
  for (auto& job : dropped) {
    std::lock_guard<std::mutex> lock(job.ticket->mutex_);
    job.ticket->error_ = std::make_exception_ptr(std::runtime_error("the service is stopping"));
    job.ticket->state_ = Ticket::State::kFailed;
    job.ticket->done_.notify_all();
  }
  for (auto& worker : workers_) worker.join();
}

std::shared_ptr<Ticket> InferenceQueue::submit(std::shared_ptr<const void> model, Predict predict, at::Tensor image) {
  auto ticket = std::make_shared<Ticket>();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopping_ || queue_.size() >= options_.capacity) return nullptr;
    queue_.push_back(Job{std::move(model), std::move(predict), std::move(image), ticket});
  }
  ready_.notify_one();
  return ticket;
}

size_t InferenceQueue::depth() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return queue_.size();
}

size_t InferenceQueue::in_flight() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return in_flight_;
}

namespace {

// Marks a queued ticket running; false when its submitter has gone, so it costs nothing more.
bool start(Ticket::State& state) {
  if (state != Ticket::State::kQueued) return false;
  state = Ticket::State::kRunning;
  return true;
}

}  // namespace

void InferenceQueue::work() {
  for (;;) {
    std::vector<Job> batch;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      ready_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      // The oldest image, then the next ones of its model in arrival order: batching never reorders one model's
      // images, and another model's image waits at most one forward pass longer.
      const std::shared_ptr<const void> model = queue_.front().model;
      for (auto it = queue_.begin(); it != queue_.end() && batch.size() < options_.max_batch;) {
        if (it->model != model) {
          ++it;
          continue;
        }
        bool wanted;
        {
          std::lock_guard<std::mutex> ticket_lock(it->ticket->mutex_);
          wanted = start(it->ticket->state_);
        }
        if (wanted) batch.push_back(std::move(*it));
        it = queue_.erase(it);
      }
      in_flight_ += batch.size();
    }
    if (batch.empty()) continue;
    std::vector<at::Tensor> images;
    for (const auto& job : batch) images.push_back(job.image);
    PredictResult result;
    std::exception_ptr error;
    try {
      result = batch.front().predict(images);
      if (result.scores.size() != batch.size() || result.masks.size() != batch.size())
        throw std::logic_error("InferenceQueue: the model answered a different number of images");
    } catch (...) {
      error = std::current_exception();
    }
    for (size_t i = 0; i < batch.size(); ++i) {
      Ticket& ticket = *batch[i].ticket;
      std::lock_guard<std::mutex> lock(ticket.mutex_);
      ticket.batch_size_ = batch.size();
      if (ticket.state_ == Ticket::State::kAbandoned) continue;
      if (error) {
        ticket.error_ = error;
        ticket.state_ = Ticket::State::kFailed;
      } else {
        ticket.score_ = result.scores[i];
        ticket.map_ = result.masks[i];
        ticket.state_ = Ticket::State::kDone;
      }
      ticket.done_.notify_all();
    }
    // The images and the model they held are released here, outside the lock.
    batch.clear();
    std::lock_guard<std::mutex> lock(mutex_);
    in_flight_ -= images.size();
  }
}

}  // namespace patchcore::serve

// The inspection service's parts below HTTP: the bounded queue and its batching, the metrics text, the model
// registry's atomic reloads. tests/serve/test_service.py drives the whole service over HTTP.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <atomic>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <thread>

#include "patchcore/core/file.h"
#include "patchcore/serve/inference_queue.h"
#include "patchcore/serve/metrics.h"
#include "patchcore/serve/model_registry.h"
#include "support.h"

using namespace patchcore;
using namespace patchcore::serve;
namespace fs = std::filesystem;

namespace {

using Clock = std::chrono::steady_clock;

// A model stand-in that scores an image by its single value and records every forward pass; it can be held at a
// gate so that images pile up in the queue.
class FakeModel {
 public:
  InferenceQueue::Predict predict() {
    return [this](const std::vector<at::Tensor>& images) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        ++entered_;
        entered_cv_.notify_all();
        gate_cv_.wait(lock, [&] { return open_; });
        std::vector<float> values;
        for (const auto& image : images) values.push_back(image.item<float>());
        passes_.push_back(values);
      }
      if (fail_) throw std::runtime_error("FakeModel: broken");
      PredictResult r;
      for (const auto& image : images) r.scores.push_back(image.item<float>() * 2), r.masks.push_back(image);
      return r;
    };
  }
  void wait_entered(int n) {
    std::unique_lock<std::mutex> lock(mutex_);
    entered_cv_.wait(lock, [&] { return entered_ >= n; });
  }
  void open() {
    std::lock_guard<std::mutex> lock(mutex_);
    open_ = true;
    gate_cv_.notify_all();
  }
  std::vector<std::vector<float>> passes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return passes_;
  }
  bool fail_ = false;

 private:
  std::mutex mutex_;
  std::condition_variable gate_cv_, entered_cv_;
  bool open_ = false;
  int entered_ = 0;
  std::vector<std::vector<float>> passes_;
};

at::Tensor value(float v) { return torch::full({}, v); }

bool finish(const std::shared_ptr<Ticket>& t) { return t->wait_until(Clock::now() + std::chrono::seconds(30)); }

}  // namespace

TEST(InferenceQueue, RefusesWhenFullAndScoresWhatItAccepted) {
  QueueOptions options;
  options.capacity = 2;
  options.max_batch = 1;
  InferenceQueue queue(options);
  auto model = std::make_shared<FakeModel>();
  auto first = queue.submit(model, model->predict(), value(1));
  model->wait_entered(1);  // the worker holds the first image; two more fill the queue
  auto second = queue.submit(model, model->predict(), value(2));
  auto third = queue.submit(model, model->predict(), value(3));
  ASSERT_TRUE(first && second && third);
  EXPECT_EQ(queue.depth(), 2u);
  EXPECT_EQ(queue.in_flight(), 1u);
  EXPECT_EQ(queue.submit(model, model->predict(), value(4)), nullptr);
  model->open();
  for (const auto& [ticket, v] : {std::pair{first, 1.f}, std::pair{second, 2.f}, std::pair{third, 3.f}}) {
    ASSERT_TRUE(finish(ticket));
    EXPECT_EQ(ticket->state(), Ticket::State::kDone);
    EXPECT_EQ(ticket->score(), 2 * v);
    EXPECT_EQ(ticket->map().item<float>(), v);
  }
  EXPECT_EQ(queue.depth(), 0u);
  EXPECT_NE(queue.submit(model, model->predict(), value(5)), nullptr);  // room again
}

TEST(InferenceQueue, BatchesWaitingImagesOfOneModelInArrivalOrder) {
  QueueOptions options;
  options.max_batch = 3;
  InferenceQueue queue(options);
  auto a = std::make_shared<FakeModel>(), b = std::make_shared<FakeModel>();
  std::vector<std::shared_ptr<Ticket>> tickets{queue.submit(a, a->predict(), value(0))};
  a->wait_entered(1);
  b->open();
  // Waiting: a1 b1 a2 a3 a4 b2 → passes a1 a2 a3, then b1 b2, then a4.
  for (auto [model, v] : {std::pair{a, 1.f}, {b, 11.f}, {a, 2.f}, {a, 3.f}, {a, 4.f}, {b, 12.f}})
    tickets.push_back(queue.submit(model, model->predict(), value(v)));
  a->open();
  for (const auto& t : tickets) {
    ASSERT_TRUE(finish(t));
    EXPECT_EQ(t->state(), Ticket::State::kDone);
  }
  EXPECT_EQ(a->passes(), (std::vector<std::vector<float>>{{0}, {1, 2, 3}, {4}}));
  EXPECT_EQ(b->passes(), (std::vector<std::vector<float>>{{11, 12}}));
  EXPECT_EQ(tickets[2]->batch_size(), 2u);
  EXPECT_EQ(tickets[3]->score(), 4.f);  // each image gets its own result
}

TEST(InferenceQueue, AnImageWhoseCallerLeftCostsNoForwardPass) {
  InferenceQueue queue(QueueOptions{});
  auto model = std::make_shared<FakeModel>();
  auto held = queue.submit(model, model->predict(), value(1));
  model->wait_entered(1);
  auto left = queue.submit(model, model->predict(), value(2));
  auto kept = queue.submit(model, model->predict(), value(3));
  left->abandon();
  model->open();
  ASSERT_TRUE(finish(held) && finish(kept));
  EXPECT_EQ(model->passes(), (std::vector<std::vector<float>>{{1}, {3}}));
  EXPECT_EQ(left->state(), Ticket::State::kAbandoned);
  EXPECT_FALSE(left->wait_until(Clock::now()));
}

TEST(InferenceQueue, AFailingModelFailsOnlyItsOwnImages) {
  InferenceQueue queue(QueueOptions{});
  auto broken = std::make_shared<FakeModel>(), good = std::make_shared<FakeModel>();
  broken->fail_ = true;
  broken->open();
  good->open();
  auto bad = queue.submit(broken, broken->predict(), value(1));
  auto fine = queue.submit(good, good->predict(), value(2));
  ASSERT_TRUE(finish(bad) && finish(fine));
  EXPECT_EQ(bad->state(), Ticket::State::kFailed);
  EXPECT_EQ(test::error_of([&] { bad->rethrow_error(); }), "FakeModel: broken");
  EXPECT_EQ(fine->score(), 4.f);
}

TEST(InferenceQueue, StoppingFailsWhatIsStillQueued) {
  auto model = std::make_shared<FakeModel>();
  std::shared_ptr<Ticket> queued;
  {
    QueueOptions options;
    options.max_batch = 1;
    InferenceQueue queue(options);
    auto running = queue.submit(model, model->predict(), value(1));
    model->wait_entered(1);
    queued = queue.submit(model, model->predict(), value(2));
    std::thread opener([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      model->open();
    });
    opener.detach();
  }
  ASSERT_TRUE(finish(queued));
  EXPECT_EQ(queued->state(), Ticket::State::kFailed);
  EXPECT_NE(test::error_of([&] { queued->rethrow_error(); }).find("stopping"), std::string::npos);
}

TEST(Metrics, PrometheusTextCountsRequestsAndCumulatesTheHistogram) {
  Metrics m;
  m.request("tire", 200, 0.004);
  m.request("tire", 200, 0.3);
  m.request("tire", 503, 0.001);
  m.request("", 404, 0.0001);
  m.request("a\"b", 200, 100);
  m.scored(1);
  m.scored(3);
  m.scored(3);
  Metrics::Gauges g;
  g.queue_depth = 5;
  g.in_flight = 7;
  g.models = 2;
  g.ready = true;
  const std::string text = m.prometheus_text(g);
  auto has = [&](const std::string& line) { return text.find(line + "\n") != std::string::npos; };
  EXPECT_TRUE(has("patchcore_requests_total{model=\"tire\",status=\"200\"} 2")) << text;
  EXPECT_TRUE(has("patchcore_requests_total{model=\"tire\",status=\"503\"} 1"));
  EXPECT_TRUE(has("patchcore_requests_total{model=\"\",status=\"404\"} 1"));
  EXPECT_TRUE(has("patchcore_requests_total{model=\"a\\\"b\",status=\"200\"} 1"));
  EXPECT_TRUE(has("patchcore_request_duration_seconds_bucket{model=\"tire\",le=\"0.005\"} 2"));
  EXPECT_TRUE(has("patchcore_request_duration_seconds_bucket{model=\"tire\",le=\"0.25\"} 2"));
  EXPECT_TRUE(has("patchcore_request_duration_seconds_bucket{model=\"tire\",le=\"0.5\"} 3"));
  EXPECT_TRUE(has("patchcore_request_duration_seconds_bucket{model=\"tire\",le=\"+Inf\"} 3"));
  EXPECT_TRUE(has("patchcore_request_duration_seconds_count{model=\"tire\"} 3"));
  EXPECT_TRUE(has("patchcore_request_duration_seconds_bucket{model=\"a\\\"b\",le=\"30\"} 0"));
  EXPECT_TRUE(has("patchcore_request_duration_seconds_bucket{model=\"a\\\"b\",le=\"+Inf\"} 1"));
  EXPECT_TRUE(has("patchcore_images_scored_total{batch_size=\"3\"} 2"));
  EXPECT_TRUE(has("patchcore_queue_depth 5"));
  EXPECT_TRUE(has("patchcore_in_flight 7"));
  EXPECT_TRUE(has("patchcore_ready 1"));
  EXPECT_EQ(m.requests("tire", 200), 2u);
}

TEST(ModelRegistry, ServesEachFolderAndKeepsTheOldModelWhenAReloadFails) {
  PATCHCORE_REQUIRE_SHARED(data, "data/tire");
  const std::string small = test::linked_data_set(data, {"train/good/000.png", "train/good/001.png"});
  const std::string fitted = test::fit_with_cli(small, {});
  const fs::path root = test::temp_dir();
  fs::copy(fitted, root / "tire");
  fs::copy(fitted, root / "tire.tmp-123-abc");  // an interrupted atomic write's folder: not a model
  fs::create_directory(root / ".hidden");
  fs::create_directory(root / "empty");
  ModelRegistry registry(root.string(), 1);
  const auto report = registry.load_all();
  EXPECT_EQ(report.loaded, std::vector<std::string>{"tire"});
  ASSERT_EQ(report.refused.size(), 1u);
  EXPECT_NE(report.refused.at("empty").find("patchcore_params"), std::string::npos) << report.refused.at("empty");
  const auto before = registry.find("tire");
  ASSERT_NE(before, nullptr);
  EXPECT_EQ(registry.find("tire.tmp-123-abc"), nullptr);

  // The same image through the decoder of bytes and the CLI's path decoder: the same tensor, the same score.
  const std::string image = data + "/test/good/000.png";
  const ImageTransform& transform = before->model.params().transform;
  const at::Tensor from_bytes = transform.view_tensor(decode_image_rgb(read_file(image), image), image);
  EXPECT_TRUE(torch::equal(from_bytes, transform.load(image)));
  const float score = before->model.predict({from_bytes}).scores.at(0);

  // A damaged folder is refused and the model loaded before keeps serving.
  const fs::path faiss = root / "tire" / "nnscorer_search_index.faiss";
  const std::string good_index = read_file(faiss.string());
  write_file_atomically(faiss.string(), good_index.substr(0, good_index.size() / 2));
  EXPECT_NE(test::error_of([&] { registry.reload("tire"); }).find("nnscorer_search_index.faiss"), std::string::npos);
  EXPECT_EQ(registry.find("tire"), before);
  EXPECT_EQ(registry.refused().count("tire"), 1u);
  EXPECT_THROW(registry.reload("nothing"), UnknownModel);
  EXPECT_THROW(registry.reload("tire.tmp-123-abc"), UnknownModel);

  // Repaired, it is swapped in; a request holding the old model still scores on it.
  write_file_atomically(faiss.string(), good_index);
  const auto after = registry.reload("tire");
  EXPECT_NE(after, before);
  EXPECT_EQ(registry.find("tire"), after);
  EXPECT_EQ(registry.refused().count("tire"), 0u);
  EXPECT_EQ(before->model.predict({from_bytes}).scores.at(0), score);
  EXPECT_EQ(after->model.predict({from_bytes}).scores.at(0), score);

  // A folder that is gone stops being served at the next full load; a new one is added.
  fs::rename(root / "tire", root / "renamed");
  registry.load_all();
  EXPECT_EQ(registry.find("tire"), nullptr);
  EXPECT_NE(registry.find("renamed"), nullptr);
}

// The service's HTTP threads outlive the reloads they ask for. A reload's warm-up pass runs on a thread that ends with
// it, so the OpenMP team and scratchpad a forward pass gives its thread are not left behind on each of them.
TEST(ModelRegistry, ReloadsAskedFromManyThreadsLeaveNoThreadBehind) {
  PATCHCORE_REQUIRE_SHARED(data, "data/tire");
  const std::string small = test::linked_data_set(data, {"train/good/000.png", "train/good/001.png"});
  const fs::path root = test::temp_dir();
  fs::copy(test::fit_with_cli(small, {}), root / "tire");
  at::set_num_threads(2);  // a team of one thread would hide the leak
  ModelRegistry registry(root.string(), 1);
  ASSERT_EQ(registry.load_all().loaded, std::vector<std::string>{"tire"});
  const auto threads = [] {
    return std::distance(fs::directory_iterator("/proc/self/task"), fs::directory_iterator());
  };
  const auto before = threads();
  std::mutex mutex;
  std::condition_variable cv;
  int reloaded = 0;
  bool release = false;
  std::vector<std::string> errors;
  std::vector<std::thread> callers;
  for (int i = 0; i < 3; ++i)
    callers.emplace_back([&] {
      std::string error;
      try {
        registry.reload("tire");
      } catch (const std::exception& e) {
        error = e.what();
      }
      std::unique_lock<std::mutex> lock(mutex);
      if (!error.empty()) errors.push_back(error);
      ++reloaded;
      cv.notify_all();
      cv.wait(lock, [&] { return release; });
    });
  {
    std::unique_lock<std::mutex> lock(mutex);
    cv.wait(lock, [&] { return reloaded == 3; });
  }
  // At most the callers more: a thread counted in `before` (load_all's warm-up) may have ended since.
  EXPECT_LE(threads(), before + 3);
  {
    std::lock_guard<std::mutex> lock(mutex);
    release = true;
  }
  cv.notify_all();
  for (auto& caller : callers) caller.join();
  EXPECT_TRUE(errors.empty()) << errors.front();
}

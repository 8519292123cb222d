#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>
#include <thread>

#include <unistd.h>

#include "common_fixtures.h"
#include "patchcore/backbone/resnet.h"
#include "patchcore/bench.h"
#include "patchcore/core/process_memory.h"
#include "patchcore/core/stage_timer.h"
#include "patchcore/io/dataset.h"
#include "patchcore/io/image_batches.h"

using namespace patchcore;
using test::error_of;
namespace fs = std::filesystem;

namespace {

// A tiny data set in MVTec layout: 3 training images, 2 good and 1 defective test image.
std::string tiny_dataset() {
  const std::string root = test::temp_dir() + "/tiny";
  for (const char* dir : {"/train/good", "/test/good", "/test/crack", "/ground_truth/crack"})
    fs::create_directories(root + dir);
  cv::RNG rng(5);
  auto image = [&](const std::string& path) {
    cv::Mat m(80, 96, CV_8UC3);
    rng.fill(m, cv::RNG::UNIFORM, 0, 256);
    ASSERT_TRUE(cv::imwrite(path, m)) << path;
  };
  for (const char* name : {"000.png", "001.png", "002.png"}) image(root + "/train/good/" + name);
  image(root + "/test/good/000.png");
  image(root + "/test/good/001.png");
  image(root + "/test/crack/000.png");
  cv::Mat mask = cv::Mat::zeros(80, 96, CV_8U);
  mask(cv::Rect(10, 10, 20, 20)).setTo(255);
  cv::imwrite(root + "/ground_truth/crack/000_mask.png", mask);
  return root;
}

PatchCoreParams small_params() {
  PatchCoreParams params;
  params.transform.resize = 64;
  params.transform.crop = 64;
  return params;
}

}  // namespace

TEST(StageTimer, AddsUpTimeAndCallsFromManyThreads) {
  StageTimer timer;
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t)
    threads.emplace_back([&] {
      for (int i = 0; i < 100; ++i) timer.add(i % 2 ? "odd" : "even", 0.5);
    });
  for (auto& t : threads) t.join();
  const auto stages = timer.stages();
  ASSERT_EQ(stages.size(), 2u);
  EXPECT_EQ(stages.at("odd").calls, 400);
  EXPECT_DOUBLE_EQ(timer.seconds("odd"), 200.0);
  EXPECT_DOUBLE_EQ(timer.seconds("even"), 200.0);
  EXPECT_EQ(timer.seconds("never"), 0.0);
  timer.clear();
  EXPECT_TRUE(timer.stages().empty());
}

TEST(StageTimer, ScopeTimesItsLifetimeAndIgnoresANullTimer) {
  StageTimer timer;
  const auto start = std::chrono::steady_clock::now();
  {
    StageTimer::Scope scope(&timer, "sleep");
    StageTimer::Scope ignored(nullptr, "sleep");
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  const double outer = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(timer.stages().at("sleep").calls, 1);
  EXPECT_GE(timer.seconds("sleep"), 0.02);
  EXPECT_LE(timer.seconds("sleep"), outer);
}

TEST(PeakRss, CoversMemoryThisProcessTouched) {
  const int64_t before = peak_rss_bytes();
  EXPECT_GT(before, 0);
  const int64_t bytes = 256ll << 20;
  std::vector<char> block(static_cast<size_t>(bytes), 1);  // value-initialised: every page is touched
  EXPECT_GE(peak_rss_bytes(), bytes);
  EXPECT_GE(peak_rss_bytes(), before);
  EXPECT_EQ(block[static_cast<size_t>(bytes) - 1], 1);
}

TEST(AvailableMemory, IsSomeOfThePhysicalMemory) {
  const int64_t physical = static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGESIZE);
  const int64_t available = available_memory_bytes();
  EXPECT_GT(available, 0);
  EXPECT_LE(available, physical);
}

TEST(ImageBatches, ReadsBatchesInOrderWithTheTransform) {
  const std::string root = tiny_dataset();
  std::vector<std::string> paths;
  for (const auto& s : MVTecDataset::test(root)) paths.push_back(s.image_path);
  const ImageTransform transform = small_params().transform;
  StageTimer timer;
  ImageBatches batches(paths, transform, 2, &timer);
  EXPECT_EQ(batches.size(), 3u);
  std::vector<int64_t> sizes;
  std::vector<torch::Tensor> images;
  for (std::vector<torch::Tensor> batch; batches.next(batch);) {
    sizes.push_back(static_cast<int64_t>(batch.size()));
    images.insert(images.end(), batch.begin(), batch.end());
    EXPECT_EQ(batches.done(), images.size());
  }
  EXPECT_EQ(sizes, (std::vector<int64_t>{2, 1}));
  for (size_t i = 0; i < paths.size(); ++i) EXPECT_TRUE(torch::equal(images[i], transform.load(paths[i]))) << paths[i];
  EXPECT_EQ(timer.stages().at("decode").calls, 2);
  EXPECT_EQ(timer.stages().at("decode wait").calls, 2);
}

TEST(ImageBatches, ABadFileFailsItsBatchByName) {
  const std::string root = tiny_dataset();
  const std::string good = root + "/train/good/000.png", missing = root + "/train/good/missing.png";
  ImageBatches batches({good, missing, good}, small_params().transform, 1);
  std::vector<torch::Tensor> batch;
  EXPECT_TRUE(batches.next(batch));
  EXPECT_NE(error_of([&] { batches.next(batch); }).find("missing.png"), std::string::npos);
  // The batches after it are still read; done() counts the failed batch's images too.
  EXPECT_TRUE(batches.next(batch));
  EXPECT_EQ(batches.done(), 3u);
  EXPECT_FALSE(batches.next(batch));
  // Within a batch, whichever thread read them, the first bad file in order is named.
  ImageBatches three({good, root + "/train/good/first-missing.png", missing}, small_params().transform, 3);
  EXPECT_NE(error_of([&] { three.next(batch); }).find("first-missing.png"), std::string::npos);
  // Per image: a bad file costs only itself, and the batch's other images come with their positions.
  ImageBatches per_image({missing, good, root + "/train/good/first-missing.png", good}, small_params().transform, 3);
  ImageBatch first;
  ASSERT_TRUE(per_image.next(first));
  EXPECT_EQ(first.indices, (std::vector<size_t>{1}));
  ASSERT_EQ(first.failures.size(), 2u);
  EXPECT_EQ(first.failures[0].first, 0u);
  EXPECT_NE(error_of([&] { std::rethrow_exception(first.failures[1].second); }).find("first-missing.png"),
            std::string::npos);
  EXPECT_TRUE(torch::equal(first.images[0], small_params().transform.load(good)));
  ImageBatch second;
  ASSERT_TRUE(per_image.next(second));
  EXPECT_EQ(second.indices, (std::vector<size_t>{3}));
  EXPECT_TRUE(second.failures.empty());
  EXPECT_FALSE(per_image.next(second));
  // Dropping batches with a read still in flight waits for it.
  ImageBatches abandoned({good, good, good}, small_params().transform, 1);
  EXPECT_THROW(ImageBatches({good}, small_params().transform, 0), std::invalid_argument);
}

TEST(Bench, ReportsEveryStageOfFitAndPredict) {
  const std::string root = tiny_dataset();
  auto backbone = std::make_shared<ResNetBackbone>("resnet18", std::vector<std::string>{"layer2", "layer3"});
  PatchCore model;
  model.load(backbone, small_params());
  BenchOptions options;
  options.repeat = 2;
  const BenchResult r = bench(model, root, options);
  EXPECT_EQ(r.train_images, 3u);
  EXPECT_EQ(r.test_images, 3u);
  EXPECT_EQ(r.memory_bank_size, 3 * 8 * 8);  // identity sampler: every patch of the 8 x 8 layer2 grid
  EXPECT_EQ(r.repeat, 2);
  std::vector<std::string> fit_stages, predict_stages;
  for (const auto& [stage, s] : r.fit_stage_seconds) {
    fit_stages.push_back(stage);
    EXPECT_GT(s, 0) << stage;
    EXPECT_LE(s, r.fit_seconds) << stage;  // decoding overlaps the other stages, but each runs inside the fit
  }
  for (const auto& [stage, ms] : r.predict_stage_ms_per_image) {
    predict_stages.push_back(stage);
    EXPECT_GT(ms, 0) << stage;
  }
  EXPECT_EQ(fit_stages, (std::vector<std::string>{"backbone", "coreset", "decode", "decode wait", "embedding", "index",
                                                  "normal scores", "store"}));
  EXPECT_EQ(predict_stages,
            (std::vector<std::string>{"backbone", "decode", "decode wait", "embedding", "search", "segmentation"}));
  EXPECT_GT(r.predict_ms_per_image, 0);
  EXPECT_DOUBLE_EQ(r.images_per_second, 1000.0 / r.predict_ms_per_image);
  EXPECT_GT(r.peak_rss_bytes, 0);
  EXPECT_EQ(r.fit_report.patches, r.memory_bank_size);
  EXPECT_EQ(r.fit_report.feature_bytes, r.fit_report.patches * model.params().target_embed_dimension * 4);
  EXPECT_EQ(r.fit_report.scratch_directory, "");  // a few kilobytes: held in memory

  const auto j = nlohmann::json::parse(bench_json(r));
  EXPECT_EQ(j.at("training_feature_bytes").get<int64_t>(), r.fit_report.feature_bytes);
  EXPECT_EQ(j.at("memory_bank_size").get<int64_t>(), r.memory_bank_size);
  EXPECT_EQ(j.at("predict_stage_ms_per_image").at("search").get<double>(), r.predict_stage_ms_per_image.at("search"));
  EXPECT_EQ(j.at("fit_stage_seconds").size(), r.fit_stage_seconds.size());
  const std::string table = format_bench(r);
  for (const auto& stage : predict_stages) EXPECT_NE(table.find(stage), std::string::npos) << stage;
  EXPECT_NE(table.find("peak RSS"), std::string::npos);
  EXPECT_NE(table.find("training features"), std::string::npos);

  options.repeat = 0;
  EXPECT_THROW(bench(model, root, options), std::invalid_argument);
}

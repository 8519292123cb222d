#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "common_fixtures.h"
#include "patchcore/backbone/resnet.h"
#include "patchcore/core/file.h"
#include "patchcore/evaluation/evaluation.h"
#include "patchcore/io/image_batches.h"
#include "patchcore/patchcore.h"

using namespace patchcore;
using test::error_of;
using test::load_golden;
using test::max_abs_diff;
namespace fs = std::filesystem;

namespace {

nlohmann::json golden_json() {
  std::ifstream in(test::fixture("patchcore/tire_identity.json"));
  return nlohmann::json::parse(in);
}

// ResNet-18 with the shared weights and the reference's defaults, memory bank = every training patch. The golden
// pipeline (scripts/fixtures/make_patchcore.py) runs torchvision in eval mode on the checkpoint's statistics.
std::unique_ptr<PatchCore> fitted_on_tire(const std::string& weights, const std::string& data) {
  auto model = std::make_unique<PatchCore>("cpu");
  PatchCoreParams params;
  params.batchnorm_statistics = BatchNormStatistics::kCheckpoint;
  model->load(load_backbone("resnet18", weights, {"layer2", "layer3"}), params);
  std::vector<std::string> train;
  const auto golden = golden_json();
  for (const auto& name : golden["train"]) train.push_back(data + "/" + name.get<std::string>());
  model->fit(train);
  return model;
}

torch::Tensor tire_test_images(const std::string& data) {
  std::vector<torch::Tensor> images;
  const auto golden = golden_json();
  for (const auto& name : golden["test"]) images.push_back(ImageTransform{}.load(data + "/" + name.get<std::string>()));
  return torch::stack(images);
}

}  // namespace

TEST(PatchCore, TireEmbeddingScoresAndMapsMatchAnIndependentTorchPipeline) {
  PATCHCORE_REQUIRE_SHARED(weights, "weights/resnet18-imagenet-stem-to-layer3.pth");
  PATCHCORE_REQUIRE_SHARED(data, "data/tire");
  const auto golden = golden_json();
  auto model = fitted_on_tire(weights, data);
  EXPECT_EQ(model->memory_bank_size(), golden["bank_rows"].get<int64_t>());

  const torch::Tensor images = tire_test_images(data);
  std::vector<int64_t> grid;
  const torch::Tensor embedding = model->embed(images, &grid);
  EXPECT_EQ(grid, (std::vector<int64_t>{28, 28}));
  const auto rows = golden["rows"].get<std::vector<int64_t>>();
  const torch::Tensor selected = embedding.index_select(0, torch::tensor(rows));
  EXPECT_LT(max_abs_diff(selected, load_golden("patchcore/tire_test_embedding_rows.npy")), 1e-4);

  const PredictResult result = model->predict(images);
  const auto expected_scores = golden["image_scores"].get<std::vector<double>>();
  const auto expected_sums = golden["map_sums"].get<std::vector<double>>();
  const torch::Tensor expected_maps = load_golden("patchcore/tire_maps_every_8th.npy");
  for (size_t i = 0; i < expected_scores.size(); ++i) {
    EXPECT_NEAR(result.scores[i], expected_scores[i], 1e-3 * expected_scores[i]) << i;
    EXPECT_NEAR(result.masks[i].to(torch::kFloat64).sum().item<double>(), expected_sums[i], 1e-4 * expected_sums[i])
        << i;
    const torch::Tensor subsampled = result.masks[i].slice(0, 0, 224, 8).slice(1, 0, 224, 8);
    EXPECT_LT(max_abs_diff(subsampled, expected_maps[static_cast<int64_t>(i)]), 1e-3 * expected_scores[i]) << i;
  }
}

TEST(Evaluation, MetricsOnARealSubsetMatchSklearnOnTheIndependentPipeline) {
  PATCHCORE_REQUIRE_SHARED(weights, "weights/resnet18-imagenet-stem-to-layer3.pth");
  PATCHCORE_REQUIRE_SHARED(data, "data/tire");
  const auto golden = golden_json();
  auto model = fitted_on_tire(weights, data);
  std::vector<Sample> subset;
  const auto all = MVTecDataset::test(data);
  for (const auto& name : golden["test"]) {
    const std::string path = data + "/" + name.get<std::string>();
    auto it = std::find_if(all.begin(), all.end(), [&](const Sample& s) { return fs::equivalent(s.image_path, path); });
    ASSERT_NE(it, all.end()) << path;
    subset.push_back(*it);
  }
  EvaluationOptions options;
  options.batch_size = 4;  // batches of 4 and 2: results must not depend on batching
  const EvaluationResult r = evaluate(*model, subset, options);
  ASSERT_EQ(r.images.size(), subset.size());
  EXPECT_NEAR(r.image.auroc, golden["image_auroc"].get<double>(), 1e-9);
  EXPECT_NEAR(r.pixel.auroc, golden["pixel_auroc"].get<double>(), 1e-4);
  EXPECT_NEAR(r.pixel_auroc_defective, golden["pixel_auroc_defective"].get<double>(), 1e-4);
  const auto expected_scores = golden["image_scores"].get<std::vector<double>>();
  for (size_t i = 0; i < subset.size(); ++i)
    EXPECT_NEAR(r.images[i].score, expected_scores[i], 1e-3 * expected_scores[i]);
  // AUPRO of the same maps and masks, as the metrics module computes it.
  std::vector<cv::Mat> maps, masks;
  for (const auto& image : r.images) maps.push_back(image.anomaly_map), masks.push_back(image.mask);
  EXPECT_DOUBLE_EQ(r.pro.aupro, aupro(maps, masks, 0.3));
}

TEST(PatchCore, ModelDirectoryRoundTripNeedsNoOtherFlags) {
  PATCHCORE_REQUIRE_SHARED(weights, "weights/resnet18-imagenet-stem-to-layer3.pth");
  PATCHCORE_REQUIRE_SHARED(data, "data/tire");
  auto model = fitted_on_tire(weights, data);
  const std::string dir = test::temp_dir() + "/model";
  model->save_to_path(dir);
  auto loaded = PatchCore::load_from_path(dir);
  const torch::Tensor images = tire_test_images(data);
  const PredictResult a = model->predict(images), b = loaded->predict(images);
  EXPECT_EQ(a.scores, b.scores);
  for (size_t i = 0; i < a.masks.size(); ++i) EXPECT_TRUE(torch::equal(a.masks[i], b.masks[i]));

  // Saving over an existing model replaces it whole.
  model->save_to_path(dir);
  EXPECT_EQ(PatchCore::load_from_path(dir)->memory_bank_size(), model->memory_bank_size());

  // Damaged copies: each error names the file at fault.
  auto damaged = [&](const std::string& name, const std::function<void(const std::string&)>& damage) {
    const std::string copy = test::temp_dir() + "/" + name;
    fs::copy(dir, copy, fs::copy_options::recursive);
    damage(copy);
    return error_of([&] { PatchCore::load_from_path(copy); });
  };
  // A copy whose patchcore_params.json went through `edit`.
  auto edited = [&](const std::string& name, const std::function<void(nlohmann::json&)>& edit) {
    return damaged(name, [&](const std::string& d) {
      std::ifstream in(d + "/patchcore_params.json");
      auto j = nlohmann::json::parse(in);
      edit(j);
      std::ofstream(d + "/patchcore_params.json") << j.dump();
    });
  };
  EXPECT_NE(damaged("no_index", [](const std::string& d) { fs::remove(d + "/nnscorer_search_index.faiss"); })
                .find("nnscorer_search_index.faiss"),
            std::string::npos);
  EXPECT_NE(damaged("no_params", [](const std::string& d) { fs::remove(d + "/patchcore_params.json"); })
                .find("patchcore_params.json: no such file"),
            std::string::npos);
  EXPECT_NE(
      damaged("bad_json", [](const std::string& d) { std::ofstream(d + "/patchcore_params.json") << "{\"format\": "; })
          .find("malformed JSON"),
      std::string::npos);
  EXPECT_NE(edited("future", [](nlohmann::json& j) { j["version"] = 99; }).find("newer patchcore (format version 99"),
            std::string::npos);
  EXPECT_NE(damaged("weights", [](const std::string& d) { fs::resize_file(d + "/backbone.pth", 1000); })
                .find("backbone.pth: backbone weights do not match"),
            std::string::npos);
  EXPECT_NE(edited("dimension", [](nlohmann::json& j) { j["target_embed_dimension"] = 512; })
                .find("index has dimension 1024, the model's embedding has 512"),
            std::string::npos);
  EXPECT_NE(edited("type", [](nlohmann::json& j) { j["patchsize"] = "three"; })
                .find("patchsize must be an integer in [1, 31], got \"three\""),
            std::string::npos);
  EXPECT_NE(edited("missing", [](nlohmann::json& j) { j.erase("patchsize"); }).find("bad or missing field"),
            std::string::npos);
  // A float where an integer belongs is refused, never converted: beyond the integer's range that is undefined.
  EXPECT_NE(edited("float_crc", [](nlohmann::json& j) { j["backbone.weights"]["crc32"] = 4.29e19; })
                .find("backbone.weights.crc32 must be an integer in [0, 4294967295]"),
            std::string::npos);
  EXPECT_NE(edited("float_patches", [](nlohmann::json& j) { j["normal_patch_scores"]["patches"] = 1e30; })
                .find("normal_patch_scores.patches must be an integer"),
            std::string::npos);
  EXPECT_NE(edited("escape", [](nlohmann::json& j) { j["backbone.weights"]["file"] = "../backbone.pth"; })
                .find("backbone.weights.file must name a file inside the model directory, got '../backbone.pth'"),
            std::string::npos);
}

TEST(PatchCore, StreamedFitEqualsFitFeaturesOnAllEmbeddingsWithinItsBudget) {
  PATCHCORE_REQUIRE_SHARED(weights, "weights/resnet18-imagenet-stem-to-layer3.pth");
  PATCHCORE_REQUIRE_SHARED(tire, "data/tire");
  std::vector<std::string> train;
  for (const auto& s : MVTecDataset::train(tire)) train.push_back(s.image_path);
  train.resize(3);
  const PatchCoreParams params;
  const auto backbone = load_backbone("resnet18", weights, params.layers_to_extract_from);
  auto make = [&] {
    auto model = std::make_unique<PatchCore>();
    model->load(backbone, params, std::make_shared<ApproximateGreedyCoresetSampler>(0.1));
    return model;
  };
  FitOptions options;
  options.batch_size = 2;  // a batch of 2, then one of 1
  options.scratch_directory = test::temp_dir();
  options.memory_budget_bytes = int64_t{64} << 30;
  const auto streamed = make();
  const FitReport report = streamed->fit(train, options);
  EXPECT_TRUE(fs::is_empty(options.scratch_directory));
  EXPECT_EQ(report.scratch_directory, options.scratch_directory);
  EXPECT_EQ(report.patches, 3 * 784);
  EXPECT_EQ(report.feature_bytes, report.patches * params.target_embed_dimension * 4);
  // Without a scratch directory, features that fit the budget wait in memory.
  FitOptions in_memory_options = options;
  in_memory_options.scratch_directory.clear();
  const auto held = make();
  EXPECT_EQ(held->fit(train, in_memory_options).scratch_directory, "");

  // The same batches embedded and held at once, then subsampled.
  const auto in_memory = make();
  std::vector<torch::Tensor> embedded;
  ImageBatches batches(train, params.transform, options.batch_size);
  for (std::vector<torch::Tensor> images; batches.next(images);) embedded.push_back(in_memory->embed(images));
  in_memory->fit_features(torch::cat(embedded));
  const int64_t rows = streamed->memory_bank_size();
  ASSERT_EQ(rows, 3 * 784 / 10);
  ASSERT_EQ(in_memory->memory_bank_size(), rows);
  const std::string work = test::temp_dir();
  streamed->anomaly_scorer().nn_method().save(work + "/streamed.faiss");
  held->anomaly_scorer().nn_method().save(work + "/held.faiss");
  in_memory->anomaly_scorer().nn_method().save(work + "/in_memory.faiss");
  EXPECT_TRUE(read_file(work + "/streamed.faiss") == read_file(work + "/in_memory.faiss"));
  EXPECT_TRUE(read_file(work + "/held.faiss") == read_file(work + "/in_memory.faiss"));

  // A budget below what is already in use is refused before the long work, and the fitted bank stays.
  options.memory_budget_bytes = int64_t{1} << 20;
  const std::string message = error_of([&] { streamed->fit(train, options); });
  EXPECT_NE(message.find("2352 training patches need about"), std::string::npos) << message;
  EXPECT_NE(message.find("more than the memory budget of 1 MiB"), std::string::npos) << message;
  EXPECT_EQ(streamed->memory_bank_size(), rows);
  options.memory_budget_bytes = -1;
  EXPECT_THROW(streamed->fit(train, options), std::invalid_argument);
}

TEST(PatchCore, EmbedEqualsTheStepByStepReferencePathForOtherSettings) {
  // Untrained ResNet-18 (seeded), three layers, 5 x 5 patches and dimensions whose bins straddle layers.
  torch::manual_seed(11);
  const std::vector<std::string> layers{"layer1", "layer2", "layer3"};
  auto backbone = std::make_shared<ResNetBackbone>("resnet18", layers);
  PatchCoreParams params;
  params.layers_to_extract_from = layers;
  params.patchsize = 5;
  params.pretrain_embed_dimension = 300;
  params.target_embed_dimension = 200;
  params.transform.resize = params.transform.crop = 64;
  PatchCore model;
  model.load(backbone, params);
  const torch::Tensor images = torch::randn({2, 3, 64, 64});
  std::vector<int64_t> grid, reference_grid;
  StageTimer timer;
  const torch::Tensor embedding = model.embed(images, &grid, &timer);
  EXPECT_EQ(timer.stages().size(), 2u);  // backbone, embedding
  std::vector<torch::Tensor> features;
  for (const auto& item : backbone->extract(images, layers)) features.push_back(item.value());
  const torch::Tensor expected = reference_embedding(features, PatchMaker(5), Preprocessing({64, 128, 256}, 300),
                                                     Aggregator(200), &reference_grid);
  EXPECT_EQ(grid, reference_grid);
  EXPECT_EQ(grid, (std::vector<int64_t>{16, 16}));
  EXPECT_LT(max_abs_diff(embedding, expected) / expected.abs().max().item<double>(), 1e-5);
}

TEST(PatchCore, RejectsUseBeforeLoadOrFitAndBadParameters) {
  PatchCore model;
  EXPECT_THROW(model.predict(torch::zeros({1, 3, 32, 32})), std::logic_error);
  auto backbone = std::make_shared<ResNetBackbone>("resnet18", std::vector<std::string>{"layer2", "layer3"});
  PatchCoreParams params;
  params.anomaly_scorer_num_nn = 0;
  EXPECT_THROW(model.load(backbone, params), std::invalid_argument);
  params.anomaly_scorer_num_nn = 1;
  params.transform.crop = 64;
  params.transform.resize = 64;
  model.load(backbone, params);
  EXPECT_THROW(model.predict(torch::zeros({1, 3, 64, 64})), std::logic_error);
  EXPECT_THROW(model.fit(std::vector<std::string>{}), std::invalid_argument);
  EXPECT_NE(error_of([&] { model.fit({"/nonexistent/image.png"}); }).find("/nonexistent/image.png"), std::string::npos);
}

#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "patchcore/evaluation/metrics.h"
#include "support.h"

namespace fs = std::filesystem;

namespace {

using patchcore::test::CliRun;
using patchcore::test::read_csv;
using patchcore::test::run_cli_line;

// A small MVTec-layout folder of links to real tire images: 3 good training images, 2 good and
// 2 cut test images with their masks.
std::string tiny_tire(const std::string& tire) {
  return patchcore::test::linked_data_set(
      tire, {"train/good/000.png", "train/good/001.png", "train/good/002.png", "test/good/000.png", "test/good/001.png",
             "test/cut/000.png", "test/cut/001.png", "ground_truth/cut/000_mask.png", "ground_truth/cut/001_mask.png"});
}

}  // namespace

TEST(Cli, FitPredictEvaluateEndToEnd) {
  PATCHCORE_REQUIRE_SHARED(weights, "weights/resnet18-imagenet-stem-to-layer3.pth");
  PATCHCORE_REQUIRE_SHARED(tire, "data/tire");
  const std::string data = tiny_tire(tire);
  const std::string work = patchcore::test::temp_dir();

  CliRun fit = run_cli_line("fit --data " + data + " --weights " + weights + " --out " + work +
                            "/model --coreset 0.25 --seed 3");
  ASSERT_EQ(fit.status, 0) << fit.output();
  EXPECT_NE(fit.output().find("memory bank of 588 patches from 2352"), std::string::npos)
      << fit.output();  // int(3·784·0.25)
  EXPECT_NE(fit.output().find("the training features (9 MiB) waited for the coreset in memory"), std::string::npos)
      << fit.output();  // 2352 x 1024 x 4 bytes

  CliRun predict = run_cli_line("predict --model " + work + "/model " + data + "/test/cut " + data +
                                "/test/good/000.png --out " + work + "/pred");
  ASSERT_EQ(predict.status, 0) << predict.output();
  for (const char* f : {"scores.csv", "summary.json", "000_overlay.png", "000_map.npy", "001_map.npy", "000_1_map.npy"})
    EXPECT_TRUE(fs::exists(work + "/pred/" + f)) << f;

  CliRun evaluate = run_cli_line("evaluate --model " + work + "/model --data " + data + " --out " + work +
                                 "/report --json " + work + "/metrics.json");
  ASSERT_EQ(evaluate.status, 0) << evaluate.output();
  std::ifstream json_file(work + "/metrics.json");
  const auto metrics = nlohmann::json::parse(json_file);
  for (const char* key : {"image_auroc", "pixel_auroc", "pixel_auroc_defective", "aupro", "images", "ms_per_image"})
    EXPECT_TRUE(metrics.contains(key)) << key;
  EXPECT_EQ(metrics["images"].get<int>(), 4);
  for (const char* f : {"scores.csv", "roc_image.png", "roc_pixel.png", "metrics.json", "overlays/cut_000.png"})
    EXPECT_TRUE(fs::exists(work + "/report/" + f)) << f;

  // The image AUROC in the JSON is the AUROC of the scores in the CSV, and evaluate scores each image
  // as predict does.
  const auto rows = read_csv(work + "/report/scores.csv");
  ASSERT_EQ(rows.size(), 5u);
  std::vector<float> scores;
  std::vector<uint8_t> labels;
  for (size_t i = 1; i < rows.size(); ++i) scores.push_back(std::stof(rows[i][3])), labels.push_back(rows[i][2] == "1");
  EXPECT_NEAR(metrics["image_auroc"].get<double>(), patchcore::auroc(scores, labels), 1e-12);
  const auto predicted = read_csv(work + "/pred/scores.csv");
  ASSERT_EQ(predicted.size(), 4u);
  EXPECT_EQ(predicted[1][0], data + "/test/cut/000.png");
  EXPECT_NEAR(std::stof(predicted[1][1]), std::stof(rows[1][3]), 1e-5 * std::stof(rows[1][3]));  // test/cut/000.png
}

TEST(Cli, PredictsAndEvaluatesWithAModelThePublishedCodeSaved) {
  PATCHCORE_REQUIRE_SHARED(weights, "weights/resnet18-imagenet-stem-to-layer3.pth");
  PATCHCORE_REQUIRE_SHARED(tire, "data/tire");
  const std::string data = tiny_tire(tire);
  const std::string work = patchcore::test::temp_dir();
  for (const char* kind : {"single", "ensemble"}) {
    const std::string model = patchcore::test::fixture(std::string("parity/published/") + kind);
    const CliRun predict = run_cli_line("predict --model " + model + " --weights " + weights + " " + data +
                                        "/test/good --out " + work + "/pred_" + kind);
    ASSERT_EQ(predict.status, 0) << predict.output();
    EXPECT_EQ(read_csv(work + "/pred_" + kind + "/scores.csv").size(), 3u) << kind;
    const CliRun evaluate = run_cli_line("evaluate --model " + model + " --weights " + weights + " --data " + data +
                                         " --json " + work + "/metrics_" + kind + ".json");
    ASSERT_EQ(evaluate.status, 0) << evaluate.output();
    EXPECT_NE(evaluate.output().find("image_auroc"), std::string::npos) << evaluate.output();
  }
  const CliRun without_weights = run_cli_line("predict --model " + patchcore::test::fixture("parity/published/single") +
                                              " " + data + "/test/good --out " + work + "/none");
  EXPECT_NE(without_weights.status, 0);
  EXPECT_NE(without_weights.output().find("give them with --weights"), std::string::npos) << without_weights.output();
}

TEST(Cli, BadInputGivesOneLineErrorAndNonZeroExit) {
  PATCHCORE_REQUIRE_SHARED(weights, "weights/resnet18-imagenet-stem-to-layer3.pth");
  PATCHCORE_REQUIRE_SHARED(tire, "data/tire");
  const std::string data = tiny_tire(tire);
  const std::string out = patchcore::test::temp_dir() + "/model";
  const std::string fit = "fit --data " + data + " --weights " + weights + " --out " + out;
  struct Case {
    std::string args, expected;
  } cases[] = {
      {"fit --data /nonexistent --weights " + weights + " --out " + out, "/nonexistent"},
      {fit + " --coreset 1.5", "--coreset"},
      {fit + " --coreset 0", "--coreset must be strictly between 0 and 1"},
      {fit + " --k 0", "--k"},
      {fit + " --layers layer2,layer9", "unknown layer 'layer9'"},
      {fit + " --backbone resnet19", "unknown backbone 'resnet19'"},
      {fit + " --sampler random --coreset 0.1 --k 300",
       "memory bank of 235 rows is smaller than n_nearest_neighbours 300"},
      {fit + " --k 2000", "k (anomaly_scorer_num_nn) must be in [1, 1024], got 2000"},
      {"fit --data " + data + " --weights " + data + "/train/good/000.png --out " + out, "000.png"},
      {"predict --model " + data + " " + data + "/test/good --out " + out, "patchcore_params.json"},
      {"evaluate --model /nonexistent --data " + data, "/nonexistent"},
      {"frobnicate", "subcommand is required"},
  };
  for (const auto& c : cases) {
    const CliRun r = run_cli_line(c.args);
    EXPECT_NE(r.status, 0) << c.args;
    EXPECT_NE(r.output().find(c.expected), std::string::npos) << c.args << "\n" << r.output();
    EXPECT_FALSE(fs::exists(out)) << "a failed run left a model behind: " << c.args;
  }
  EXPECT_EQ(run_cli_line("fit --help").status, 0);
}

// From a score to a decision, as a user deploying on a line meets it: calibrate a model, predict OK/NG with masks and
// overlays on the original images, evaluate with or without masks, and open the HTML report in a browser.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <opencv2/imgcodecs.hpp>
#include <sstream>

#include "patchcore/evaluation/metrics.h"
#include "patchcore/io/image.h"
#include "patchcore/io/npy.h"
#include "support.h"

namespace fs = std::filesystem;
using patchcore::test::CliRun;
using patchcore::test::read_csv;
using patchcore::test::run_cli;

namespace {

// Three training images, a labelled test split (two good, two cut with masks) and, apart, three good images the
// model never saw for good-only calibration; one model fitted on them for every test of this file.
struct Fixture {
  std::string data, validation, unlabelled, model;
};

std::vector<std::string> test_split() {
  return {"test/good/000.png", "test/good/001.png", "test/cut/000.png", "test/cut/001.png"};
}

const Fixture* fixture() {
  static const Fixture* f = []() -> const Fixture* {
    const std::string weights = patchcore::test::shared("weights/resnet18-imagenet-stem-to-layer3.pth");
    const std::string tire = patchcore::test::shared("data/tire");
    if (weights.empty() || tire.empty()) return nullptr;
    auto* made = new Fixture;
    std::vector<std::string> files = test_split();
    files.insert(files.end(), {"train/good/000.png", "train/good/001.png", "train/good/002.png",
                               "ground_truth/cut/000_mask.png", "ground_truth/cut/001_mask.png"});
    made->data = patchcore::test::linked_data_set(tire, files);
    // The same test split without ground_truth: labelled by image only.
    std::vector<std::string> unlabelled = test_split();
    unlabelled.push_back("train/good/000.png");
    made->unlabelled = patchcore::test::linked_data_set(tire, unlabelled);
    // Good images only, in the train/good place, none of them fitted on.
    const std::string validation = patchcore::test::temp_dir() + "/validation";
    for (const char* name : {"002.png", "003.png", "004.png"}) {
      fs::create_directories(validation + "/train/good");
      fs::create_symlink(tire + "/test/good/" + name, validation + "/train/good/" + name);
    }
    made->validation = validation;
    made->model = patchcore::test::fit_with_cli(made->data, {"--sampler", "random", "--coreset", "0.25"});
    return made;
  }();
  return f;
}

#define REQUIRE_FIXTURE(f)      \
  const Fixture* f = fixture(); \
  if (!f) GTEST_SKIP() << "../shared is absent; test skipped"

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

// A copy of the fixture's model, so that tests calibrating it do not see each other's thresholds.
std::string model_copy(const Fixture& f) {
  const std::string copy = patchcore::test::temp_dir() + "/model";
  fs::copy(f.model, copy, fs::copy_options::recursive);
  return copy;
}

// Image scores as predict prints them with --json, by path.
std::map<std::string, float> predicted_scores(const std::string& model, const std::vector<std::string>& images) {
  std::vector<std::string> args{"predict", "--json", "--model", model};
  args.insert(args.end(), images.begin(), images.end());
  const CliRun r = run_cli(args);
  EXPECT_EQ(r.status, 0) << r.err;
  std::map<std::string, float> scores;
  std::stringstream lines(r.out);
  for (std::string line; std::getline(lines, line);) {
    const auto j = nlohmann::json::parse(line);
    scores[j["image"].get<std::string>()] = j["score"].get<float>();
  }
  return scores;
}

}  // namespace

TEST(Decisions, CalibratedFromGoodImagesOnlyPredictLabelsWithMasksAndOverlaysAtFullResolution) {
  REQUIRE_FIXTURE(f);
  const std::string model = model_copy(*f);
  const CliRun calibrate = run_cli({"calibrate", "--model", model, "--data", f->validation, "--quantile", "0.9"});
  ASSERT_EQ(calibrate.status, 0) << calibrate.output();
  EXPECT_NE(calibrate.out.find("quantile 0.9 of 3 good images' scores"), std::string::npos) << calibrate.out;

  // The stored threshold is the quantile of the validation images' scores, and says where it came from.
  const auto calibration = read_json(model + "/patchcore_params.json")["calibration"];
  std::vector<std::string> validation;
  for (const auto& e : fs::directory_iterator(f->validation + "/train/good")) validation.push_back(e.path().string());
  std::vector<float> scores;
  for (const auto& [path, score] : predicted_scores(model, validation)) scores.push_back(score);
  const double threshold = calibration["image"]["value"].get<double>();
  EXPECT_NEAR(threshold, patchcore::quantile(scores, 0.9), 1e-5 * threshold);
  EXPECT_EQ(calibration["image"]["method"], "quantile");
  EXPECT_EQ(calibration["image"]["good_images"], 3);
  EXPECT_EQ(calibration["pixel"]["method"], "quantile");
  EXPECT_EQ(calibration["data"], fs::absolute(f->validation).lexically_normal().string());

  const std::string out = patchcore::test::temp_dir() + "/pred";
  const CliRun predict =
      run_cli({"predict", "--model", model, f->data + "/test/cut", f->data + "/test/good", "--out", out});
  ASSERT_EQ(predict.status, 0) << predict.output();
  const auto rows = read_csv(out + "/scores.csv");
  ASSERT_EQ(rows.size(), 5u);
  EXPECT_EQ(rows[0], (std::vector<std::string>{"image", "score", "normalized_score", "label", "overlay", "mask", "map",
                                               "error"}));
  for (size_t i = 1; i < rows.size(); ++i) {
    const auto& row = rows[i];
    SCOPED_TRACE(row[0]);
    ASSERT_EQ(row.size(), 8u);
    const double score = std::stod(row[1]), normalized = std::stod(row[2]);
    // OK/NG at the stored threshold, and the normalised score on the same side of 0.5.
    EXPECT_EQ(row[3], score >= threshold ? "NG" : "OK");
    EXPECT_EQ(normalized >= 0.5, score >= threshold);
    EXPECT_GE(normalized, 0.0);
    EXPECT_LE(normalized, 1.0);
    // Mask, overlay and map in the original image's pixels.
    const cv::Mat original = patchcore::load_image_rgb(row[0]);
    const cv::Mat mask = cv::imread(out + "/" + row[5], cv::IMREAD_UNCHANGED);
    const cv::Mat overlay = cv::imread(out + "/" + row[4], cv::IMREAD_UNCHANGED);
    ASSERT_FALSE(mask.empty());
    ASSERT_FALSE(overlay.empty());
    EXPECT_EQ(mask.size(), original.size());
    EXPECT_EQ(mask.type(), CV_8U);
    EXPECT_EQ(overlay.size(), original.size());
    const patchcore::NpyArray map = patchcore::read_npy(out + "/" + row[6]);
    EXPECT_EQ(map.shape, (std::vector<int64_t>{original.rows, original.cols}));
    // The mask marks exactly the map's pixels at or above the pixel threshold (inside the model's view).
    const std::vector<float> values = map.as_float();
    const double pixel_threshold = calibration["pixel"]["value"].get<double>();
    int64_t above = 0;
    for (float v : values) above += v >= pixel_threshold;
    EXPECT_LE(cv::countNonZero(mask), above);
  }
  const auto summary = read_json(out + "/summary.json");
  EXPECT_EQ(summary["image_threshold"]["value"].get<double>(), threshold);
}

TEST(Decisions, CalibratedFromLabelledImagesTheThresholdIsTheF1OptimalOne) {
  REQUIRE_FIXTURE(f);
  const std::string model = model_copy(*f);
  const CliRun calibrate = run_cli({"calibrate", "--model", model, "--data", f->data});
  ASSERT_EQ(calibrate.status, 0) << calibrate.output();
  const auto calibration = read_json(model + "/patchcore_params.json")["calibration"];
  EXPECT_EQ(calibration["image"]["method"], "f1_max");
  EXPECT_EQ(calibration["pixel"]["method"], "f1_max");
  EXPECT_EQ(calibration["image"]["defective_images"], 2);

  std::vector<std::string> images;
  for (const auto& f_ : test_split()) images.push_back(f->data + "/" + f_);
  std::vector<float> scores;
  std::vector<uint8_t> labels;
  for (const auto& [path, score] : predicted_scores(model, images))
    scores.push_back(score), labels.push_back(path.find("/cut/") != std::string::npos);
  const patchcore::F1Max best = patchcore::precision_recall(scores.data(), labels.data(), scores.size()).f1_max;
  EXPECT_NEAR(calibration["image"]["value"].get<double>(), best.threshold, 1e-5 * best.threshold);
  EXPECT_NEAR(calibration["image"]["f1"].get<double>(), best.f1, 1e-9);

  // evaluate counts the decisions at that threshold.
  const std::string json = patchcore::test::temp_dir() + "/metrics.json";
  const CliRun evaluate = run_cli({"evaluate", "--model", model, "--data", f->data, "--json", json});
  ASSERT_EQ(evaluate.status, 0) << evaluate.output();
  const auto metrics = read_json(json);
  const auto& confusion = metrics["image_confusion"];
  int64_t flagged = 0, flagged_defective = 0;
  for (size_t i = 0; i < scores.size(); ++i)
    if (scores[i] >= best.threshold) ++flagged, flagged_defective += labels[i];
  EXPECT_EQ(confusion["true_positives"].get<int64_t>(), flagged_defective);
  EXPECT_EQ(confusion["false_positives"].get<int64_t>(), flagged - flagged_defective);
  EXPECT_EQ(confusion["true_positives"].get<int64_t>() + confusion["false_negatives"].get<int64_t>(), 2);
  EXPECT_NEAR(metrics["image"]["f1_max"].get<double>(), best.f1, 1e-9);
}

TEST(Decisions, ATestSetWithoutMasksGetsImageMetricsAndSaysWhyNoPixelOnes) {
  REQUIRE_FIXTURE(f);
  const std::string dir = patchcore::test::temp_dir();
  const CliRun with_masks = run_cli({"evaluate", "--model", f->model, "--data", f->data, "--json", dir + "/a.json"});
  const CliRun without = run_cli({"evaluate", "--model", f->model, "--data", f->unlabelled, "--json", dir + "/b.json"});
  ASSERT_EQ(with_masks.status, 0) << with_masks.output();
  ASSERT_EQ(without.status, 0) << without.output();
  const auto a = read_json(dir + "/a.json"), b = read_json(dir + "/b.json");
  EXPECT_EQ(a["image_auroc"].get<double>(), b["image_auroc"].get<double>());
  EXPECT_TRUE(a["pixel_auroc"].is_number());
  EXPECT_TRUE(b["pixel_auroc"].is_null());
  EXPECT_TRUE(b["aupro"].is_null());
  EXPECT_NE(b["pixel_metrics"].get<std::string>().find("image metrics only"), std::string::npos) << b.dump();
  EXPECT_NE(without.out.find("pixel metrics: none"), std::string::npos) << without.out;
  // Per defect type, the image AUROC of cut against good, both ways.
  for (const auto& m : {a, b}) {
    ASSERT_EQ(m["per_defect"].size(), 2u);
    EXPECT_EQ(m["per_defect"][0]["defect_type"], "cut");
    EXPECT_EQ(m["per_defect"][0]["image_auroc"].get<double>(), m["image_auroc"].get<double>());
    EXPECT_TRUE(m["per_defect"][1]["image_auroc"].is_null());  // good
  }
}

TEST(Decisions, TheWholeFrameViewIsFittedPredictedAndEvaluatedOnEveryOriginalPixel) {
  REQUIRE_FIXTURE(f);
  const std::string model = patchcore::test::fit_with_cli(
      f->data, {"--view", "full", "--resize", "160", "--sampler", "random", "--coreset", "0.25"});
  EXPECT_EQ(read_json(model + "/patchcore_params.json")["view"], "full");
  const std::string out = patchcore::test::temp_dir() + "/pred";
  const CliRun predict =
      run_cli({"predict", "--model", model, f->data + "/test/cut", f->data + "/test/good", "--out", out});
  ASSERT_EQ(predict.status, 0) << predict.output();
  // Every map covers its whole frame; evaluate --coordinates original counts exactly those maps' pixels against the
  // original masks.
  std::vector<float> scores;
  std::vector<uint8_t> labels;
  const auto rows = read_csv(out + "/scores.csv");
  ASSERT_EQ(rows.size(), 5u);
  for (size_t i = 1; i < rows.size(); ++i) {
    const std::string& image = rows[i][0];
    SCOPED_TRACE(image);
    const cv::Mat original = patchcore::load_image_rgb(image);
    const patchcore::NpyArray map = patchcore::read_npy(out + "/" + rows[i][6]);
    ASSERT_EQ(map.shape, (std::vector<int64_t>{original.rows, original.cols}));
    const std::vector<float> values = map.as_float();
    scores.insert(scores.end(), values.begin(), values.end());
    cv::Mat mask = cv::Mat::zeros(original.size(), CV_8U);
    const auto cut = image.find("/test/cut/");
    if (cut != std::string::npos) {
      const std::string name = fs::path(image).stem().string();
      mask = patchcore::load_mask(f->data + "/ground_truth/cut/" + name + "_mask.png") > 127;
    }
    for (int y = 0; y < mask.rows; ++y)
      for (int x = 0; x < mask.cols; ++x) labels.push_back(mask.at<uint8_t>(y, x) ? 1 : 0);
  }
  const std::string json = patchcore::test::temp_dir() + "/metrics.json";
  const CliRun evaluate =
      run_cli({"evaluate", "--model", model, "--data", f->data, "--coordinates", "original", "--json", json});
  ASSERT_EQ(evaluate.status, 0) << evaluate.output();
  const auto metrics = read_json(json);
  EXPECT_EQ(metrics["coordinates"], "original");
  EXPECT_NEAR(metrics["pixel_auroc"].get<double>(), patchcore::auroc(scores, labels), 1e-4);
}

TEST(Decisions, AOneClassTestSetIsRefusedBeforeAnyWork) {
  REQUIRE_FIXTURE(f);
  const std::string tire = patchcore::test::shared("data/tire");
  const std::string good_only = patchcore::test::linked_data_set(tire, {"test/good/000.png", "test/good/001.png"});
  const CliRun r = run_cli({"evaluate", "--model", f->model, "--data", good_only});
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.err.find(good_only + "/test holds only good images"), std::string::npos) << r.err;
  // Before the model: a directory that is no model at all still gets the test set's error.
  const CliRun no_model = run_cli({"evaluate", "--model", patchcore::test::temp_dir(), "--data", good_only});
  EXPECT_EQ(no_model.status, 1);
  EXPECT_NE(no_model.err.find("holds only good images"), std::string::npos) << no_model.err;
}

TEST(Decisions, TheHtmlReportRendersInHeadlessChromiumWithEveryPicture) {
  REQUIRE_FIXTURE(f);
  if (std::system("command -v chromium > /dev/null 2>&1") != 0)
    GTEST_SKIP() << "chromium is not installed (scripts/install-deps.sh installs it); test skipped";
  const std::string model = model_copy(*f);
  ASSERT_EQ(run_cli({"calibrate", "--model", model, "--data", f->data}).status, 0);
  const std::string report = patchcore::test::temp_dir() + "/report";
  const CliRun evaluate = run_cli({"evaluate", "--model", model, "--data", f->data, "--out", report});
  ASSERT_EQ(evaluate.status, 0) << evaluate.output();
  for (const char* file : {"report.html", "roc_image.png", "pr_image.png", "roc_pixel.png", "pr_pixel.png", "pro.png",
                           "per_defect.csv", "metrics.json"})
    EXPECT_TRUE(fs::exists(report + "/" + file)) << file;

  const std::string work = patchcore::test::temp_dir();
  const std::string command =
      "timeout 120 chromium --headless --no-sandbox --disable-gpu --no-first-run "
      "--user-data-dir=" +
      work +
      "/profile --enable-logging=stderr --v=0 "
      "--virtual-time-budget=10000 --dump-dom file://" +
      report + "/report.html > " + work + "/dom.html 2> " + work + "/chromium.log";
  ASSERT_EQ(std::system(command.c_str()), 0) << patchcore::test::slurp(work + "/chromium.log");
  const std::string dom = patchcore::test::slurp(work + "/dom.html");
  // The page's own check ran after load and found every picture decoded.
  EXPECT_NE(dom.find("data-rendered=\"ok\""), std::string::npos) << dom.substr(0, 2000);
  for (const char* section : {"id=\"metrics\"", "id=\"defect-types\"", "id=\"curves\"", "Confusion matrix",
                              "Worst false positives", "Worst false negatives"})
    EXPECT_NE(dom.find(section), std::string::npos) << section;
  // No script error on the page's console.
  const std::string log = patchcore::test::slurp(work + "/chromium.log");
  EXPECT_EQ(log.find("Uncaught"), std::string::npos) << log;
}

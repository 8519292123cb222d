#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "common_fixtures.h"
#include "patchcore/backbone/torchscript_backbone.h"
#include "patchcore/decision/threshold.h"
#include "patchcore/model_dir.h"

using namespace patchcore;

namespace {

Threshold example() {
  Threshold t;
  t.value = 10.0;
  t.method = Threshold::Method::kQuantile;
  t.quantile = 0.995;
  t.good_images = 40;
  t.scores = 40;
  t.min = 4.0;
  t.max = 20.0;
  return t;
}

// A small fitted model saved to a directory: the tiny TorchScript extractor on random images.
std::string saved_model() {
  auto backbone = std::make_shared<TorchScriptBackbone>(test::fixture("common/tiny_feature_extractor.pt"));
  PatchCore model;
  model.load(backbone, test::tiny_extractor_params(), std::make_shared<RandomSampler>(0.25, 0));
  torch::manual_seed(5);
  model.fit_features(model.embed(torch::randn({2, 3, 32, 32})));
  const std::string dir = test::temp_dir() + "/model";
  model.save_to_path(dir);
  return dir;
}

}  // namespace

TEST(Threshold, NormalizesAsAnomalibDoesAroundTheThreshold) {
  const Threshold t = example();
  EXPECT_DOUBLE_EQ(t.normalize(t.value), 0.5);
  EXPECT_DOUBLE_EQ(t.normalize(t.value + (t.max - t.min) / 4), 0.75);  // slope 1 / (max - min)
  EXPECT_DOUBLE_EQ(t.normalize(-1e9), 0.0);
  EXPECT_DOUBLE_EQ(t.normalize(1e9), 1.0);
  double previous = -1.0;
  for (double s = -10; s <= 40; s += 0.125) {
    const double n = t.normalize(s);
    EXPECT_GE(n, previous) << s;  // never lower for a higher score
    EXPECT_EQ(n > 0.5, t.is_anomalous(s) && s != t.value) << s;
    previous = n;
  }
  Threshold tied = t;
  tied.min = tied.max = 10.0;  // every calibration score equal: a step, 0.5 at the threshold itself
  EXPECT_EQ(tied.normalize(9.0), 0.0);
  EXPECT_EQ(tied.normalize(10.0), 0.5);
  EXPECT_EQ(tied.normalize(11.0), 1.0);
}

TEST(Threshold, MethodNamesRoundTripAndUnknownOnesAreRefused) {
  for (auto m : {Threshold::Method::kF1Max, Threshold::Method::kQuantile})
    EXPECT_EQ(parse_threshold_method(to_string(m)), m);
  EXPECT_NE(test::error_of([] { parse_threshold_method("otsu"); }).find("'otsu'"), std::string::npos);
}

TEST(Threshold, CalibrationRoundTripsThroughTheModelDirectoryAndLoadsWithTheModel) {
  const std::string dir = saved_model();
  Calibration c;
  c.image = example();
  Threshold pixel = example();
  pixel.method = Threshold::Method::kF1Max;
  pixel.value = 7.25;
  pixel.f1 = 0.625;
  pixel.defective_images = 3;
  pixel.scores = 123456;
  c.pixel = pixel;
  c.data = "/data/validation";
  c.created = "2026-01-02T03:04:05Z";
  write_model_calibration(dir, c);

  const ModelDescription d = read_model_description(dir);
  ASSERT_TRUE(d.calibration.image && d.calibration.pixel);
  EXPECT_EQ(d.calibration.data, c.data);
  EXPECT_EQ(d.calibration.created, c.created);
  for (const auto& [read, written] : {std::pair{*d.calibration.image, *c.image}, std::pair{*d.calibration.pixel, pixel}}) {
    EXPECT_EQ(read.value, written.value);
    EXPECT_EQ(read.method, written.method);
    EXPECT_EQ(read.quantile, written.quantile);
    EXPECT_EQ(read.f1, written.f1);
    EXPECT_EQ(read.good_images, written.good_images);
    EXPECT_EQ(read.defective_images, written.defective_images);
    EXPECT_EQ(read.scores, written.scores);
    EXPECT_EQ(read.min, written.min);
    EXPECT_EQ(read.max, written.max);
  }
  const auto loaded = PatchCore::load_from_path(dir);
  ASSERT_TRUE(loaded->calibration().image.has_value());
  EXPECT_EQ(loaded->calibration().image->value, c.image->value);
  // Saving the loaded model keeps its thresholds.
  const std::string again = test::temp_dir() + "/again";
  loaded->save_to_path(again);
  EXPECT_EQ(read_model_description(again).calibration.pixel->value, pixel.value);
}

TEST(Threshold, ADamagedCalibrationIsRefusedNamingTheFieldAndFile) {
  const std::string dir = saved_model();
  Calibration c;
  c.image = example();
  write_model_calibration(dir, c);
  const std::string path = ModelDescription::path(dir);
  std::ifstream in(path);
  const nlohmann::json good = nlohmann::json::parse(in);
  struct Case {
    const char* key;
    nlohmann::json value;
    const char* expected;
  } cases[] = {
      {"method", "otsu", "unknown threshold method 'otsu'"},
      {"min", 30.0, "calibration.image: min is above max"},
      {"scores", 0, "calibration.image.scores must be an integer in [1,"},
      {"quantile", 2.0, "calibration.image.quantile must be in [0, 1]"},
      {"value", "ten", "bad or missing field"},
  };
  for (const auto& k : cases) {
    nlohmann::json damaged = good;
    damaged["calibration"]["image"][k.key] = k.value;
    std::ofstream(path) << damaged.dump();
    const std::string error = test::error_of([&] { read_model_description(dir); });
    EXPECT_NE(error.find(path), std::string::npos) << error;
    EXPECT_NE(error.find(k.expected), std::string::npos) << k.key << ": " << error;
  }
}

#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <limits>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "patchcore/evaluation/metrics.h"
#include "patchcore/io/npy.h"
#include "support.h"

using namespace patchcore;

namespace {

std::string metrics_fixture(const std::string& name) { return test::fixture("metrics/" + name + ".npy"); }

std::vector<uint8_t> read_u8(const std::string& path) {
  NpyArray a = read_npy(path);
  EXPECT_EQ(a.dtype, "u1") << path;
  return a.data;
}

// Must match lcg_case in scripts/fixtures/make_metrics.py bit for bit.
void lcg_case(uint32_t seed, size_t n, bool fine, std::vector<float>& scores, std::vector<uint8_t>& labels) {
  uint32_t state = seed;
  scores.resize(n);
  labels.resize(n);
  for (size_t i = 0; i < n; ++i) {
    state = 1664525u * state + 1013904223u;
    const uint32_t label = (state >> 16) % 10 < 3 ? 1 : 0;
    state = 1664525u * state + 1013904223u;
    const uint32_t value = fine ? (state >> 8) + label * (1u << 21) : (state >> 8) % 1000 + label * 150;
    labels[i] = static_cast<uint8_t>(label);
    scores[i] = static_cast<float>(value);
  }
}

void expect_matches_sklearn(const std::string& name, const std::vector<float>& scores,
                            const std::vector<uint8_t>& labels) {
  SCOPED_TRACE(name);
  const double expected_auc = read_npy(metrics_fixture(name + "_auroc")).as_double().at(0);
  EXPECT_NEAR(auroc(scores, labels), expected_auc, 1e-12);

  const std::vector<int64_t> index = read_npy(metrics_fixture(name + "_roc_index")).as_int64();
  const std::vector<double> fpr = read_npy(metrics_fixture(name + "_fpr")).as_double();
  const std::vector<double> tpr = read_npy(metrics_fixture(name + "_tpr")).as_double();
  const std::vector<float> thresholds = read_npy(metrics_fixture(name + "_thresholds")).as_float();
  const RocCurve curve = roc_curve(scores.data(), labels.data(), scores.size());
  ASSERT_EQ(curve.fpr.size(), static_cast<size_t>(index.at(0)));
  ASSERT_EQ(curve.tpr.size(), curve.fpr.size());
  ASSERT_EQ(curve.thresholds.size(), curve.fpr.size());
  ASSERT_EQ(index.size() - 1, fpr.size());
  for (size_t k = 0; k < fpr.size(); ++k) {
    const size_t i = static_cast<size_t>(index[k + 1]);
    EXPECT_DOUBLE_EQ(curve.fpr[i], fpr[k]) << "point " << i;
    EXPECT_DOUBLE_EQ(curve.tpr[i], tpr[k]) << "point " << i;
    EXPECT_EQ(curve.thresholds[i], static_cast<double>(thresholds[k])) << "point " << i;
  }

  // The precision-recall curve, average precision and the F1-optimal threshold from the same data.
  const std::vector<int64_t> pr_index = read_npy(metrics_fixture(name + "_pr_index")).as_int64();
  const std::vector<double> precision = read_npy(metrics_fixture(name + "_pr_precision")).as_double();
  const std::vector<double> recall = read_npy(metrics_fixture(name + "_pr_recall")).as_double();
  const std::vector<double> pr_thresholds = read_npy(metrics_fixture(name + "_pr_thresholds")).as_double();
  const std::vector<double> summary = read_npy(metrics_fixture(name + "_pr_summary")).as_double();
  const PrMetrics metrics = precision_recall(scores.data(), labels.data(), scores.size());
  const PrCurve& pr = metrics.curve;
  ASSERT_EQ(pr.thresholds.size(), static_cast<size_t>(pr_index.at(0)));
  ASSERT_EQ(pr.precision.size(), pr.thresholds.size() + 1);
  ASSERT_EQ(pr.recall.size(), pr.thresholds.size() + 1);
  for (size_t k = 0; k < precision.size(); ++k) {
    const size_t i = static_cast<size_t>(pr_index[k + 1]);
    EXPECT_DOUBLE_EQ(pr.precision[i], precision[k]) << "PR point " << i;
    EXPECT_DOUBLE_EQ(pr.recall[i], recall[k]) << "PR point " << i;
    EXPECT_EQ(pr.thresholds[i], pr_thresholds[k]) << "PR point " << i;
  }
  EXPECT_EQ(pr.precision.back(), 1.0);
  EXPECT_EQ(pr.recall.back(), 0.0);
  EXPECT_NEAR(metrics.aupr, summary[0], 1e-12);
  const F1Max& best = metrics.f1_max;
  EXPECT_NEAR(best.f1, summary[1], 1e-12);
  EXPECT_EQ(best.threshold, summary[2]);
}

void expect_fixture_case(const std::string& name) {
  const std::vector<float> scores = read_npy(metrics_fixture(name + "_scores")).as_float();
  const std::vector<uint8_t> labels = read_u8(metrics_fixture(name + "_labels"));
  ASSERT_EQ(scores.size(), labels.size());
  expect_matches_sklearn(name, scores, labels);
}

// Mann-Whitney statistic over all (positive, negative) pairs: the AUROC without any sorting.
double pairwise_auroc(const std::vector<float>& scores, const std::vector<uint8_t>& labels) {
  double wins = 0, pairs = 0;
  for (size_t i = 0; i < scores.size(); ++i) {
    if (!labels[i]) continue;
    for (size_t j = 0; j < scores.size(); ++j) {
      if (labels[j]) continue;
      wins += scores[i] > scores[j] ? 1.0 : scores[i] == scores[j] ? 0.5 : 0.0;
      pairs += 1;
    }
  }
  return wins / pairs;
}

template <typename F>
void expect_invalid_argument(F f, const std::string& fragment) {
  try {
    f();
    FAIL() << "expected std::invalid_argument mentioning '" << fragment << "'";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

}  // namespace

TEST(Auroc, MatchesSklearnWithManyTiesAndSignedZeros) { expect_fixture_case("ties"); }
TEST(Auroc, MatchesSklearnWithDistinctScores) { expect_fixture_case("distinct"); }
TEST(Auroc, MatchesSklearnWhenAllScoresTie) { expect_fixture_case("alltied"); }
TEST(Auroc, MatchesSklearnOnPerfectlySeparatedData) { expect_fixture_case("separated"); }
TEST(Auroc, MatchesSklearnWithMvtecStyle255Labels) { expect_fixture_case("mask255"); }

TEST(Auroc, MatchesSklearnOnLargeTiedLcgData) {
  std::vector<float> scores;
  std::vector<uint8_t> labels;
  lcg_case(12345, 100000, false, scores, labels);
  expect_matches_sklearn("lcg_ties", scores, labels);
}

TEST(Auroc, MatchesSklearnOnLargeDistinctLcgData) {
  std::vector<float> scores;
  std::vector<uint8_t> labels;
  lcg_case(777, 100000, true, scores, labels);
  expect_matches_sklearn("lcg_fine", scores, labels);
}

TEST(Auroc, EqualsPairwiseCountOnRandomTiedData) {
  std::mt19937 rng(3);
  for (int trial = 0; trial < 20; ++trial) {
    const size_t n = 2 + rng() % 150;
    std::vector<float> scores(n);
    std::vector<uint8_t> labels(n);
    for (size_t i = 0; i < n; ++i) {
      labels[i] = static_cast<uint8_t>(i < 2 ? i : rng() % 2);
      scores[i] = static_cast<float>(static_cast<int>(rng() % 7) - 3 + labels[i]) * 0.5f;
    }
    EXPECT_NEAR(auroc(scores, labels), pairwise_auroc(scores, labels), 1e-12) << "trial " << trial;
  }
}

TEST(Auroc, IsExactOnPixelScaleInput) {
  // 112 images of 224^2 pixels with 64 distinct levels; a per-level histogram gives the exact answer.
  const size_t n = 112 * 224 * 224;
  constexpr int kLevels = 64;
  std::mt19937 rng(11);
  std::vector<float> scores(n);
  std::vector<uint8_t> labels(n);
  std::vector<uint64_t> positives(kLevels, 0), negatives(kLevels, 0);
  for (size_t i = 0; i < n; ++i) {
    const uint32_t r = rng();
    labels[i] = (r & 0xff) < 20 ? 255 : 0;
    const int level = static_cast<int>((r >> 8) % 48) + (labels[i] ? 16 : 0);
    scores[i] = static_cast<float>(level) / kLevels;
    (labels[i] ? positives : negatives)[level]++;
  }
  uint64_t twice_wins = 0, negatives_below = 0, total_positives = 0;
  for (int k = 0; k < kLevels; ++k) {
    twice_wins += positives[k] * (2 * negatives_below + negatives[k]);
    negatives_below += negatives[k];
    total_positives += positives[k];
  }
  const double expected = static_cast<double>(twice_wins) /
                          (2.0 * static_cast<double>(total_positives) * static_cast<double>(negatives_below));
  EXPECT_DOUBLE_EQ(auroc(scores, labels), expected);
}

TEST(RocCurve, TrapezoidAreaEqualsAuroc) {
  std::mt19937 rng(5);
  std::vector<float> scores(5000);
  std::vector<uint8_t> labels(5000);
  for (size_t i = 0; i < scores.size(); ++i) {
    labels[i] = rng() % 3 == 0;
    scores[i] = static_cast<float>(rng() % 40 + labels[i] * 5);
  }
  const RocCurve c = roc_curve(scores.data(), labels.data(), scores.size());
  double area = 0;
  for (size_t i = 1; i < c.fpr.size(); ++i) area += (c.fpr[i] - c.fpr[i - 1]) * (c.tpr[i] + c.tpr[i - 1]) / 2;
  EXPECT_NEAR(area, auroc(scores, labels), 1e-12);
  EXPECT_EQ(c.fpr.front(), 0.0);
  EXPECT_EQ(c.tpr.front(), 0.0);
  EXPECT_EQ(c.fpr.back(), 1.0);
  EXPECT_EQ(c.tpr.back(), 1.0);
  for (size_t i = 1; i < c.thresholds.size(); ++i) EXPECT_LT(c.thresholds[i], c.thresholds[i - 1]);
}

TEST(Auroc, RejectsInvalidInput) {
  const std::vector<float> scores{0.1f, 0.4f, 0.35f};
  expect_invalid_argument([&] { auroc(scores, std::vector<uint8_t>{0, 1}); }, "3 scores but 2 labels");
  expect_invalid_argument([&] { auroc(scores, std::vector<uint8_t>{1, 1, 1}); }, "only one class");
  expect_invalid_argument([&] { auroc(scores, std::vector<uint8_t>{0, 0, 0}); }, "only one class");
  expect_invalid_argument([&] { auroc(std::vector<float>{}, std::vector<uint8_t>{}); }, "no samples");
  const std::vector<float> nan{0.1f, std::numeric_limits<float>::quiet_NaN(), 0.3f};
  expect_invalid_argument([&] { auroc(nan, std::vector<uint8_t>{0, 1, 0}); }, "finite");
  const std::vector<uint8_t> one_class{1, 1, 1};
  expect_invalid_argument([&] { roc_curve(scores.data(), one_class.data(), 3); }, "roc_curve: only one class");
}

// ---------------------------------------------------------------------------------------------- AUPRO

namespace {

struct AuproCase {
  std::vector<cv::Mat> maps, masks;
};

AuproCase load_aupro_case(const std::string& name) {
  AuproCase c;
  const NpyArray shapes = read_npy(metrics_fixture(name + "/shapes"));
  const std::vector<int64_t> dims = shapes.as_int64();
  for (int64_t i = 0; i < shapes.shape.at(0); ++i) {
    const NpyArray map = read_npy(metrics_fixture(name + "/map_" + std::to_string(i)));
    NpyArray mask = read_npy(metrics_fixture(name + "/mask_" + std::to_string(i)));
    EXPECT_EQ(map.shape, (std::vector<int64_t>{dims[2 * i], dims[2 * i + 1]}));
    EXPECT_EQ(mask.shape, map.shape);
    EXPECT_EQ(mask.dtype, "u1");
    const int rows = static_cast<int>(map.shape[0]), cols = static_cast<int>(map.shape[1]);
    std::vector<float> values = map.as_float();
    c.maps.push_back(cv::Mat(rows, cols, CV_32F, values.data()).clone());
    c.masks.push_back(cv::Mat(rows, cols, CV_8U, mask.data.data()).clone());
  }
  return c;
}

// Plain 8-connected flood fill, independent of OpenCV's labelling; returns the region count.
int label_regions(const cv::Mat& mask, std::vector<int>& labels) {
  labels.assign(mask.total(), 0);
  int count = 0;
  for (int y0 = 0; y0 < mask.rows; ++y0)
    for (int x0 = 0; x0 < mask.cols; ++x0) {
      if (!mask.at<uint8_t>(y0, x0) || labels[y0 * mask.cols + x0]) continue;
      ++count;
      std::vector<std::pair<int, int>> stack{{y0, x0}};
      labels[y0 * mask.cols + x0] = count;
      while (!stack.empty()) {
        const auto [y, x] = stack.back();
        stack.pop_back();
        for (int dy = -1; dy <= 1; ++dy)
          for (int dx = -1; dx <= 1; ++dx) {
            const int ny = y + dy, nx = x + dx;
            if (ny < 0 || nx < 0 || ny >= mask.rows || nx >= mask.cols) continue;
            if (!mask.at<uint8_t>(ny, nx) || labels[ny * mask.cols + nx]) continue;
            labels[ny * mask.cols + nx] = count;
            stack.push_back({ny, nx});
          }
      }
    }
  return count;
}

// The definition evaluated literally: every distinct score, every pixel, then clipped trapezoids.
double brute_force_aupro(const std::vector<cv::Mat>& maps, const std::vector<cv::Mat>& masks, double limit) {
  std::vector<std::vector<float>> regions;
  std::vector<float> normal;
  std::set<float> distinct;
  for (size_t i = 0; i < maps.size(); ++i) {
    std::vector<int> labels;
    const size_t first = regions.size();
    regions.resize(first + static_cast<size_t>(label_regions(masks[i], labels)));
    for (int y = 0; y < maps[i].rows; ++y)
      for (int x = 0; x < maps[i].cols; ++x) {
        const float s = maps[i].at<float>(y, x);
        distinct.insert(s);
        const int l = labels[y * maps[i].cols + x];
        (l == 0 ? normal : regions[first + static_cast<size_t>(l) - 1]).push_back(s);
      }
  }
  std::vector<std::pair<double, double>> points{{0.0, 0.0}};
  for (auto t = distinct.rbegin(); t != distinct.rend(); ++t) {
    size_t fp = 0;
    for (float s : normal) fp += s >= *t;
    double pro = 0;
    for (const auto& region : regions) {
      size_t hit = 0;
      for (float s : region) hit += s >= *t;
      pro += static_cast<double>(hit) / static_cast<double>(region.size());
    }
    points.push_back(
        {static_cast<double>(fp) / static_cast<double>(normal.size()), pro / static_cast<double>(regions.size())});
  }
  double area = 0;
  for (size_t i = 1; i < points.size(); ++i) {
    const auto [x0, y0] = points[i - 1];
    const auto [x1, y1] = points[i];
    if (x1 <= limit) {
      area += (x1 - x0) * (y0 + y1) / 2;
    } else {
      const double y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0);
      area += (limit - x0) * (y0 + y_limit) / 2;
      break;
    }
  }
  return area / limit;
}

AuproCase random_case(std::mt19937& rng) {
  AuproCase c;
  const int images = 1 + static_cast<int>(rng() % 4);
  for (int i = 0; i < images; ++i) {
    const int rows = 4 + static_cast<int>(rng() % 10), cols = 4 + static_cast<int>(rng() % 10);
    cv::Mat mask(rows, cols, CV_8U), map(rows, cols, CV_32F);
    for (int y = 0; y < rows; ++y)
      for (int x = 0; x < cols; ++x) {
        mask.at<uint8_t>(y, x) = rng() % 5 == 0 ? 255 : 0;
        map.at<float>(y, x) = static_cast<float>(rng() % 9 + (mask.at<uint8_t>(y, x) ? rng() % 4 : 0)) * 0.25f;
      }
    c.maps.push_back(map);
    c.masks.push_back(mask);
  }
  // Guarantee at least one region and one normal pixel.
  c.masks[0].at<uint8_t>(0, 0) = 1;
  c.masks[0].at<uint8_t>(1, 1) = 0;
  return c;
}

}  // namespace

TEST(Quantile, MatchesNumpyLinearInterpolation) {
  const std::vector<double> qs = read_npy(metrics_fixture("quantile_qs")).as_double();
  for (const char* name : {"normal", "ties", "single", "two"}) {
    SCOPED_TRACE(name);
    const std::vector<float> values = read_npy(metrics_fixture(std::string("quantile_") + name + "_values")).as_float();
    const std::vector<double> expected =
        read_npy(metrics_fixture(std::string("quantile_") + name + "_expected")).as_double();
    for (size_t i = 0; i < qs.size(); ++i)
      EXPECT_NEAR(quantile(values, qs[i]), expected[i], 1e-6 * std::abs(expected[i])) << "q " << qs[i];
  }
  expect_invalid_argument([] { quantile({}, 0.5); }, "no values");
  expect_invalid_argument([] { quantile({1.f}, 1.5); }, "q must be in [0, 1]");
  expect_invalid_argument([] { quantile({std::nanf("")}, 0.5); }, "finite");
}

TEST(F1Max, ThresholdSeparatesPerfectlyWhenTheClassesDoNotOverlap) {
  const std::vector<float> scores{0.1f, 0.4f, 0.35f, 0.8f, 0.9f, 0.7f};
  const std::vector<uint8_t> labels{0, 0, 0, 1, 1, 1};
  const F1Max best = precision_recall(scores.data(), labels.data(), scores.size()).f1_max;
  EXPECT_NEAR(best.f1, 1.0, 1e-9);
  EXPECT_EQ(best.threshold, 0.7f);  // the lowest positive: every positive found, no negative
}

TEST(PrecisionRecall, AThinnedCurveKeepsItsEndsAndTheFullCurvesSummaries) {
  std::vector<float> scores;
  std::vector<uint8_t> labels;
  lcg_case(777, 100000, true, scores, labels);
  const PrMetrics full = precision_recall(scores.data(), labels.data(), scores.size());
  const PrMetrics thin = precision_recall(scores.data(), labels.data(), scores.size(), 500);
  EXPECT_LE(thin.curve.thresholds.size(), 501u);
  EXPECT_GE(thin.curve.thresholds.size(), 400u);
  EXPECT_EQ(thin.curve.thresholds.front(), full.curve.thresholds.front());
  EXPECT_EQ(thin.curve.thresholds.back(), full.curve.thresholds.back());
  EXPECT_EQ(thin.curve.precision.size(), thin.curve.thresholds.size() + 1);
  EXPECT_EQ(thin.aupr, full.aupr);
  EXPECT_EQ(thin.f1_max.threshold, full.f1_max.threshold);
}

TEST(ProCurve, AThinnedCurveHasTheSameAreaAndFewerPoints) {
  const AuproCase c = load_aupro_case("aupro_a");
  const ProCurve full = pro_curve(c.maps, c.masks, 0.3);
  const ProCurve thin = pro_curve(c.maps, c.masks, 0.3, 10);
  EXPECT_EQ(thin.aupro, full.aupro);
  EXPECT_LT(thin.fpr.size(), full.fpr.size());
  EXPECT_LE(thin.fpr.size(), 12u);
  EXPECT_DOUBLE_EQ(thin.fpr.back(), 0.3);
}

TEST(Aupro, MatchesPythonBruteForceOnHandPlacedRegions) {
  const AuproCase c = load_aupro_case("aupro_a");
  const std::vector<double> limits = read_npy(metrics_fixture("aupro_a/limits")).as_double();
  const std::vector<double> expected = read_npy(metrics_fixture("aupro_a/expected")).as_double();
  ASSERT_EQ(limits.size(), expected.size());
  for (size_t i = 0; i < limits.size(); ++i)
    EXPECT_NEAR(aupro(c.maps, c.masks, limits[i]), expected[i], 1e-9) << "fpr_limit " << limits[i];
}

TEST(Aupro, MatchesPythonBruteForceOnIrregularBlobsWithCoarseScores) {
  const AuproCase c = load_aupro_case("aupro_b");
  const std::vector<double> limits = read_npy(metrics_fixture("aupro_b/limits")).as_double();
  const std::vector<double> expected = read_npy(metrics_fixture("aupro_b/expected")).as_double();
  ASSERT_EQ(limits.size(), expected.size());
  for (size_t i = 0; i < limits.size(); ++i)
    EXPECT_NEAR(aupro(c.maps, c.masks, limits[i]), expected[i], 1e-9) << "fpr_limit " << limits[i];
}

TEST(Aupro, DefaultLimitIsPointThree) {
  const AuproCase c = load_aupro_case("aupro_a");
  EXPECT_EQ(aupro(c.maps, c.masks), aupro(c.maps, c.masks, 0.3));
}

TEST(ProCurve, TrapezoidAreaUpToTheLimitIsTheAupro) {
  const AuproCase c = load_aupro_case("aupro_b");
  for (double limit : {0.05, 0.3, 1.0}) {
    const ProCurve curve = pro_curve(c.maps, c.masks, limit);
    ASSERT_EQ(curve.fpr.size(), curve.pro.size());
    EXPECT_EQ(curve.fpr.front(), 0.0);
    EXPECT_DOUBLE_EQ(curve.fpr.back(), limit);
    double area = 0;
    for (size_t i = 1; i < curve.fpr.size(); ++i) {
      EXPECT_GE(curve.fpr[i], curve.fpr[i - 1]);
      EXPECT_GE(curve.pro[i], curve.pro[i - 1]);
      area += (curve.fpr[i] - curve.fpr[i - 1]) * (curve.pro[i] + curve.pro[i - 1]) / 2;
    }
    EXPECT_NEAR(area / limit, aupro(c.maps, c.masks, limit), 1e-12) << limit;
  }
}

TEST(Aupro, MatchesCppBruteForceOnRandomInputs) {
  std::mt19937 rng(2024);
  for (int trial = 0; trial < 40; ++trial) {
    const AuproCase c = random_case(rng);
    for (double limit : {0.3, 0.01, 0.5, 1.0})
      EXPECT_NEAR(aupro(c.maps, c.masks, limit), brute_force_aupro(c.maps, c.masks, limit), 1e-12)
          << "trial " << trial << " fpr_limit " << limit;
  }
}

TEST(Aupro, PerfectMapsScoreOneAndInvertedMapsZero) {
  const AuproCase c = load_aupro_case("aupro_a");
  std::vector<cv::Mat> perfect, inverted;
  for (const cv::Mat& mask : c.masks) {
    cv::Mat defect;
    cv::Mat(mask != 0).convertTo(defect, CV_32F, 1.0 / 255.0);
    perfect.push_back(defect);
    inverted.push_back(1.0f - defect);
  }
  for (double limit : {0.3, 0.05, 1.0}) {
    EXPECT_DOUBLE_EQ(aupro(perfect, c.masks, limit), 1.0) << limit;
    if (limit < 1.0) {
      EXPECT_DOUBLE_EQ(aupro(inverted, c.masks, limit), 0.0) << limit;
    }
  }
}

TEST(Aupro, ConstantMapGivesHalfTheLimit) {
  // All pixels tie, so the curve is the single segment (0,0)-(1,1): area limit^2/2, normalised limit/2.
  const AuproCase c = load_aupro_case("aupro_b");
  std::vector<cv::Mat> constant;
  for (const cv::Mat& m : c.maps) constant.push_back(cv::Mat(m.size(), CV_32F, cv::Scalar(0.7)));
  for (double limit : {0.3, 0.05, 0.123, 1.0}) EXPECT_NEAR(aupro(constant, c.masks, limit), limit / 2, 1e-15) << limit;
}

TEST(Aupro, InvariantToStrictlyIncreasingTransformAndImageOrder) {
  std::mt19937 rng(99);
  for (int trial = 0; trial < 10; ++trial) {
    const AuproCase c = random_case(rng);
    std::vector<cv::Mat> transformed;
    for (const cv::Mat& m : c.maps) {
      cv::Mat t(m.size(), CV_32F);
      // Scores are multiples of 0.25 in [0, 3], so exp keeps them distinct and ordered.
      for (int y = 0; y < m.rows; ++y)
        for (int x = 0; x < m.cols; ++x) t.at<float>(y, x) = std::exp(1.5f * m.at<float>(y, x)) - 40.0f;
      transformed.push_back(t);
    }
    const double original = aupro(c.maps, c.masks, 0.3);
    EXPECT_EQ(aupro(transformed, c.masks, 0.3), original) << "trial " << trial;
    const std::vector<cv::Mat> maps_reversed(c.maps.rbegin(), c.maps.rend());
    const std::vector<cv::Mat> masks_reversed(c.masks.rbegin(), c.masks.rend());
    EXPECT_NEAR(aupro(maps_reversed, masks_reversed, 0.3), original, 1e-12) << "trial " << trial;
  }
}

TEST(Aupro, AcceptsNonContiguousViews) {
  const AuproCase c = load_aupro_case("aupro_a");
  std::vector<cv::Mat> map_views, mask_views, map_copies, mask_copies;
  const cv::Rect roi(1, 2, 15, 13);
  for (size_t i = 0; i < c.maps.size(); ++i) {
    map_views.push_back(c.maps[i](roi));
    mask_views.push_back(c.masks[i](roi));
    map_copies.push_back(map_views.back().clone());
    mask_copies.push_back(mask_views.back().clone());
  }
  ASSERT_FALSE(map_views[0].isContinuous());
  EXPECT_EQ(aupro(map_views, mask_views), aupro(map_copies, mask_copies));
  EXPECT_NEAR(aupro(map_views, mask_views), brute_force_aupro(map_copies, mask_copies, 0.3), 1e-12);
}

TEST(Aupro, RejectsInvalidInput) {
  const AuproCase c = load_aupro_case("aupro_a");
  const std::vector<cv::Mat> fewer_masks(c.masks.begin(), c.masks.end() - 1);
  expect_invalid_argument([&] { aupro(c.maps, fewer_masks); }, "6 anomaly maps but 5 masks");

  std::vector<cv::Mat> masks = c.masks;
  masks[2] = cv::Mat::zeros(3, 3, CV_8U);
  expect_invalid_argument([&] { aupro(c.maps, masks); }, "image 2: anomaly map 16x30 and mask 3x3 differ in size");

  std::vector<cv::Mat> maps = c.maps;
  maps[1].convertTo(maps[1], CV_64F);
  expect_invalid_argument([&] { aupro(maps, c.masks); }, "image 1: anomaly map must be CV_32FC1");
  masks = c.masks;
  masks[0].convertTo(masks[0], CV_16U);
  expect_invalid_argument([&] { aupro(c.maps, masks); }, "image 0: mask must be CV_8UC1");

  std::vector<cv::Mat> no_defects;
  for (const cv::Mat& m : c.masks) no_defects.push_back(cv::Mat::zeros(m.size(), CV_8U));
  expect_invalid_argument([&] { aupro(c.maps, no_defects); }, "no defect region");
  std::vector<cv::Mat> all_defect;
  for (const cv::Mat& m : c.masks) all_defect.push_back(cv::Mat(m.size(), CV_8U, cv::Scalar(1)));
  expect_invalid_argument([&] { aupro(c.maps, all_defect); }, "no normal");
  expect_invalid_argument([&] { aupro({}, {}); }, "no defect region");

  for (double limit : {0.0, -0.1, 1.5, std::numeric_limits<double>::quiet_NaN()})
    expect_invalid_argument([&] { aupro(c.maps, c.masks, limit); }, "fpr_limit must be in (0, 1]");

  maps = c.maps;
  maps[3] = maps[3].clone();
  maps[3].at<float>(4, 5) = std::numeric_limits<float>::infinity();
  expect_invalid_argument([&] { aupro(maps, c.masks); }, "aupro: scores must be finite");
}

// Number for number with the published PatchCore: golden outputs of the oracle itself (../shared/reference, run by
// scripts/fixtures/make_parity.py) on small subsets of the shared data sets.
#include <gtest/gtest.h>
#include <torch/script.h>
#include <torch/torch.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "common_fixtures.h"
#include "patchcore/backbone/resnet.h"
#include "patchcore/backbone/torchscript_backbone.h"
#include "patchcore/core/parallel.h"
#include "patchcore/evaluation/evaluation.h"
#include "patchcore/io/dataset.h"
#include "patchcore/io/image_batches.h"
#include "patchcore/io/npy.h"
#include "patchcore/memory_bank/sampler.h"
#include "patchcore/patchcore.h"
#include "patchcore/published_model.h"

using namespace patchcore;

namespace {

torch::Tensor as_tensor(const NpyArray& a) {
  const std::vector<float> values = a.as_float();
  return torch::from_blob(const_cast<float*>(values.data()), a.shape, torch::kFloat32).clone();
}

double max_relative_difference(const torch::Tensor& actual, const torch::Tensor& expected) {
  return ((actual - expected).abs() / expected.abs().clamp_min(1e-12)).max().item<double>();
}

struct Subset {
  std::vector<std::string> train, test;
};

Subset subset(const std::string& data_root, const std::string& name) {
  std::ifstream in(test::fixture("parity/" + name + ".json"));
  const nlohmann::json j = nlohmann::json::parse(in);
  Subset s;
  for (const auto& f : j["train"]) s.train.push_back(data_root + "/" + f.get<std::string>());
  for (const auto& f : j["test"]) s.test.push_back(data_root + "/" + f.get<std::string>());
  return s;
}

// Fits the reference's recipe (ResNet-18, layer2 + layer3, approximate greedy coreset of 10%) on the subset with the
// oracle's randomness injected, and compares the selected rows, the image scores and the maps with the oracle's.
void expect_oracle_results(const std::string& name) {
  PATCHCORE_REQUIRE_SHARED(weights, "weights/resnet18-imagenet-stem-to-layer3.pth");
  PATCHCORE_REQUIRE_SHARED(data, "data/" + name);
  set_num_threads(2);
  const std::string golden_path = test::fixture("parity/" + name + ".npz");
  const auto golden = read_npz(golden_path);
  const Subset files = subset(data, name);

  PatchCoreParams params;  // the reference's defaults, its BatchNorm update included
  auto sampler = std::make_shared<ApproximateGreedyCoresetSampler>(0.1);
  use_reference_randomness(*sampler, golden_path);
  PatchCore model;
  model.load(load_backbone("resnet18", weights, params.layers_to_extract_from), params, sampler);

  // The rows the sampler selects from this build's embeddings of the training images.
  std::vector<torch::Tensor> features;
  ImageBatches batches(files.train, params.transform, 8);
  for (std::vector<torch::Tensor> images; batches.next(images);) features.push_back(model.embed(images));
  const std::vector<int64_t> selected = sampler->select(torch::cat(features));
  const std::vector<int64_t> expected = golden.at("coreset_indices").as_int64();
  ASSERT_EQ(selected.size(), expected.size());
  const auto first_difference = std::mismatch(selected.begin(), selected.end(), expected.begin());
  EXPECT_EQ(first_difference.first, selected.end())
      << "selection " << (first_difference.first - selected.begin()) << " of " << selected.size() << ": row "
      << *first_difference.first << " instead of the oracle's " << *first_difference.second;

  model.fit(files.train);
  std::vector<torch::Tensor> images;
  for (const auto& f : files.test) images.push_back(params.transform.load(f));
  const PredictResult result = model.predict(torch::stack(images));
  const torch::Tensor scores = torch::tensor(result.scores);
  EXPECT_LT(max_relative_difference(scores, as_tensor(golden.at("scores"))), 1e-4) << scores << "\n"
                                                                                   << as_tensor(golden.at("scores"));
  const torch::Tensor maps = torch::stack(result.masks);
  const torch::Tensor golden_maps = as_tensor(golden.at("maps"));
  // Relative to each map's scale: the smallest values of a map carry the float rounding of the largest.
  const torch::Tensor scale = golden_maps.flatten(1).abs().amax(1).view({-1, 1, 1});
  EXPECT_LT(((maps - golden_maps).abs() / scale).max().item<double>(), 1e-3);
}

}  // namespace

TEST(Parity, BatchNormStatisticsAfterLoadEqualThePublishedCodes) {
  PATCHCORE_REQUIRE_SHARED(weights, "weights/resnet18-imagenet-stem-to-layer3.pth");
  const auto golden = read_npz(test::fixture("parity/batchnorm_resnet18.npz"));
  auto backbone = std::dynamic_pointer_cast<ResNetBackbone>(load_backbone("resnet18", weights, {"layer2", "layer3"}));
  ASSERT_TRUE(backbone);
  const auto before = backbone->module()->named_buffers();
  std::map<std::string, torch::Tensor> checkpoint;
  for (const auto& b : before) checkpoint[b.key()] = b.value().clone();

  PatchCore model;
  model.load(backbone, PatchCoreParams{});
  EXPECT_EQ(model.params().batchnorm_statistics, BatchNormStatistics::kReferenceUpdate);
  int compared = 0, moved = 0;
  for (const auto& b : backbone->module()->named_buffers()) {
    if (b.key().find("running_") == std::string::npos) continue;
    const torch::Tensor expected = as_tensor(golden.at(b.key()));
    EXPECT_LT((b.value() - expected).abs().max().item<double>(), 1e-5 * (1.0 + expected.abs().max().item<double>()))
        << b.key();
    moved += !torch::equal(b.value(), checkpoint[b.key()]);
    ++compared;
  }
  EXPECT_EQ(compared, 2 * 15);  // bn1 and the 14 BatchNorms of layer1..layer3, downsample ones included
  EXPECT_EQ(moved, compared);

  // Applied once per backbone; a second model on the same backbone changes nothing.
  std::map<std::string, torch::Tensor> after;
  for (const auto& b : backbone->module()->named_buffers()) after[b.key()] = b.value().clone();
  PatchCore again;
  again.load(backbone, PatchCoreParams{});
  for (const auto& b : backbone->module()->named_buffers()) EXPECT_TRUE(torch::equal(b.value(), after[b.key()]));
  // Asking for the checkpoint's statistics on that backbone is an error rather than a silent mix.
  PatchCoreParams checkpoint_params;
  checkpoint_params.batchnorm_statistics = BatchNormStatistics::kCheckpoint;
  EXPECT_THROW(PatchCore().load(backbone, checkpoint_params), std::invalid_argument);
}

TEST(Parity, CheckpointStatisticsLeaveTheBackboneAsLoaded) {
  PATCHCORE_REQUIRE_SHARED(weights, "weights/resnet18-imagenet-stem-to-layer3.pth");
  auto backbone = std::dynamic_pointer_cast<ResNetBackbone>(load_backbone("resnet18", weights, {"layer2", "layer3"}));
  std::map<std::string, torch::Tensor> checkpoint;
  for (const auto& b : backbone->module()->named_buffers()) checkpoint[b.key()] = b.value().clone();
  PatchCoreParams params;
  params.batchnorm_statistics = BatchNormStatistics::kCheckpoint;
  PatchCore model;
  model.load(backbone, params);
  for (const auto& b : backbone->module()->named_buffers()) EXPECT_TRUE(torch::equal(b.value(), checkpoint[b.key()]));
  EXPECT_EQ(backbone->batchnorm_statistics(), BatchNormStatistics::kCheckpoint);
}

TEST(Parity, TireSubsetEqualsTheOracle) { expect_oracle_results("tire"); }

TEST(Parity, MagneticTileSubsetEqualsTheOracle) { expect_oracle_results("magnetic_tile"); }

TEST(Parity, TorchScriptBackboneGetsTheSameTrainingModeForward) {
  // A scripted create_feature_extractor with a BatchNorm (scripts/fixtures/make_parity.py); torch's statistics
  // after one training-mode forward of an all-ones 3x32x32 image.
  auto backbone = std::make_shared<TorchScriptBackbone>(test::fixture("parity/tiny_bn_extractor.pt"));
  const auto golden = read_npz(test::fixture("parity/tiny_bn_after_update.npz"));
  const PatchCoreParams params = test::tiny_extractor_params();
  PatchCore model;
  model.load(backbone, params);
  EXPECT_EQ(model.params().batchnorm_statistics, BatchNormStatistics::kReferenceUpdate);
  EXPECT_TRUE(model.batchnorm_note().empty());
  std::map<std::string, torch::Tensor> updated;
  for (const auto& b : backbone->module().named_buffers()) updated[b.name] = b.value;
  for (const char* key : {"running_mean", "running_var"})
    EXPECT_LT((updated[std::string("bn.") + key] - as_tensor(golden.at(key))).abs().max().item<double>(), 1e-6) << key;
  // ... and left the module in eval mode: two forwards agree and move nothing.
  const torch::Tensor x = torch::randn({2, 3, 32, 32});
  EXPECT_TRUE(torch::equal(model.embed(x), model.embed(x)));
  EXPECT_TRUE(torch::equal(updated["bn.running_mean"],
                           backbone->module().attr("bn").toModule().attr("running_mean").toTensor()));
}

TEST(Parity, TorchScriptBackboneWithoutBatchNormKeepsItsStatisticsAndSaysWhy) {
  auto backbone = std::make_shared<TorchScriptBackbone>(test::fixture("common/tiny_feature_extractor.pt"));
  const PatchCoreParams params = test::tiny_extractor_params();
  PatchCore model;
  model.load(backbone, params);
  EXPECT_EQ(model.params().batchnorm_statistics, BatchNormStatistics::kCheckpoint);
  EXPECT_NE(model.batchnorm_note().find("has no BatchNorm layers"), std::string::npos) << model.batchnorm_note();
}

namespace {

struct PublishedGolden {
  std::vector<std::string> test;
  std::map<std::string, NpyArray> arrays;
};

PublishedGolden published_golden(const std::string& tire) {
  std::ifstream in(test::fixture("parity/published.json"));
  const nlohmann::json j = nlohmann::json::parse(in);
  PublishedGolden g;
  for (const auto& f : j["test"]) g.test.push_back(tire + "/" + f.get<std::string>());
  g.arrays = read_npz(test::fixture("parity/published_scores.npz"));
  return g;
}

torch::Tensor images_of(const std::vector<std::string>& files, const ImageTransform& transform) {
  std::vector<torch::Tensor> images;
  for (const auto& f : files) images.push_back(transform.load(f));
  return torch::stack(images);
}

}  // namespace

TEST(PublishedModel, SingleModelScoresAsThePublishedCodeScores) {
  PATCHCORE_REQUIRE_SHARED(weights, "weights/resnet18-imagenet-stem-to-layer3.pth");
  PATCHCORE_REQUIRE_SHARED(tire, "data/tire");
  set_num_threads(2);
  const PublishedGolden golden = published_golden(tire);
  const std::string dir = test::fixture("parity/published/single");
  ASSERT_TRUE(is_published_model(dir));
  auto members = load_published_model(dir, weights);
  ASSERT_EQ(members.size(), 1u);
  const PatchCore& model = *members[0];
  EXPECT_EQ(model.params().target_embed_dimension, 64);
  EXPECT_EQ(model.params().batchnorm_statistics, BatchNormStatistics::kReferenceUpdate);
  const PredictResult r = model.predict(images_of(golden.test, model.params().transform));
  EXPECT_LT(max_relative_difference(torch::tensor(r.scores), as_tensor(golden.arrays.at("single"))), 1e-4);
  const torch::Tensor golden_maps = as_tensor(golden.arrays.at("maps"));
  const torch::Tensor scale = golden_maps.flatten(1).abs().amax(1).view({-1, 1, 1});
  EXPECT_LT(((torch::stack(r.masks) - golden_maps).abs() / scale).max().item<double>(), 1e-3);
  // The same through the CLI's loader, which refuses to guess the weights.
  EXPECT_NE(test::error_of([&] { load_model_directory(dir, ""); }).find("give them with --weights"), std::string::npos);
  EXPECT_EQ(load_model_directory(dir, weights).members().size(), 1u);
}

TEST(PublishedModel, EnsembleMembersScoreAsThePublishedOnesAndCombineAsItsEvaluation) {
  PATCHCORE_REQUIRE_SHARED(weights, "weights/resnet18-imagenet-stem-to-layer3.pth");
  PATCHCORE_REQUIRE_SHARED(tire, "data/tire");
  set_num_threads(2);
  const PublishedGolden golden = published_golden(tire);
  PatchCoreEnsemble ensemble(load_published_model(test::fixture("parity/published/ensemble"), weights));
  ASSERT_EQ(ensemble.members().size(), 2u);
  EXPECT_EQ(ensemble.members()[1]->params().layers_to_extract_from, (std::vector<std::string>{"layer3"}));
  const torch::Tensor images = images_of(golden.test, ensemble.params().transform);
  std::vector<torch::Tensor> member_scores;
  for (size_t m = 0; m < 2; ++m) {
    member_scores.push_back(torch::tensor(ensemble.members()[m]->predict(images).scores));
    EXPECT_LT(max_relative_difference(member_scores[m], as_tensor(golden.arrays.at("member" + std::to_string(m + 1)))),
              1e-4)
        << "member " << m + 1;
  }
  // predict: each member's scores over its bank scale, averaged.
  ASSERT_EQ(ensemble.scales().size(), 2u);
  const torch::Tensor combined = torch::tensor(ensemble.predict(images.unbind(0)).scores);
  const torch::Tensor expected =
      (member_scores[0] / ensemble.scales()[0] + member_scores[1] / ensemble.scales()[1]) / 2;
  EXPECT_LT(max_relative_difference(combined, expected), 1e-5);

  // evaluate: the published min-max combination over the test set.
  const std::string data =
      test::linked_data_set(tire, {"test/good/000.png", "test/cut/000.png", "ground_truth/cut/000_mask.png"});
  std::vector<const PatchCore*> members{ensemble.members()[0].get(), ensemble.members()[1].get()};
  const auto test_set = MVTecDataset::test(data);
  const EvaluationResult r = evaluate(members, test_set);
  std::vector<torch::Tensor> normalised;
  for (size_t m = 0; m < 2; ++m) {
    torch::Tensor s = torch::tensor(
        members[m]
            ->predict(images_of({test_set[0].image_path, test_set[1].image_path}, ensemble.params().transform))
            .scores);
    normalised.push_back((s - s.min()) / (s.max() - s.min()));
  }
  const torch::Tensor published = (normalised[0] + normalised[1]) / 2;
  for (size_t i = 0; i < 2; ++i) EXPECT_NEAR(r.images[i].score, published[i].item<float>(), 1e-6);
}

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "common_fixtures.h"
#include "patchcore/embedding/patch_embedder.h"

using namespace patchcore;
using test::error_of;
using test::load_golden;
using test::max_abs_diff;

namespace {

struct EmbeddingCase {
  std::vector<int64_t> channels;
  std::vector<std::pair<int64_t, int64_t>> sizes;  // feature map height, width per layer
  int64_t patchsize, stride, pretrain, target, batch;
};

// PatchEmbedder against the step-by-step reference on the same feature maps, relative to the largest value.
double relative_difference(const EmbeddingCase& c, const std::vector<torch::Tensor>& features) {
  const PatchEmbedder fast(c.channels, c.patchsize, c.stride, c.pretrain, c.target);
  std::vector<int64_t> fast_grid, reference_grid;
  const torch::Tensor actual = fast.forward(features, &fast_grid);
  const torch::Tensor expected =
      reference_embedding(features, PatchMaker(c.patchsize, c.stride), Preprocessing(c.channels, c.pretrain),
                          Aggregator(c.target), &reference_grid);
  EXPECT_EQ(fast_grid, reference_grid);
  EXPECT_EQ(actual.sizes(), expected.sizes());
  return max_abs_diff(actual, expected) / expected.abs().max().item<double>();
}

std::vector<torch::Tensor> random_features(const EmbeddingCase& c) {
  torch::manual_seed(7);
  std::vector<torch::Tensor> features;
  for (size_t l = 0; l < c.channels.size(); ++l)
    features.push_back(torch::randn({c.batch, c.channels[l], c.sizes[l].first, c.sizes[l].second}));
  return features;
}

}  // namespace

class FastEmbedding : public ::testing::TestWithParam<EmbeddingCase> {};

TEST_P(FastEmbedding, EqualsTheReferencePathOnRandomFeatures) {
  const EmbeddingCase& c = GetParam();
  EXPECT_LT(relative_difference(c, random_features(c)), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, FastEmbedding,
    ::testing::Values(
        // ResNet-18 defaults: 1152 and 2304 values into 1024 bins (fractional, overlapping), 14 → 28.
        EmbeddingCase{{128, 256}, {{28, 28}, {14, 14}}, 3, 1, 1024, 1024, 2},
        // WRN50 defaults: exact 4.5- and 9-value bins.
        EmbeddingCase{{512, 1024}, {{28, 28}, {14, 14}}, 3, 1, 1024, 1024, 1},
        // One layer, patchsize 1, pooled down twice to odd sizes.
        EmbeddingCase{{256}, {{9, 11}}, 1, 1, 100, 37, 2},
        // Three layers whose aggregator bins straddle layer boundaries, 5 x 5 patches, non-square grids
        // upsampled by non-integer factors.
        EmbeddingCase{{64, 128, 256}, {{12, 9}, {7, 5}, {4, 3}}, 5, 1, 300, 200, 2},
        // Patch stride 2, and an even patch size (padding 0, one patch fewer per axis).
        EmbeddingCase{{32, 64}, {{13, 13}, {7, 7}}, 3, 2, 96, 64, 1},
        EmbeddingCase{{48, 96}, {{10, 10}, {5, 5}}, 2, 1, 64, 64, 1},
        // More bins than values: adaptive pooling repeats values.
        EmbeddingCase{{3, 5}, {{6, 6}, {3, 3}}, 1, 1, 8, 20, 2},
        // Two layers on the same grid: no interpolation at all.
        EmbeddingCase{{1024, 128}, {{8, 8}, {8, 8}}, 3, 1, 1024, 512, 1}));

TEST(FastEmbedding, EqualsTheReferencePathOnRealTireFeatures) {
  // ResNet-18 layer2/layer3 of tire/test/good/000.png, as torchvision computes them.
  const std::vector<torch::Tensor> features{load_golden("common/tire_resnet18_layer2.npy"),
                                            load_golden("common/tire_resnet18_layer3.npy")};
  EXPECT_LT(relative_difference({{128, 256}, {{28, 28}, {14, 14}}, 3, 1, 1024, 1024, 1}, features), 1e-5);
}

TEST(FastEmbedding, AcceptsNonContiguousAndDoubleInput) {
  const EmbeddingCase c{{16, 32}, {{6, 6}, {3, 3}}, 3, 1, 40, 24, 2};
  auto features = random_features(c);
  const PatchEmbedder fast(c.channels, c.patchsize, c.stride, c.pretrain, c.target);
  const torch::Tensor expected = fast.forward(features);
  std::vector<torch::Tensor> strided{features[0].to(torch::kFloat64).contiguous(torch::MemoryFormat::ChannelsLast),
                                     features[1].transpose(2, 3).contiguous().transpose(2, 3)};
  EXPECT_LT(max_abs_diff(fast.forward(strided), expected), 1e-6);
}

TEST(FastEmbedding, RejectsMismatchedFeatures) {
  const PatchEmbedder fast({8, 16}, 3, 1, 32, 16);
  EXPECT_NE(error_of([&] {
              fast.forward({torch::zeros({1, 8, 4, 4})});
            }).find("got 1 layers, built for 2"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              fast.forward({torch::zeros({1, 8, 4, 4}), torch::zeros({1, 15, 2, 2})});
            }).find("layer 1"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              fast.forward({torch::zeros({1, 8, 4, 4}), torch::zeros({2, 16, 2, 2})});
            }).find("batch size"),
            std::string::npos);
  // Patchsize 4 pads by 1, so a 1 x 1 map has no complete patch.
  EXPECT_NE(error_of([&] {
              PatchEmbedder({8}, 4, 1, 8, 8).forward({torch::zeros({1, 8, 1, 1})});
            }).find("smaller than a patch"),
            std::string::npos);
  EXPECT_THROW(PatchEmbedder({}, 3, 1, 8, 8), std::invalid_argument);
  EXPECT_THROW(PatchEmbedder({8}, 0, 1, 8, 8), std::invalid_argument);
  EXPECT_THROW(PatchEmbedder({8}, 3, 1, 8, 0), std::invalid_argument);
}

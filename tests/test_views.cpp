// The views beyond the published centre crop (ImageTransform::view): the whole frame resized, and the whole frame in
// tiles whose maps are stitched, on real tire images with the shared ResNet-18.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "patchcore/core/parallel.h"
#include "patchcore/io/image.h"
#include "patchcore/patchcore.h"
#include "patchcore/segmentation/tiling.h"
#include "support.h"

using namespace patchcore;
namespace fs = std::filesystem;

namespace {

std::unique_ptr<PatchCore> model_with(const std::string& weights, View view, int resize, int crop) {
  PatchCoreParams params;
  params.transform.view = view;
  params.transform.resize = resize;
  params.transform.crop = crop;
  params.pretrain_embed_dimension = params.target_embed_dimension = 128;
  auto model = std::make_unique<PatchCore>();
  model->load(load_backbone("resnet18", weights, params.layers_to_extract_from), params);
  return model;
}

std::vector<std::string> tire_files(const std::string& tire, const std::string& split, int count) {
  std::vector<std::string> files;
  for (int i = 0; i < count; ++i) {
    char name[16];
    std::snprintf(name, sizeof name, "%03d.png", i);
    files.push_back(tire + "/" + split + "/" + name);
  }
  return files;
}

double max_difference(const at::Tensor& a, const at::Tensor& b) { return (a - b).abs().max().item<double>(); }

}  // namespace

TEST(Views, FullViewFitsAndPredictsFramesOfAnySizeAtTheirAspect) {
  PATCHCORE_REQUIRE_SHARED(weights, "weights/resnet18-imagenet-stem-to-layer3.pth");
  PATCHCORE_REQUIRE_SHARED(tire, "data/tire");
  set_num_threads(2);
  // Two training frames of different sizes: one as stored (300 x 400), one cut to 300 x 320.
  const std::vector<std::string> train = tire_files(tire, "train/good", 2);
  const std::string cut = test::temp_dir() + "/cut.png";
  ASSERT_TRUE(cv::imwrite(cut, cv::imread(train[1])(cv::Rect(0, 0, 300, 320))));
  auto model = model_with(weights, View::kFull, 160, 160);
  const ImageTransform& transform = model->params().transform;
  EXPECT_EQ(transform.view_size({300, 400}), cv::Size(160, 213));
  model->fit({train[0], cut});
  // Every patch of both frames is in the bank (identity sampler): the frames were embedded at their own sizes.
  const int64_t rows = model->embed(std::vector<at::Tensor>{transform.load(train[0])}).size(0) +
                       model->embed(std::vector<at::Tensor>{transform.load(cut)}).size(0);
  EXPECT_EQ(model->memory_bank_size(), rows);
  EXPECT_EQ(rows, 20 * 27 + 20 * 22);

  // Frames of different sizes in one call: each run of one size is a batch, and each gets its own map.
  const std::vector<at::Tensor> images{transform.load(tire + "/test/good/000.png"), transform.load(cut),
                                       transform.load(tire + "/test/cut/000.png")};
  const PredictResult together = model->predict(images);
  ASSERT_EQ(together.scores.size(), 3u);
  for (size_t i = 0; i < images.size(); ++i) {
    const PredictResult alone = model->predict(std::vector<at::Tensor>{images[i]});
    EXPECT_EQ(together.masks[i].sizes(), images[i].sizes().slice(1)) << i;
    EXPECT_NEAR(together.scores[i], alone.scores[0], 1e-5 * alone.scores[0]) << i;
    EXPECT_LT(max_difference(together.masks[i], alone.masks[0]), 1e-4 * alone.scores[0]) << i;
  }
  EXPECT_NEAR(together.scores[1], 0, 1e-3);  // a training frame's patches are all in the bank
  EXPECT_GT(together.scores[2], together.scores[0]);
}

TEST(Views, ATiledMapEqualsTheDirectFullFrameMap) {
  PATCHCORE_REQUIRE_SHARED(weights, "weights/resnet18-imagenet-stem-to-layer3.pth");
  PATCHCORE_REQUIRE_SHARED(tire, "data/tire");
  set_num_threads(2);
  const std::vector<std::string> train = tire_files(tire, "train/good", 3);
  // The full view at the frames' own size (shorter side 300), and the tiles view.
  auto full = model_with(weights, View::kFull, 300, 224);
  full->fit(train);
  const ImageTransform& view = full->params().transform;
  EXPECT_EQ(view.view_size({300, 400}), cv::Size(300, 400));
  const at::Tensor frame = view.load(tire + "/test/cut/000.png");

  // A frame of one tile, scored against the same bank: the tiled map is the full-frame map, exactly.
  auto tiled_on_full_bank = model_with(weights, View::kTiles, 300, 224);
  tiled_on_full_bank->fit_features(full->memory_bank());
  ASSERT_TRUE(torch::equal(tiled_on_full_bank->memory_bank(), full->memory_bank()));
  EXPECT_EQ(tiled_on_full_bank->params().transform.view_size({300, 400}), cv::Size(300, 400));
  const at::Tensor one_tile = frame.slice(1, 90, 314).slice(2, 40, 264).unsqueeze(0);
  const PredictResult direct = full->predict(one_tile), single = tiled_on_full_bank->predict(one_tile);
  EXPECT_EQ(single.scores, direct.scores);
  EXPECT_TRUE(torch::equal(single.masks[0], direct.masks[0]));

  // A frame of four tiles, each view with the bank of its own patches, as fit makes them. The frame's score is the
  // highest of its tiles' own scores, and its stitched map follows the full frame's but for the context each tile
  // lacks beyond its borders.
  auto tiled = model_with(weights, View::kTiles, 300, 224);
  tiled->fit(train);
  const TileGrid grid = tile_grid(300, 400, 224, view.tile_overlap);
  ASSERT_EQ(grid.count(), 4);
  const PredictResult tiles = tiled->predict(cut_tiles(frame, grid));
  const PredictResult stitched = tiled->predict(frame.unsqueeze(0)), whole = full->predict(frame.unsqueeze(0));
  EXPECT_EQ(stitched.scores[0], *std::max_element(tiles.scores.begin(), tiles.scores.end()));
  ASSERT_EQ(stitched.masks[0].sizes(), whole.masks[0].sizes());
  const at::Tensor a = stitched.masks[0].flatten(), b = whole.masks[0].flatten();
  const double range = (b.max() - b.min()).item<double>();
  EXPECT_GT(at::corrcoef(at::stack({a, b}))[0][1].item<double>(), 0.95);
  EXPECT_LT((a - b).abs().mean().item<double>(), 0.05 * range);
  // The defect's peak is found in the same place.
  const int64_t p = a.argmax().item<int64_t>(), q = b.argmax().item<int64_t>();
  EXPECT_LE(std::hypot(double(p % 300 - q % 300), double(p / 300 - q / 300)), 16) << p << " " << q;
}

TEST(Views, AModelDirectoryRecordsItsView) {
  PATCHCORE_REQUIRE_SHARED(weights, "weights/resnet18-imagenet-stem-to-layer3.pth");
  PATCHCORE_REQUIRE_SHARED(tire, "data/tire");
  set_num_threads(2);
  auto model = model_with(weights, View::kTiles, 300, 224);
  PatchCoreParams params = model->params();
  params.transform.tile_overlap = 48;
  model->load(load_backbone("resnet18", weights, params.layers_to_extract_from), params);
  model->fit(tire_files(tire, "train/good", 1));
  const std::string dir = test::temp_dir() + "/model";
  model->save_to_path(dir);
  const auto loaded = PatchCore::load_from_path(dir);
  EXPECT_EQ(loaded->params().transform.view, View::kTiles);
  EXPECT_EQ(loaded->params().transform.tile_overlap, 48);
  const at::Tensor frame = loaded->params().transform.load(tire + "/test/good/000.png");
  EXPECT_EQ(frame.sizes(), (std::vector<int64_t>{3, 400, 300}));
  const PredictResult before = model->predict(frame.unsqueeze(0)), after = loaded->predict(frame.unsqueeze(0));
  EXPECT_EQ(before.scores, after.scores);
  EXPECT_TRUE(torch::equal(before.masks[0], after.masks[0]));
}

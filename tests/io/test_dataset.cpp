#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "patchcore/io/dataset.h"
#include "support.h"

using namespace patchcore;
namespace fs = std::filesystem;

namespace {

void touch(const fs::path& path) {
  fs::create_directories(path.parent_path());
  std::ofstream(path) << "x";
}

// A small MVTec tree with distractors: hidden files, non-image files, sub-folders, upper-case extensions.
fs::path make_tree() {
  const fs::path root = test::temp_dir();
  for (const char* name :
       {"b.png", "a.png", "C.JPG", "d.jpeg", "e.BMP", "f.tif", "g.TIFF", ".hidden.png", "notes.txt", "h.png.bak"}) {
    touch(root / "train" / "good" / name);
  }
  fs::create_directories(root / "train" / "good" / "subfolder.png");
  for (const char* name : {"001.png", "000.png"}) touch(root / "test" / "good" / name);
  for (const char* name : {"10.png", "9.png", ".DS_Store"}) touch(root / "test" / "crack" / name);
  touch(root / "test" / "broken_large" / "000.jpg");
  touch(root / "test" / ".hidden_defect" / "000.png");
  for (const char* name : {"10_mask.png", "9_mask.png"}) touch(root / "ground_truth" / "crack" / name);
  touch(root / "ground_truth" / "broken_large" / "000_mask.png");
  return root;
}

template <typename F>
void expect_dataset_error(F f, const std::string& path, const std::string& problem) {
  try {
    f();
    ADD_FAILURE() << "expected a DatasetError about " << path;
  } catch (const DatasetError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find(path), std::string::npos) << what;
    EXPECT_NE(what.find(problem), std::string::npos) << "'" << problem << "' not in: " << what;
  }
}

std::vector<std::string> file_names(const std::vector<Sample>& samples) {
  std::vector<std::string> names;
  for (const Sample& s : samples) names.push_back(fs::path(s.image_path).filename().string());
  return names;
}

}  // namespace

TEST(Dataset, ImageExtensionsAreCaseInsensitive) {
  for (const char* yes : {"a.png", "a.PNG", "b.jpg", "b.JpEg", "c.bmp", "d.tif", "d.TIFF"})
    EXPECT_TRUE(is_image_file_name(yes)) << yes;
  for (const char* no : {"a.txt", "png", "a.png.bak", "a.gif", "a.webp", "a"})
    EXPECT_FALSE(is_image_file_name(no)) << no;
}

TEST(Dataset, TrainListsOnlyImagesInByteOrder) {
  const fs::path root = make_tree();
  const std::vector<Sample> train = MVTecDataset::train(root.string());
  // Upper case sorts before lower case, as in Python's sorted().
  EXPECT_EQ(file_names(train),
            (std::vector<std::string>{"C.JPG", "a.png", "b.png", "d.jpeg", "e.BMP", "f.tif", "g.TIFF"}));
  for (const Sample& s : train) {
    EXPECT_EQ(s.defect_type, "good");
    EXPECT_FALSE(s.is_anomalous);
    EXPECT_TRUE(s.mask_path.empty());
    EXPECT_TRUE(fs::exists(s.image_path)) << s.image_path;
  }
}

TEST(Dataset, TestOrdersDefectsAndFilesAndPairsMasksByName) {
  const fs::path root = make_tree();
  const std::vector<Sample> test = MVTecDataset::test(root.string());
  ASSERT_EQ(test.size(), 5u);
  // Folders sorted, then files sorted by bytes ("10.png" < "9.png").
  const std::vector<std::string> expected_types{"broken_large", "crack", "crack", "good", "good"};
  const std::vector<std::string> expected_files{"000.jpg", "10.png", "9.png", "000.png", "001.png"};
  EXPECT_EQ(file_names(test), expected_files);
  for (size_t i = 0; i < test.size(); ++i) {
    SCOPED_TRACE(test[i].image_path);
    EXPECT_EQ(test[i].defect_type, expected_types[i]);
    EXPECT_EQ(test[i].is_anomalous, expected_types[i] != "good");
    if (test[i].is_anomalous) {
      const fs::path stem = fs::path(expected_files[i]).stem();
      EXPECT_EQ(fs::path(test[i].mask_path), root / "ground_truth" / expected_types[i] / (stem.string() + "_mask.png"));
    } else {
      EXPECT_TRUE(test[i].mask_path.empty());
    }
  }
}

TEST(Dataset, MissingMaskIsAnErrorNamingTheImage) {
  const fs::path root = make_tree();
  touch(root / "test" / "crack" / "11.png");
  expect_dataset_error([&] { MVTecDataset::test(root.string()); }, (root / "test" / "crack" / "11.png").string(),
                       "11_mask.png");
}

TEST(Dataset, DefectTypeWithoutGroundTruthFolderIsLabelledByImageOnly) {
  const fs::path root = make_tree();
  touch(root / "test" / "scratch" / "a.png");
  touch(root / "test" / "scratch" / "b.png");
  const std::vector<Sample> test = MVTecDataset::test(root.string());
  int scratches = 0;
  for (const auto& s : test) {
    if (s.defect_type == "scratch") {
      ++scratches;
      EXPECT_TRUE(s.is_anomalous);
      EXPECT_TRUE(s.mask_path.empty()) << s.image_path;
    } else if (s.is_anomalous) {
      EXPECT_FALSE(s.mask_path.empty()) << s.image_path;  // the other types keep their masks
    }
  }
  EXPECT_EQ(scratches, 2);
}

TEST(Dataset, MissingOrEmptyFoldersAreErrorsNamingThePath) {
  const fs::path root = test::temp_dir();
  expect_dataset_error([&] { MVTecDataset::train((root / "absent").string()); }, (root / "absent").string(),
                       "does not exist");
  expect_dataset_error([&] { MVTecDataset::train(root.string()); }, (root / "train" / "good").string(),
                       "does not exist");
  expect_dataset_error([&] { MVTecDataset::test(root.string()); }, (root / "test").string(), "does not exist");
  touch(root / "train" / "good" / ".hidden.png");
  touch(root / "train" / "good" / "readme.txt");
  expect_dataset_error([&] { MVTecDataset::train(root.string()); }, (root / "train" / "good").string(), "no image");
  fs::create_directories(root / "test" / "good");
  expect_dataset_error([&] { MVTecDataset::test(root.string()); }, (root / "test").string(), "no image");
  touch(root / "file_root");
  expect_dataset_error([&] { MVTecDataset::train((root / "file_root").string()); }, (root / "file_root").string(),
                       "not a directory");
}

// The real data sets, against the reference's own listing (sorted os.listdir, masks paired by sorted
// position) computed by make_images.py: same order, labels and masks, so name and index pairing agree.
TEST(DatasetSharedData, MatchesTheReferenceListing) {
  PATCHCORE_REQUIRE_SHARED(data, "data");
  std::ifstream in(test::fixture("images/shared_dataset_order.json"));
  const nlohmann::json order = nlohmann::json::parse(in);
  int datasets = 0;
  for (const auto& [name, expected] : order.items()) {
    const std::string root = test::shared("data/" + name);
    if (root.empty()) continue;
    ++datasets;
    SCOPED_TRACE(name);
    const std::vector<Sample> train = MVTecDataset::train(root);
    const std::vector<Sample> test = MVTecDataset::test(root);
    ASSERT_EQ(train.size(), expected["train"].size());
    ASSERT_EQ(test.size(), expected["test"].size());
    for (size_t i = 0; i < train.size(); ++i) {
      EXPECT_EQ(train[i].image_path, (fs::path(root) / expected["train"][i][0].get<std::string>()).string());
    }
    int anomalous = 0;
    for (size_t i = 0; i < test.size(); ++i) {
      const nlohmann::json& row = expected["test"][i];
      EXPECT_EQ(test[i].image_path, (fs::path(root) / row[0].get<std::string>()).string());
      const std::string mask = row[1];
      EXPECT_EQ(test[i].mask_path, mask.empty() ? std::string() : (fs::path(root) / mask).string());
      EXPECT_EQ(test[i].defect_type, row[2].get<std::string>());
      EXPECT_EQ(test[i].is_anomalous, row[3].get<int>() == 1);
      anomalous += test[i].is_anomalous;
    }
    RecordProperty(name + "_counts", std::to_string(train.size()) + " train, " + std::to_string(test.size()) +
                                         " test, " + std::to_string(anomalous) + " anomalous");
  }
  EXPECT_GT(datasets, 0);
}

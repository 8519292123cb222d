#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "patchcore/io/npy.h"
#include "support.h"

using namespace patchcore;

TEST(Npy, ReadsArrayWrittenByNumpy) {
  NpyArray a = read_npy(test::fixture("npy/arange_2x3_f4.npy"));
  ASSERT_EQ(a.dtype, "f4");
  ASSERT_EQ(a.shape, (std::vector<int64_t>{2, 3}));
  auto v = a.as_float();
  for (int i = 0; i < 6; ++i) EXPECT_FLOAT_EQ(v[i], 0.5f * i);
}

TEST(Npy, RoundTripKeepsShapeAndValues) {
  const std::string path = test::temp_dir() + "/x.npy";
  std::vector<float> values{1.f, -2.f, 3.25f, 4.f};
  write_npy(path, values.data(), {4, 1});
  NpyArray a = read_npy(path);
  EXPECT_EQ(a.shape, (std::vector<int64_t>{4, 1}));
  EXPECT_EQ(a.as_float(), values);
}

TEST(Npy, TruncatedFileIsAnErrorNamingTheFile) {
  const std::string dir = test::temp_dir();
  std::vector<float> values(16, 1.f);
  write_npy(dir + "/full.npy", values.data(), {16});
  std::ifstream in(dir + "/full.npy", std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), {});
  std::ofstream(dir + "/cut.npy", std::ios::binary) << bytes.substr(0, bytes.size() - 5);
  try {
    read_npy(dir + "/cut.npy");
    FAIL() << "expected an error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("cut.npy"), std::string::npos) << e.what();
  }
}

TEST(Npz, ReadsAnArchiveWrittenByNumpy) {
  const auto arrays = read_npz(test::fixture("npy/arrays.npz"));
  ASSERT_EQ(arrays.size(), 3u);
  EXPECT_EQ(arrays.at("weights").shape, (std::vector<int64_t>{3, 2}));
  EXPECT_EQ(arrays.at("weights").as_float(), (std::vector<float>{0.f, 0.25f, 0.5f, 0.75f, 1.f, 1.25f}));
  EXPECT_EQ(arrays.at("indices").as_int64(), (std::vector<int64_t>{7, 3, 5}));
  EXPECT_EQ(arrays.at("flags").dtype, "b1");
}

TEST(Npz, DamagedArchivesAreErrorsNamingTheFile) {
  const std::string dir = test::temp_dir();
  std::ifstream in(test::fixture("npy/arrays.npz"), std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(in)), {});
  const auto expect_error = [&](const std::string& name, const std::string& contents, const std::string& needle) {
    std::ofstream(dir + "/" + name, std::ios::binary) << contents;
    const std::string message = test::error_of([&] { read_npz(dir + "/" + name); });
    EXPECT_EQ(message.rfind(dir + "/" + name + ": ", 0), 0u) << message;
    EXPECT_NE(message.find(needle), std::string::npos) << message;
  };
  expect_error("cut.npz", bytes.substr(0, bytes.size() - 30), "zip archive");
  std::string flipped = bytes;
  flipped[bytes.find("NUMPY") + 100] ^= 1;  // inside the first array's data
  expect_error("flipped.npz", flipped, "CRC-32 mismatch");
  expect_error("not_zip.npz", "just text", "zip");
}

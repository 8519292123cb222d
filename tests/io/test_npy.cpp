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

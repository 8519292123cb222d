#pragma once
// Loading the golden arrays written by scripts/fixtures/make_common.py as tensors.
#include <torch/torch.h>

#include <string>

#include "patchcore/io/npy.h"
#include "patchcore/patchcore.h"
#include "support.h"

namespace patchcore::test {

inline torch::Tensor load_golden(const std::string& relative) {
  NpyArray a = read_npy(fixture(relative));
  const auto dtype = a.dtype == "f4" ? torch::kFloat32 : a.dtype == "f8" ? torch::kFloat64 : torch::kInt64;
  if (a.dtype != "f4" && a.dtype != "f8" && a.dtype != "i8") throw std::runtime_error(relative + ": unexpected dtype");
  return torch::from_blob(a.data.data(), a.shape, dtype).clone();
}

inline double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  EXPECT_EQ(a.sizes(), b.sizes());
  return (a.to(torch::kFloat64) - b.to(torch::kFloat64)).abs().max().item<double>();
}

// PatchCore settings for the scripted create_feature_extractors of the fixtures (common/tiny_feature_extractor.pt,
// parity/tiny_bn_extractor.pt): their "low" and "high" outputs, 16 dimensions, 32 x 32 images.
inline PatchCoreParams tiny_extractor_params() {
  PatchCoreParams params;
  params.layers_to_extract_from = {"low", "high"};
  params.pretrain_embed_dimension = params.target_embed_dimension = 16;
  params.transform.resize = params.transform.crop = 32;
  return params;
}

}  // namespace patchcore::test

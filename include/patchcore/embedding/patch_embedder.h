#pragma once
// PatchCore._embed after the backbone: every layer's feature map unfolded into p x p patches, deeper layers
// aligned to the first layer's patch grid by bilinear interpolation, each patch vector pooled to
// pretrain_embed_dimension (Preprocessing), and the layers pooled together to target_embed_dimension
// (Aggregator).
//
// All of these steps are linear and the interpolation acts on each patch position's values alone, so it
// commutes with the pooling, which acts on each position's vector alone. Each output value is therefore
// a fixed weighted sum of a few zero-padded neighbours of one or two channels ("taps"), upsampled once
// per output dimension. PatchEmbedder computes exactly that, straight from the feature maps: no
// [patches, C, p, p] tensor and no interpolation of C·p² planes.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "patchcore/embedding/aggregator.h"
#include "patchcore/embedding/patch_maker.h"
#include "patchcore/embedding/preprocessing.h"

namespace patchcore {

class PatchEmbedder {
 public:
  // feature_dimensions: channels of each layer, in layers_to_extract_from order.
  PatchEmbedder(std::vector<int64_t> feature_dimensions, int64_t patchsize, int64_t patchstride,
                int64_t pretrain_embed_dimension, int64_t target_embed_dimension);

  // One [B, C_l, H_l, W_l] map per layer → [B·h·w, target_embed_dimension], rows row-major over the first
  // layer's patch grid {h, w}, which patch_shape receives. Equals reference_embedding up to float rounding.
  at::Tensor forward(const std::vector<at::Tensor>& features, std::vector<int64_t>* patch_shape = nullptr) const;

  int64_t target_embed_dimension() const { return static_cast<int64_t>(outputs_.size()); }

 private:
  // Weight of feature value (channel, y·stride - pad + ky, x·stride - pad + kx) in output (y, x).
  struct Tap {
    int64_t channel;
    int64_t ky, kx;
    float weight;
  };
  // The taps of one layer that feed one output dimension.
  struct Part {
    size_t layer;
    std::vector<Tap> taps;
  };

  std::vector<int64_t> feature_dimensions_;
  int64_t patchsize_, patchstride_;
  std::vector<std::vector<Part>> outputs_;  // per output dimension
};

// The same embedding step by step, as the reference computes it: unfolded patch tensors, interpolation of
// every (channel, kernel position) plane, Preprocessing, Aggregator. The yardstick for PatchEmbedder.
at::Tensor reference_embedding(const std::vector<at::Tensor>& features, const PatchMaker& patch_maker,
                               const Preprocessing& preprocessing, const Aggregator& aggregator,
                               std::vector<int64_t>* patch_shape = nullptr);

}  // namespace patchcore

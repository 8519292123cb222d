#pragma once
// common.Aggregator: the per-layer embeddings of a patch merged into one vector of target_dim.
#include <ATen/core/Tensor.h>

#include "patchcore/embedding/preprocessing.h"

namespace patchcore {

class Aggregator {
 public:
  explicit Aggregator(int64_t target_dim);
  // [N, layers, D] → [N, target_dim]: rows flattened (first layer first), then adaptive average pooling.
  at::Tensor forward(const at::Tensor& features) const;
  int64_t target_dim() const { return pool_.preprocessing_dim(); }

 private:
  MeanMapper pool_;  // the same flatten-and-pool, over the concatenated layers
};

}  // namespace patchcore

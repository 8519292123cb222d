#include "patchcore/embedding/aggregator.h"

#include <ATen/ATen.h>

#include <stdexcept>

namespace patchcore {

Aggregator::Aggregator(int64_t target_dim) : pool_(target_dim) {}

at::Tensor Aggregator::forward(const at::Tensor& features) const {
  if (features.dim() < 2) throw std::invalid_argument("Aggregator: features must be a non-empty [N, layers, D] tensor");
  return pool_.forward(features);
}

}  // namespace patchcore

#include "patchcore/aggregator.h"

#include <stdexcept>

namespace patchcore {

Aggregator::Aggregator(int64_t target_dim) : target_dim_(target_dim) {
  if (target_dim <= 0) throw std::invalid_argument("Aggregator: target_dim must be positive");
}

torch::Tensor Aggregator::forward(const torch::Tensor& features) const {
  if (features.dim() < 2 || features.size(0) == 0 || features.numel() == 0)
    throw std::invalid_argument("Aggregator: features must be a non-empty [N, layers, D] tensor");
  return torch::adaptive_avg_pool1d(features.reshape({features.size(0), 1, -1}), {target_dim_})
      .reshape({features.size(0), -1});
}

}  // namespace patchcore

#pragma once
// common.MeanMapper and common.Preprocessing: every layer's patch vectors pooled to one common length.
//
// Pooling follows PyTorch's adaptive_avg_pool1d bin rule (bin i covers [floor(i·L/n), ceil((i+1)·L/n)) ),
// so bins are fractional and overlap when the input length is not a multiple of the output length
// (ResNet-18's 128·9 = 1152 and 256·9 = 2304 values into 1024 bins).
#include <ATen/core/Tensor.h>

#include <vector>

namespace patchcore {

class MeanMapper {
 public:
  explicit MeanMapper(int64_t preprocessing_dim);
  // features [N, ...] → [N, preprocessing_dim]: each row flattened and adaptively average-pooled.
  at::Tensor forward(const at::Tensor& features) const;
  int64_t preprocessing_dim() const { return preprocessing_dim_; }

 private:
  int64_t preprocessing_dim_;
};

class Preprocessing {
 public:
  Preprocessing(std::vector<int64_t> input_dims, int64_t output_dim);
  // One [N, C_l, ...] tensor per layer → [N, layers, output_dim].
  at::Tensor forward(const std::vector<at::Tensor>& features) const;
  const std::vector<int64_t>& input_dims() const { return input_dims_; }
  int64_t output_dim() const { return output_dim_; }

 private:
  std::vector<int64_t> input_dims_;
  int64_t output_dim_;
  std::vector<MeanMapper> preprocessing_modules_;
};

}  // namespace patchcore

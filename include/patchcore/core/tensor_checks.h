#pragma once
// Argument checks for the tensors that cross the library's API, with messages that name the caller and the shape.
#include <ATen/core/Tensor.h>

#include <string>

namespace patchcore {

// "[2, 3, 4]", or "undefined" for an undefined tensor.
std::string shape_string(const at::Tensor& t);

// `t` as a contiguous float32 CPU matrix [N, D] (converted when it is another floating type or on another
// device); std::invalid_argument "<who>: ..." unless it is defined, 2-D and has N, D >= 1.
at::Tensor float_rows(const at::Tensor& t, const std::string& who);

}  // namespace patchcore

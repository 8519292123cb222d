#include "patchcore/core/tensor_checks.h"

#include <ATen/ATen.h>

#include <sstream>
#include <stdexcept>

namespace patchcore {

std::string shape_string(const at::Tensor& t) {
  if (!t.defined()) return "undefined";
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

at::Tensor float_rows(const at::Tensor& t, const std::string& who) {
  if (!t.defined()) throw std::invalid_argument(who + ": the tensor is undefined");
  if (t.dim() != 2) throw std::invalid_argument(who + ": expected a 2-D [N, D] tensor, got shape " + shape_string(t));
  if (t.size(0) < 1 || t.size(1) < 1)
    throw std::invalid_argument(who + ": expected at least one row and one column, got shape " + shape_string(t));
  if (!t.is_floating_point())
    throw std::invalid_argument(who + ": expected floating-point values, got " +
                                std::string(c10::toString(t.scalar_type())));
  return t.to(at::kCPU, at::kFloat).contiguous();
}

}  // namespace patchcore

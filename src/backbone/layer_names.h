#pragma once
// Layer-name helpers shared by the backbones. Private to backbone.
#include <ATen/core/Tensor.h>
#include <torch/ordered_dict.h>

#include <map>
#include <string>
#include <vector>

namespace patchcore {

// "a, b, c", for messages that list the valid names.
inline std::string join_names(const std::vector<std::string>& names) {
  std::string s;
  for (const auto& n : names) s += (s.empty() ? "" : ", ") + n;
  return s;
}

// The requested layers' outputs, in the order requested, from the outputs found by name.
inline torch::OrderedDict<std::string, at::Tensor> in_request_order(const std::map<std::string, at::Tensor>& found,
                                                                    const std::vector<std::string>& layers) {
  torch::OrderedDict<std::string, at::Tensor> out;
  for (const auto& l : layers)
    if (!out.contains(l)) out.insert(l, found.at(l));
  return out;
}

}  // namespace patchcore

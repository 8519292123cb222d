#include "patchcore/backbone/backbone.h"

#include <algorithm>
#include <stdexcept>

#include "layer_names.h"
#include "patchcore/backbone/resnet.h"
#include "patchcore/backbone/torchscript_backbone.h"

namespace patchcore {

void Backbone::check_layers(const std::vector<std::string>& layers) const {
  if (layers.empty()) throw std::invalid_argument(name() + ": no layers to extract from");
  const auto known = layer_names();
  for (const auto& layer : layers) {
    if (std::find(known.begin(), known.end(), layer) == known.end())
      throw std::invalid_argument(name() + ": unknown layer '" + layer + "'; known layers: " + join_names(known));
  }
}

std::shared_ptr<Backbone> load_backbone(const std::string& name, const std::string& weights_path,
                                        const std::vector<std::string>& layers) {
  if (name == "torchscript") return std::make_shared<TorchScriptBackbone>(weights_path);
  auto backbone = std::make_shared<ResNetBackbone>(name, layers);
  backbone->check_layers(layers);
  backbone->load_checkpoint(weights_path);
  return backbone;
}

}  // namespace patchcore

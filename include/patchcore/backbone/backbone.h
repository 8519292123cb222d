#pragma once
// Backbones that NetworkFeatureAggregator reads intermediate features from: a torchvision ResNet built natively
// (resnet.h) or any network as TorchScript (torchscript_backbone.h).
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <torch/ordered_dict.h>

#include <memory>
#include <string>
#include <vector>

namespace patchcore {

// The BatchNorm statistics a backbone's layers normalise with.
enum class BatchNormStatistics {
  // Moved once by the published PatchCore.load (reference spec 1.1a): what the published numbers rest on.
  kReferenceUpdate,
  kCheckpoint,  // the checkpoint's running statistics as stored: plain eval-mode features
};
// "reference_update" / "checkpoint", as the CLI and the model directory name them; parse throws
// std::invalid_argument for any other name.
const char* to_string(BatchNormStatistics statistics);
BatchNormStatistics parse_batchnorm_statistics(const std::string& name);

class Backbone {
 public:
  virtual ~Backbone() = default;
  // The architecture as load_backbone() takes it: "resnet18", ..., or "torchscript".
  virtual std::string architecture() const = 0;
  // For messages: the architecture, and for TorchScript the file.
  virtual std::string name() const = 0;
  // Layer names this backbone can return, in execution order.
  virtual std::vector<std::string> layer_names() const = 0;
  // Runs the network on `images` [B, 3, H, W] only as far as the deepest of `layers` and returns the
  // output of each requested layer, in the order requested. Throws on unknown layer names. Thread-safe: a
  // loaded backbone serves concurrent calls.
  virtual torch::OrderedDict<std::string, at::Tensor> extract(const at::Tensor& images,
                                                              const std::vector<std::string>& layers) const = 0;
  virtual void to(const c10::Device& device) = 0;
  // Throws std::invalid_argument naming the layer and listing the valid names.
  virtual void check_layers(const std::vector<std::string>& layers) const;
  // The checkpoint or TorchScript file the weights came from; empty when set in memory.
  const std::string& weights_path() const { return weights_path_; }
  // Writes the weights, as load_backbone reads them, to a new file `path` (a model directory's copy). Throws
  // std::logic_error where they exist only in memory and cannot be written.
  virtual void write_weights(const std::string& path) const;

  // The published PatchCore.load's BatchNorm update: one forward of `images` (there, one all-ones image of the
  // input shape) in training mode, as far as the deepest of `layers`, moves the running statistics of every
  // BatchNorm that runs (momentum 0.1, unbiased variance), and the network returns to eval mode. Applied once
  // per backbone. Returns false and changes nothing when the network has no BatchNorm or fails in training mode,
  // with the reason in *why_not.
  bool apply_reference_batchnorm_update(const at::Tensor& images, const std::vector<std::string>& layers,
                                        std::string* why_not);
  BatchNormStatistics batchnorm_statistics() const { return batchnorm_statistics_; }

 protected:
  virtual void set_training(bool training) = 0;
  // The running statistics and any other buffers of the network, to restore after a failed update.
  virtual std::vector<at::Tensor> buffers() const = 0;
  virtual bool has_batchnorm() const = 0;

  std::string weights_path_;

 private:
  BatchNormStatistics batchnorm_statistics_ = BatchNormStatistics::kCheckpoint;
};

// The torchvision ResNet architectures load_backbone knows: resnet18/34/50/101/152, wide_resnet50_2,
// wide_resnet101_2, resnext50_32x4d, resnext101_32x8d.
std::vector<std::string> resnet_names();

// "resnet18" etc. with a torchvision checkpoint, or "torchscript" with a TorchScript file.
std::shared_ptr<Backbone> load_backbone(const std::string& architecture, const std::string& weights_path,
                                        const std::vector<std::string>& layers);

}  // namespace patchcore

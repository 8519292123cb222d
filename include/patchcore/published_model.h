#pragma once
// Models saved by the published PatchCore (patchcore-inspection's save_to_path): {prepend}patchcore_params.pkl
// and {prepend}nnscorer_search_index.faiss, without the backbone's weights, which the user supplies. An ensemble
// is one folder of members prefixed Ensemble-{i}-{n}_, counted by their .faiss files as the published
// load_and_evaluate_patchcore.py counts them. This is the migration path for the published code's users.
#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <vector>

#include "patchcore/patchcore.h"

namespace patchcore {

// Whether `dir` holds a model written by the published code (a patchcore_params.pkl, plain or prefixed).
bool is_published_model(const std::string& dir);

// The torchvision architecture (as load_backbone names it) of a published backbone name from
// patchcore/backbones.py ("wideresnet50" -> "wide_resnet50_2", ...); torchvision's own names pass unchanged.
// Throws std::invalid_argument for a published backbone that is not a torchvision ResNet, suggesting TorchScript.
std::string published_architecture(const std::string& name);

struct PublishedModelOptions {
  int resize = 256;          // the published CLI's default; the pickle does not record it
  std::string architecture;  // overrides the pickle's backbone.name, e.g. "torchscript" with a .pt file
  int num_workers = 4;       // search threads
};

// Every member of the published model in `dir`, in prefix order, loaded as the published load_from_path loads it
// (its BatchNorm update included) with the backbone's weights from `weights_path`. Flat indexes are searched by
// ExactPrunedNN (the published FaissNN's neighbours), IVF-PQ ones by ApproximateFaissNN. Throws
// std::runtime_error naming the file at fault.
std::vector<std::unique_ptr<PatchCore>> load_published_model(const std::string& dir, const std::string& weights_path,
                                                             const PublishedModelOptions& options = {});

// The members of one model directory, predicting together: one member predicts alone. Several combine as the mean
// of each member's scores and maps divided by that member's scale, the median squared distance from its memory
// bank's rows to their nearest other row. The published code min-max normalises each member over a whole test set
// instead (evaluate does that); a scale known from the model itself gives a single image the same score whatever
// else is predicted with it.
class PatchCoreEnsemble {
 public:
  explicit PatchCoreEnsemble(std::vector<std::unique_ptr<PatchCore>> members);
  PredictResult predict(const std::vector<at::Tensor>& images) const;
  const std::vector<std::unique_ptr<PatchCore>>& members() const { return members_; }
  // The first member's, whose image transform every member shares.
  const PatchCoreParams& params() const { return members_.front()->params(); }
  const std::vector<float>& scales() const { return scales_; }

 private:
  std::vector<std::unique_ptr<PatchCore>> members_;
  std::vector<float> scales_;
};

// The model in `dir`: one of this build's (PatchCore::load_from_path; weights_path must be empty, the directory
// holds its weights) or one the published code saved (load_published_model with weights_path, required).
PatchCoreEnsemble load_model_directory(const std::string& dir, const std::string& weights_path,
                                       const PublishedModelOptions& options = {});

}  // namespace patchcore

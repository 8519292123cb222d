#pragma once
// The models an inference service holds: every model directory under one folder, served under its folder name.
// A request takes a shared_ptr to the model it needs and keeps it until its answer, so a reload swaps the pointer
// atomically while requests in flight finish on the model they started with. A model directory that fails its
// checks is refused with its error, and the model loaded before keeps serving.
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "patchcore/evaluation/report.h"
#include "patchcore/published_model.h"

namespace patchcore::serve {

// One loaded model.
struct ServedModel {
  std::string name, dir;
  PatchCoreEnsemble model;
  std::optional<ColourScale> scale;  // its overlays' colour scale (model_colour_scale)
  std::string loaded_at;             // UTC, ISO 8601
  Calibration calibration() const;   // a single member's own; an ensemble's combined scores have none
};

// The request named a model that is not served.
class UnknownModel : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class ModelRegistry {
 public:
  // `threads`: each model's search threads (the process's thread setting).
  ModelRegistry(std::string root, int threads);

  struct LoadReport {
    std::vector<std::string> loaded;
    std::map<std::string, std::string> refused;  // name → why
  };
  // (Re)loads every model directory under the root: new folders are added, changed ones replaced, those that fail
  // keep their old model (if any), and models whose folder is gone stop being served. Hidden folders and the
  // temporary folders of an interrupted atomic write (name.tmp-...) are not models. Throws std::runtime_error when the
  // root cannot be listed.
  LoadReport load_all();
  // Reloads one model from its folder. Throws UnknownModel when no folder of that name is under the root, and
  // std::runtime_error naming the problem when the folder fails its checks; the old model then keeps serving.
  std::shared_ptr<const ServedModel> reload(const std::string& name);

  // The model served under `name`, or null.
  std::shared_ptr<const ServedModel> find(const std::string& name) const;
  std::vector<std::shared_ptr<const ServedModel>> models() const;
  // Folders whose last load failed, with the error.
  std::map<std::string, std::string> refused() const;
  const std::string& root() const { return root_; }

  // Whether a folder name under the root names a model (not hidden, not an atomic write's temporary folder).
  static bool is_model_folder_name(const std::string& name);

 private:
  std::shared_ptr<const ServedModel> load(const std::string& name) const;
  std::shared_ptr<const ServedModel> load_on_this_thread(const std::string& name) const;

  std::string root_;
  int threads_;
  std::mutex reload_mutex_;  // one reload at a time; lookups never wait for a load
  mutable std::mutex mutex_;
  std::map<std::string, std::shared_ptr<const ServedModel>> models_;
  std::map<std::string, std::string> refused_;
};

}  // namespace patchcore::serve

#include "patchcore/serve/model_registry.h"

#include <ATen/ATen.h>
#include <malloc.h>

#include <algorithm>
#include <filesystem>
#include <future>

namespace fs = std::filesystem;

namespace patchcore::serve {

Calibration ServedModel::calibration() const {
  return model.members().size() == 1 ? model.members().front()->calibration() : Calibration{};
}

ModelRegistry::ModelRegistry(std::string root, int threads) : root_(std::move(root)), threads_(threads) {}

bool ModelRegistry::is_model_folder_name(const std::string& name) {
  return !name.empty() && name.front() != '.' && name.find(".tmp-") == std::string::npos;
}

std::shared_ptr<const ServedModel> ModelRegistry::load(const std::string& name) const {
  // A thread that runs a forward pass keeps a team of OpenMP threads and oneDNN's scratchpad until it ends. Run on
  // the HTTP thread that asked, each reload landing on another HTTP thread would leave one more team behind, up to
  // one per HTTP thread; a thread of its own takes them with it, so the service's thread count stays what it was.
  return std::async(std::launch::async, [&] { return load_on_this_thread(name); }).get();
}

std::shared_ptr<const ServedModel> ModelRegistry::load_on_this_thread(const std::string& name) const {
  const std::string dir = (fs::path(root_) / name).string();
  PublishedModelOptions options;
  options.num_workers = threads_;
  // Freed, a model leaves its memory in glibc's heap, where the next model's and the images' buffers fragment it
  // and resident memory climbs with every reload. Trimming once the last request on the old model is done returns
  // it to the system; a fixed mmap threshold would do the same at the price of a page fault per large buffer of
  // every forward pass.
  std::shared_ptr<ServedModel> served(new ServedModel{name, dir, load_model_directory(dir, "", options), {}, utc_now()},
                                      [](const ServedModel* model) {
                                        delete model;
                                        malloc_trim(0);
                                      });
  if (served->model.members().size() == 1) served->scale = model_colour_scale(*served->model.members().front());
  // One forward pass before the model serves: the first request then costs what every later one does, and the
  // memory that torch's allocator keeps is in place before the service reports ready.
  const int64_t side = served->model.params().transform.crop;
  served->model.predict({at::zeros({3, side, side})});
  return served;
}

ModelRegistry::LoadReport ModelRegistry::load_all() {
  std::lock_guard<std::mutex> reload_lock(reload_mutex_);
  std::error_code ec;
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(root_, ec))
    if (entry.is_directory() && is_model_folder_name(entry.path().filename().string()))
      names.push_back(entry.path().filename().string());
  if (ec) throw std::runtime_error(root_ + ": cannot list the models folder: " + ec.message());
  std::sort(names.begin(), names.end());
  LoadReport report;
  std::map<std::string, std::shared_ptr<const ServedModel>> loaded;
  for (const auto& name : names) {
    try {
      loaded[name] = load(name);
      report.loaded.push_back(name);
    } catch (const std::exception& e) {
      report.refused[name] = e.what();
    }
  }
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto it = models_.begin(); it != models_.end();)
    it = std::binary_search(names.begin(), names.end(), it->first) ? std::next(it) : models_.erase(it);
  for (auto& [name, model] : loaded) models_[name] = std::move(model);
  refused_ = report.refused;
  return report;
}

std::shared_ptr<const ServedModel> ModelRegistry::reload(const std::string& name) {
  std::lock_guard<std::mutex> reload_lock(reload_mutex_);
  if (!is_model_folder_name(name) || !fs::is_directory(fs::path(root_) / name))
    throw UnknownModel(name + ": no such model folder under " + root_);
  std::shared_ptr<const ServedModel> model;
  try {
    model = load(name);
  } catch (const std::exception& e) {
    std::lock_guard<std::mutex> lock(mutex_);
    refused_[name] = e.what();
    throw;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  models_[name] = model;
  refused_.erase(name);
  return model;
}

std::shared_ptr<const ServedModel> ModelRegistry::find(const std::string& name) const {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto it = models_.find(name);
  return it == models_.end() ? nullptr : it->second;
}

std::vector<std::shared_ptr<const ServedModel>> ModelRegistry::models() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::shared_ptr<const ServedModel>> all;
  for (const auto& [name, model] : models_) all.push_back(model);
  return all;
}

std::map<std::string, std::string> ModelRegistry::refused() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return refused_;
}

}  // namespace patchcore::serve

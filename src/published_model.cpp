#include "patchcore/published_model.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <stdexcept>

#include "io/plain_pickle.h"
#include "patchcore/io/image.h"
#include "patchcore/nn/faiss_nn.h"

namespace fs = std::filesystem;

namespace patchcore {
namespace {

constexpr const char* kParamsFile = "patchcore_params.pkl";

// The prefixes of the members in `dir`: "" for a single model, Ensemble-{i}-{n}_ for i = 1..n, where n counts the
// .faiss files as the published load_and_evaluate_patchcore.py does.
std::vector<std::string> member_prefixes(const std::string& dir) {
  int indexes = 0;
  for (const auto& entry : fs::directory_iterator(dir))
    if (entry.path().filename().string().find(".faiss") != std::string::npos) ++indexes;
  if (indexes <= 1) return {""};
  std::vector<std::string> prefixes;
  for (int i = 1; i <= indexes; ++i)
    prefixes.push_back("Ensemble-" + std::to_string(i) + "-" + std::to_string(indexes) + "_");
  return prefixes;
}

int64_t integer(const nlohmann::json& params, const char* key, const std::string& path) {
  const auto it = params.find(key);
  if (it == params.end() || !it->is_number_integer())
    throw std::runtime_error(path + ": '" + key + "' is missing or not an integer");
  return it->get<int64_t>();
}

std::unique_ptr<PatchCore> load_member(const std::string& dir, const std::string& prefix,
                                       const std::string& weights_path, const PublishedModelOptions& options) {
  const std::string path = (fs::path(dir) / (prefix + kParamsFile)).string();
  const nlohmann::json p = read_plain_pickle(path);
  if (!p.is_object()) throw std::runtime_error(path + ": not the published PatchCore's parameters (no dict)");
  try {
    PatchCoreParams params;
    params.layers_to_extract_from = p.at("layers_to_extract_from").get<std::vector<std::string>>();
    params.pretrain_embed_dimension = integer(p, "pretrain_embed_dimension", path);
    params.target_embed_dimension = integer(p, "target_embed_dimension", path);
    params.patchsize = integer(p, "patchsize", path);
    params.patchstride = integer(p, "patchstride", path);
    params.anomaly_scorer_num_nn = integer(p, "anomaly_scorer_num_nn", path);
    const std::vector<int64_t> shape = p.at("input_shape").get<std::vector<int64_t>>();
    if (shape.size() != 3 || shape[0] != 3 || shape[1] != shape[2] || shape[1] < 1 ||
        shape[1] > ImageTransform::kMaxSide)
      throw std::runtime_error(path + ": input_shape must be (3, size, size)");
    params.transform.crop = static_cast<int>(shape[1]);
    params.transform.resize = options.resize;
    const std::string architecture = options.architecture.empty()
                                         ? published_architecture(p.at("backbone.name").get<std::string>())
                                         : options.architecture;
    // The published FaissNN is a flat index, searched exactly; its IVF-PQ sibling stays approximate.
    auto model = std::make_unique<PatchCore>("cpu");
    model->load(load_backbone(architecture, weights_path, params.layers_to_extract_from), params,
                std::make_shared<IdentitySampler>(), make_nn_method("ExactPrunedNN", options.num_workers));
    try {
      model->load_index(dir, prefix);
    } catch (const std::runtime_error& e) {
      if (std::string(e.what()).find("another kind") == std::string::npos) throw;
      model->load(load_backbone(architecture, weights_path, params.layers_to_extract_from), params,
                  std::make_shared<IdentitySampler>(), make_nn_method("ApproximateFaissNN", options.num_workers));
      model->load_index(dir, prefix);
    }
    return model;
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(path + ": bad or missing field: " + e.what());
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error(path + ": " + e.what());
  }
}

}  // namespace

bool is_published_model(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return false;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (name.size() >= 20 && name.compare(name.size() - 20, 20, kParamsFile) == 0) return true;
  }
  return false;
}

std::string published_architecture(const std::string& name) {
  static const std::map<std::string, std::string> published = {
      {"wideresnet50", "wide_resnet50_2"}, {"wideresnet101", "wide_resnet101_2"}, {"resnext101", "resnext101_32x8d"}};
  const auto it = published.find(name);
  const std::string architecture = it == published.end() ? name : it->second;
  const auto known = resnet_names();
  if (std::find(known.begin(), known.end(), architecture) == known.end())
    throw std::invalid_argument("backbone '" + name +
                                "' is not a torchvision ResNet; give it as TorchScript (--backbone torchscript)");
  return architecture;
}

std::vector<std::unique_ptr<PatchCore>> load_published_model(const std::string& dir, const std::string& weights_path,
                                                             const PublishedModelOptions& options) {
  if (!is_published_model(dir)) throw std::runtime_error(dir + ": no patchcore_params.pkl, not a published model");
  std::vector<std::unique_ptr<PatchCore>> members;
  for (const std::string& prefix : member_prefixes(dir))
    members.push_back(load_member(dir, prefix, weights_path, options));
  return members;
}

PatchCoreEnsemble load_model_directory(const std::string& dir, const std::string& weights_path,
                                       const PublishedModelOptions& options) {
  std::vector<std::unique_ptr<PatchCore>> members;
  if (is_published_model(dir)) {
    if (weights_path.empty())
      throw std::invalid_argument(dir +
                                  ": a model saved by the published PatchCore holds no backbone weights; give "
                                  "them with --weights");
    members = load_published_model(dir, weights_path, options);
  } else {
    if (!weights_path.empty())
      throw std::invalid_argument(dir +
                                  ": the model holds its own backbone weights; --weights is for models saved "
                                  "by the published PatchCore");
    members.push_back(PatchCore::load_from_path(dir, "cpu", options.num_workers));
  }
  return PatchCoreEnsemble(std::move(members));
}

PatchCoreEnsemble::PatchCoreEnsemble(std::vector<std::unique_ptr<PatchCore>> members) : members_(std::move(members)) {
  if (members_.empty()) throw std::invalid_argument("PatchCoreEnsemble: no members");
  for (const auto& m : members_)
    if (m->params().transform.crop != params().transform.crop ||
        m->params().transform.resize != params().transform.resize)
      throw std::invalid_argument("PatchCoreEnsemble: the members see images of different sizes");
  if (members_.size() == 1) return;
  for (const auto& m : members_) {
    // The median over up to 4096 evenly spaced bank rows of the squared distance to their nearest other row.
    const NearestNeighbourSearch& nn = m->anomaly_scorer().nn_method();
    const int64_t rows = nn.size(), samples = std::min<int64_t>(rows, 4096);
    const at::Tensor bank = m->memory_bank();
    const at::Tensor queries = bank.index_select(0, at::arange(samples, at::kLong).mul(rows).div(samples, "floor"));
    const at::Tensor distances = nn.run(std::min<int64_t>(2, rows), queries).first;
    const float scale = distances.select(1, distances.size(1) - 1).median().item<float>();
    scales_.push_back(scale > 0 ? scale : 1.0f);
  }
}

PredictResult PatchCoreEnsemble::predict(const std::vector<at::Tensor>& images) const {
  if (members_.size() == 1) return members_.front()->predict(images);
  PredictResult combined;
  for (size_t k = 0; k < members_.size(); ++k) {
    const PredictResult r = members_[k]->predict(images);
    const float weight = 1.0f / (scales_[k] * static_cast<float>(members_.size()));
    if (k == 0) {
      combined.scores.assign(r.scores.size(), 0.0f);
      for (const auto& m : r.masks) combined.masks.push_back(at::zeros_like(m));
    }
    for (size_t i = 0; i < r.scores.size(); ++i) {
      combined.scores[i] += r.scores[i] * weight;
      combined.masks[i] += r.masks[i] * weight;
    }
  }
  return combined;
}

}  // namespace patchcore

#include "patchcore/model_dir.h"

#include <zlib.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <stdexcept>
#include <vector>

#include "patchcore/core/file.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace patchcore {
namespace {

// An integer of the description, range-checked before it is narrowed or used for a size. Floats are refused
// rather than converted: converting one beyond int64's range is undefined behaviour.
int64_t bounded(const json& value, const std::string& key, int64_t low, int64_t high) {
  // nlohmann keeps integers above INT64_MAX as unsigned; read as int64 they would wrap to negatives.
  if (!value.is_number_integer() ||
      (value.is_number_unsigned() && value.get<uint64_t>() > static_cast<uint64_t>(high)) ||
      value.get<int64_t>() < low || value.get<int64_t>() > high)
    throw std::invalid_argument(key + " must be an integer in [" + std::to_string(low) + ", " + std::to_string(high) +
                                "], got " + value.dump());
  return value.get<int64_t>();
}

constexpr int64_t kMaxCount = std::numeric_limits<int64_t>::max();

json threshold_json(const Threshold& t) {
  return {{"value", t.value},
          {"method", to_string(t.method)},
          {"quantile", t.quantile},
          {"f1", t.f1},
          {"good_images", t.good_images},
          {"defective_images", t.defective_images},
          {"scores", t.scores},
          {"min", t.min},
          {"max", t.max}};
}

double finite(const json& value, const std::string& key) {
  const double v = value.get<double>();
  if (!std::isfinite(v)) throw std::invalid_argument(key + " must be finite");
  return v;
}

std::optional<Threshold> read_threshold(const json& calibration, const std::string& which) {
  if (!calibration.contains(which) || calibration.at(which).is_null()) return std::nullopt;
  const json& j = calibration.at(which);
  const std::string key = "calibration." + which;
  Threshold t;
  t.value = finite(j.at("value"), key + ".value");
  t.method = parse_threshold_method(j.at("method").get<std::string>());
  t.quantile = finite(j.at("quantile"), key + ".quantile");
  t.f1 = finite(j.at("f1"), key + ".f1");
  t.good_images = bounded(j.at("good_images"), key + ".good_images", 0, kMaxCount);
  t.defective_images = bounded(j.at("defective_images"), key + ".defective_images", 0, kMaxCount);
  t.scores = bounded(j.at("scores"), key + ".scores", 1, kMaxCount);
  t.min = finite(j.at("min"), key + ".min");
  t.max = finite(j.at("max"), key + ".max");
  if (t.min > t.max) throw std::invalid_argument(key + ": min is above max");
  if (t.quantile < 0 || t.quantile > 1) throw std::invalid_argument(key + ".quantile must be in [0, 1]");
  return t;
}

}  // namespace

FileDigest file_digest(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open file");
  FileDigest d;
  uLong crc = crc32_z(0L, Z_NULL, 0);
  std::vector<char> buffer(1 << 20);
  while (in) {
    in.read(buffer.data(), static_cast<std::streamsize>(buffer.size()));
    const auto n = in.gcount();
    crc = crc32_z(crc, reinterpret_cast<const Bytef*>(buffer.data()), static_cast<size_t>(n));
    d.bytes += static_cast<uint64_t>(n);
  }
  if (in.bad()) throw std::runtime_error(path + ": read error");
  d.crc32 = static_cast<uint32_t>(crc);
  return d;
}

std::string ModelDescription::path(const std::string& dir, const std::string& prepend) {
  return (fs::path(dir) / (prepend + kParamsFile)).string();
}

std::string ModelDescription::weights_path(const std::string& dir) const {
  return (fs::path(dir) / weights_file).string();
}

void write_model_description(const std::string& dir, const std::string& prepend, const ModelDescription& d) {
  const PatchCoreParams& p = d.params;
  json j = {
      {"format", ModelDescription::kFormat},
      {"version", ModelDescription::kFormatVersion},
      {"backbone.name", d.backbone},
      {"backbone.weights", {{"file", d.weights_file}, {"bytes", d.weights.bytes}, {"crc32", d.weights.crc32}}},
      {"layers_to_extract_from", p.layers_to_extract_from},
      {"input_shape", p.input_shape()},
      {"pretrain_embed_dimension", p.pretrain_embed_dimension},
      {"target_embed_dimension", p.target_embed_dimension},
      {"patchsize", p.patchsize},
      {"patchstride", p.patchstride},
      {"anomaly_scorer_num_nn", p.anomaly_scorer_num_nn},
      {"resize", p.transform.resize},
      {"view", view_name(p.transform.view)},
      {"tile_overlap", p.transform.tile_overlap},
      {"mean", p.transform.mean},
      {"std", p.transform.std},
      {"batchnorm_statistics", to_string(p.batchnorm_statistics)},
      {"nn_method", d.nn_method},
      {"memory_bank_size", d.memory_bank_size},
      {"normal_patch_scores",
       {{"max", d.normal_scores.max}, {"p99", d.normal_scores.p99}, {"patches", d.normal_scores.patches}}},
      {"provenance",
       {{"tool", d.provenance.tool},
        {"created", d.provenance.created},
        {"data", d.provenance.data},
        {"train_images", d.provenance.train_images},
        {"options", json(d.provenance.options)}}},
  };
  const Calibration& c = d.calibration;
  if (c.image || c.pixel)
    j["calibration"] = {{"data", c.data},
                        {"created", c.created},
                        {"image", c.image ? threshold_json(*c.image) : json()},
                        {"pixel", c.pixel ? threshold_json(*c.pixel) : json()}};
  write_file_atomically(ModelDescription::path(dir, prepend), j.dump(2) + "\n");
}

void write_model_calibration(const std::string& dir, const Calibration& calibration, const std::string& prepend) {
  ModelDescription d = read_model_description(dir, prepend);
  d.calibration = calibration;
  write_model_description(dir, prepend, d);
}

ModelDescription read_model_description(const std::string& dir, const std::string& prepend) {
  if (!fs::is_directory(dir)) throw std::runtime_error(dir + ": no such model directory");
  const std::string params_path = ModelDescription::path(dir, prepend);
  json j;
  try {
    j = json::parse(read_file(params_path));
  } catch (const json::exception& e) {
    throw std::runtime_error(params_path + ": malformed JSON: " + e.what());
  }
  try {
    if (!j.is_object() || j.value("format", "") != ModelDescription::kFormat)
      throw std::runtime_error(params_path + ": not a patchcore model description");
    const int64_t version = bounded(j.at("version"), "version", 1, std::numeric_limits<int32_t>::max());
    if (version > ModelDescription::kFormatVersion)
      throw std::runtime_error(params_path + ": written by a newer patchcore (format version " +
                               std::to_string(version) + ", this build reads up to " +
                               std::to_string(ModelDescription::kFormatVersion) + ")");
    ModelDescription d;
    PatchCoreParams& params = d.params;
    params.layers_to_extract_from = j.at("layers_to_extract_from").get<std::vector<std::string>>();
    const auto field = [&](const char* key, int64_t high) { return bounded(j.at(key), key, 1, high); };
    params.pretrain_embed_dimension = field("pretrain_embed_dimension", PatchCoreParams::kMaxEmbedDimension);
    params.target_embed_dimension = field("target_embed_dimension", PatchCoreParams::kMaxEmbedDimension);
    params.patchsize = field("patchsize", PatchCoreParams::kMaxPatchsize);
    params.patchstride = field("patchstride", PatchCoreParams::kMaxPatchsize);
    params.anomaly_scorer_num_nn = field("anomaly_scorer_num_nn", PatchCoreParams::kMaxNearestNeighbours);
    const json& input_shape = j.at("input_shape");
    if (!input_shape.is_array() || input_shape.size() != 3 || input_shape[1] != input_shape[2] ||
        bounded(input_shape[0], "input_shape[0]", 3, 3) != 3)
      throw std::runtime_error(params_path + ": input_shape must be [3, crop, crop]");
    params.transform.crop = static_cast<int>(bounded(input_shape[1], "input_shape[1]", 1, ImageTransform::kMaxSide));
    params.transform.resize = static_cast<int>(field("resize", ImageTransform::kMaxSide));
    if (version >= 3) {
      try {
        params.transform.view = parse_view(j.at("view").get<std::string>());
      } catch (const std::invalid_argument& e) {
        throw std::runtime_error(params_path + ": " + e.what());
      }
      params.transform.tile_overlap =
          static_cast<int>(bounded(j.at("tile_overlap"), "tile_overlap", 0, ImageTransform::kMaxSide));
    }
    params.transform.mean = j.at("mean").get<std::array<float, 3>>();
    params.transform.std = j.at("std").get<std::array<float, 3>>();
    params.batchnorm_statistics = version < 2
                                      ? BatchNormStatistics::kCheckpoint
                                      : parse_batchnorm_statistics(j.at("batchnorm_statistics").get<std::string>());
    d.backbone = j.at("backbone.name").get<std::string>();
    d.nn_method = j.at("nn_method").get<std::string>();
    if (j.contains("memory_bank_size"))
      d.memory_bank_size = bounded(j.at("memory_bank_size"), "memory_bank_size", 0, kMaxCount);
    if (j.contains("normal_patch_scores")) {
      const json& s = j.at("normal_patch_scores");
      d.normal_scores = {s.at("max").get<float>(), s.at("p99").get<float>(),
                         bounded(s.at("patches"), "normal_patch_scores.patches", 0, kMaxCount)};
      if (!std::isfinite(d.normal_scores.max) || !std::isfinite(d.normal_scores.p99))
        throw std::runtime_error(params_path + ": normal_patch_scores must be finite");
    }
    if (j.contains("provenance")) {
      const json& p = j.at("provenance");
      d.provenance.tool = p.value("tool", "");
      d.provenance.created = p.value("created", "");
      d.provenance.data = p.value("data", "");
      if (p.contains("train_images"))
        d.provenance.train_images = bounded(p.at("train_images"), "provenance.train_images", 0, kMaxCount);
      if (p.contains("options"))
        d.provenance.options = p.at("options").get<std::vector<std::pair<std::string, std::string>>>();
    }
    if (j.contains("calibration")) {
      const json& c = j.at("calibration");
      d.calibration.data = c.value("data", "");
      d.calibration.created = c.value("created", "");
      d.calibration.image = read_threshold(c, "image");
      d.calibration.pixel = read_threshold(c, "pixel");
    }

    const json& weights = j.at("backbone.weights");
    d.weights_file = weights.at("file").get<std::string>();
    // Only a file of the model directory itself: the description must not send the loader elsewhere.
    if (d.weights_file.empty() || d.weights_file == "." || d.weights_file == ".." ||
        fs::path(d.weights_file).filename().string() != d.weights_file)
      throw std::runtime_error(params_path +
                               ": backbone.weights.file must name a file inside the model directory, got '" +
                               d.weights_file + "'");
    d.weights = {static_cast<uint64_t>(bounded(weights.at("bytes"), "backbone.weights.bytes", 0, kMaxCount)),
                 static_cast<uint32_t>(bounded(weights.at("crc32"), "backbone.weights.crc32", 0, UINT32_MAX))};
    const std::string weights_path = d.weights_path(dir);
    if (!fs::is_regular_file(weights_path))
      throw std::runtime_error(weights_path + ": backbone weights missing from the model");
    if (!(file_digest(weights_path) == d.weights))
      throw std::runtime_error(weights_path + ": backbone weights do not match the size/CRC-32 recorded in " +
                               params_path);
    return d;
  } catch (const json::exception& e) {
    throw std::runtime_error(params_path + ": bad or missing field: " + e.what());
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error(params_path + ": " + e.what());
  }
}

}  // namespace patchcore

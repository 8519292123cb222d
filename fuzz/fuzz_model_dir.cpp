// libFuzzer target: arbitrary bytes as the files of a model directory, loaded with
// PatchCore::load_from_path and, when that succeeds, used for one prediction.
//
// Input layout: patchcore_params.json, kSeparator, nnscorer_search_index.faiss[, kSeparator,
// nnscorer_features.npy[, kSeparator, nnscorer_search_index.pruning]]. The backbone is a small TorchScript feature
// extractor (fuzz/model_dir_backbone.pt, written by scripts/fuzz/make_corpus.py) copied into the directory once, so the
// seeds' size and CRC-32 match it and the fuzzer spends its time on the JSON, the index and the bank.
#include <torch/torch.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "patchcore/nn/exact_pruned_nn.h"
#include "patchcore/patchcore.h"

namespace fs = std::filesystem;

namespace {

constexpr char kSeparator[] = "\n==patchcore-fuzz==\n";

std::string& model_dir() {
  static std::string dir;
  return dir;
}

void write(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) std::abort();  // the harness's own temp folder, not the input, is broken
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  std::string pattern = (fs::temp_directory_path() / "patchcore-fuzz-model-XXXXXX").string();
  if (!::mkdtemp(pattern.data())) std::abort();
  model_dir() = pattern;
  fs::copy_file(PATCHCORE_FUZZ_BACKBONE, fs::path(pattern) / "backbone.pt");
  std::atexit([] {
    std::error_code ec;
    fs::remove_all(model_dir(), ec);
  });
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  const std::string separator(kSeparator);
  std::vector<std::string> parts;  // params, index, features, pruning structure
  for (size_t begin = 0;;) {
    const size_t end = input.find(separator, begin);
    parts.push_back(input.substr(begin, end == std::string::npos ? std::string::npos : end - begin));
    if (end == std::string::npos) break;
    begin = end + separator.size();
  }
  parts.resize(std::max<size_t>(parts.size(), 2));
  const fs::path dir = model_dir();
  write(dir / "patchcore_params.json", parts[0]);
  const std::string index = patchcore::NearestNeighbourScorer::index_filename(dir, "");
  write(index, parts[1]);
  const std::pair<std::string, size_t> optional[] = {{patchcore::NearestNeighbourScorer::features_filename(dir, ""), 2},
                                                     {patchcore::ExactPrunedNN::pruning_filename(index), 3}};
  for (const auto& [path, part] : optional) {
    if (parts.size() > part)
      write(path, parts[part]);
    else
      fs::remove(path);
  }

  std::unique_ptr<patchcore::PatchCore> model;
  try {
    model = patchcore::PatchCore::load_from_path(dir, "cpu", 1);
  } catch (const std::runtime_error& e) {
    // The documented way to refuse a directory: an error that says which file is wrong.
    if (std::string(e.what()).find(model_dir()) == std::string::npos) {
      std::fprintf(stderr, "error does not name the model directory: %s\n", e.what());
      std::abort();
    }
    return 0;
  }
  // A model that loads must predict or refuse with an error; a zero image is enough to run every stage.
  // Beyond the crop view, a frame wider than the model's input: several tiles to stitch, or a map that is not square.
  const int64_t crop = model->params().transform.crop;
  const int64_t width = model->params().transform.view == patchcore::View::kCrop ? crop : crop + crop / 2;
  try {
    const auto result = model->predict(torch::zeros({1, 3, crop, width}));
    if (result.scores.size() != 1 || result.masks.size() != 1 ||
        result.masks[0].sizes() != at::IntArrayRef({crop, width}))
      std::abort();
  } catch (const std::exception&) {
  }
  return 0;
}

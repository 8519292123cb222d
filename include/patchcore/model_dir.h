#pragma once
// The model directory: what PatchCore::save_to_path writes and load_from_path reads.
//   {prepend}patchcore_params.json       the reference's patchcore_params.pkl fields, the image transform, the
//                                        backbone's architecture and weights file with its size and CRC-32
//   {prepend}nnscorer_search_index.faiss FAISS's own index format (faiss.read_index in Python opens it)
//   {prepend}backbone.pth / backbone.pt  a copy of the backbone's weights
// Models also record how their training patches score (NormalScores), where they came from (Provenance) and,
// once calibrated, their decision thresholds (Calibration).
// Every field is checked when read: integers against their ranges before they size anything, the weights file
// against its recorded size and CRC-32, and file names against leaving the directory.
#include <cstdint>
#include <string>

#include "patchcore/patchcore.h"

namespace patchcore {

struct FileDigest {
  uint64_t bytes = 0;
  uint32_t crc32 = 0;
  bool operator==(const FileDigest& o) const { return bytes == o.bytes && crc32 == o.crc32; }
};

// Size and zlib CRC-32 of a file, read in chunks; throws naming the file when it cannot be read.
FileDigest file_digest(const std::string& path);

struct ModelDescription {
  static constexpr const char* kParamsFile = "patchcore_params.json";
  static constexpr const char* kFormat = "patchcore-model";
  // 2: batchnorm_statistics recorded (version 1 models were fitted with the checkpoint's statistics).
  // 3: view and tile_overlap recorded (older models see the published centre crop).
  static constexpr int kFormatVersion = 3;

  std::string backbone;      // Backbone::architecture(), as load_backbone takes it
  std::string weights_file;  // a file name inside the directory
  FileDigest weights;
  PatchCoreParams params;
  std::string nn_method;  // NearestNeighbourSearch::kind()
  int64_t memory_bank_size = 0;
  NormalScores normal_scores;  // optional: patches 0 where not recorded
  Provenance provenance;       // optional
  Calibration calibration;     // optional: thresholds from calibrate

  // The description file of a model directory.
  static std::string path(const std::string& dir, const std::string& prepend = "");
  // The weights file's path inside `dir`.
  std::string weights_path(const std::string& dir) const;
};

// Writes the description file into `dir`, atomically.
void write_model_description(const std::string& dir, const std::string& prepend, const ModelDescription& description);
// Replaces the calibration recorded in the model directory `dir` (checked as read_model_description checks it) by
// rewriting its description file atomically; the other files stay as they are.
void write_model_calibration(const std::string& dir, const Calibration& calibration, const std::string& prepend = "");
// Reads and checks the description file of `dir`, and the weights file it names against its digest. Throws
// std::runtime_error naming the file and the field or problem.
ModelDescription read_model_description(const std::string& dir, const std::string& prepend = "");

}  // namespace patchcore

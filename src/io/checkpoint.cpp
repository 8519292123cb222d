#include "patchcore/io/checkpoint.h"

#include <c10/util/Exception.h>

#include <new>

#include "checkpoint_formats.h"
#include "patchcore/core/file.h"
#include "pickle.h"
#include "zip_archive.h"

namespace patchcore {

using checkpoint::fail;
using checkpoint::load_legacy;
using checkpoint::load_zip;
using checkpoint::without_backtrace;

StateDict load_state_dict_from_memory(const std::string& bytes, const std::string& name,
                                      const CheckpointLimits& limits) {
  const std::string ctx = name + ": ";
  try {
    if (bytes.size() > limits.max_file_bytes) {
      fail(ctx, "file of " + std::to_string(bytes.size()) + " bytes exceeds the limit of " +
                    std::to_string(limits.max_file_bytes) + " bytes");
    }
    if (bytes.empty()) fail(ctx, "empty file, not a PyTorch checkpoint");
    if (bytes.compare(0, 4, "PK\x03\x04") == 0) return load_zip(bytes, name, limits);
    if (static_cast<uint8_t>(bytes[0]) == 0x80) return load_legacy(bytes, name, limits);
    fail(ctx, "not a PyTorch checkpoint (neither a zip archive nor a legacy torch.save pickle)");
  } catch (const CheckpointError&) {
    throw;
  } catch (const zip::ZipError& e) {
    throw CheckpointError(e.what());
  } catch (const c10::Error& e) {
    throw CheckpointError(ctx + without_backtrace(e));
  } catch (const std::bad_alloc&) {
    throw CheckpointError(ctx + "out of memory while loading");
  } catch (const std::exception& e) {
    throw CheckpointError(ctx + e.what());
  }
}

StateDict load_state_dict(const std::string& path, const CheckpointLimits& limits) {
  std::string bytes;
  try {
    bytes = read_file(path, limits.max_file_bytes);
  } catch (const std::runtime_error& e) {
    throw CheckpointError(e.what());
  }
  return load_state_dict_from_memory(bytes, path, limits);
}

}  // namespace patchcore

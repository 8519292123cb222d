#pragma once
// Reader for PyTorch `.pth` state-dict checkpoints (torchvision's published backbone weights) without
// Python. libtorch's own pickle loader cannot read a torch.save'd state dict, and a general unpickler
// would run whatever callable the file names, so this is a small pickle VM that knows only the opcodes
// and globals a state dict needs, with every size checked against the bytes really present and the limits.
//
// Both on-disk formats are read:
//  - zip (torch >= 1.6): <archive>/data.pkl, <archive>/data/<key>, <archive>/version, read through
//    libtorch's PyTorchStreamReader. Records must be stored uncompressed, as torch.save writes them (a
//    deflated record's declared size cannot be trusted), and must match their CRC-32;
//  - legacy (torch < 1.6 or _use_new_zipfile_serialization=False): magic, protocol and sys_info pickles,
//    the object, the list of storage keys, then each storage as an int64 element count and raw bytes.
// The dict may be wrapped as {"state_dict": {...}} or {"model": {...}}; a "module." prefix that every
// key has (DataParallel) is removed.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace patchcore {

// The only exception type the loaders throw; the message starts with the file path (or name) and says
// what is wrong with it.
class CheckpointError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct CheckpointLimits {
  uint64_t max_file_bytes = 4ull << 30;    // refuse larger files before reading them
  uint64_t max_tensor_bytes = 2ull << 30;  // refuse any single tensor/storage larger than this
  size_t max_tensors = 100000;             // also bounds the pickle's size and object count
};

// Tensors in file order, each a contiguous CPU tensor that owns its memory, with the dtype, shape and
// the strides/offset view of the file resolved.
using StateDict = std::vector<std::pair<std::string, at::Tensor>>;

StateDict load_state_dict(const std::string& path, const CheckpointLimits& limits = {});

// Same from bytes in memory; `name` stands for the file in error messages (fuzzing, embedded weights).
StateDict load_state_dict_from_memory(const std::string& bytes, const std::string& name,
                                      const CheckpointLimits& limits = {});

}  // namespace patchcore

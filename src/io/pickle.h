#pragma once
// The pickle VM of the checkpoint reader: only what torch.save of a state dict emits (protocols 2-5), every size
// checked against the bytes present and the limits. Nothing is ever called except the whitelisted rebuilders,
// which are interpreted rather than looked up. Private to io (checkpoint*.cpp).
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "patchcore/core/error.h"
#include "patchcore/io/checkpoint.h"

namespace patchcore::checkpoint {

// Throws CheckpointError(context + what).
[[noreturn]] void fail(const std::string& context, const std::string& what);
std::string hex_byte(uint8_t b);
// "float", "long", ...: a dtype as messages name it.
std::string dtype_label(c10::ScalarType dtype);

inline bool mul_overflows(uint64_t a, uint64_t b, uint64_t& out) { return __builtin_mul_overflow(a, b, &out); }
inline bool add_overflows(uint64_t a, uint64_t b, uint64_t& out) { return __builtin_add_overflow(a, b, &out); }

// Pickle bytes and VM memory allowed per permitted tensor. A torchvision entry (name, rebuild call,
// persistent id, size/stride tuples, memo entries, its module's _metadata) takes ~100 bytes of pickle
// and ~100 cells of 16 bytes; the limits leave 5-10x headroom.
constexpr uint64_t kPickleBytesPerTensor = 1024;
constexpr uint64_t kPickleCellsPerTensor = 512;
constexpr uint64_t kPickleSlack = 1 << 20;

// ---------------------------------------------------------------------------------------------------
// Pickle values. Everything that is not a scalar lives in a pool owned by the Heap and is referred to by
// index, so memo cycles and deep nesting cost neither leaks nor recursive destruction.

enum class Kind : uint8_t { None, Bool, Int, BigInt, Float, Str, Bytes, Tuple, List, Dict, Global, Storage, Tensor };

const char* kind_name(Kind k);

struct Value {
  Kind kind = Kind::None;
  union {
    int64_t i = 0;  // Int/Bool value, or the pool index of every non-scalar kind
    double f;
  };
};

enum class GlobalId { OrderedDict, RebuildTensorV2, RebuildTensor, RebuildParameter, StorageType };

struct Global {
  GlobalId id;
  c10::ScalarType dtype;  // StorageType only
  std::string qualified;
};

struct DictObject {
  std::vector<std::pair<Value, Value>> items;           // insertion order is the file order of the state dict
  std::unordered_map<std::string_view, size_t> by_str;  // views into Heap::strings
  std::unordered_map<int64_t, size_t> by_int;
};

// One typed window on a storage: the legacy format's storage views make offset/length non-trivial.
struct StorageRef {
  size_t storage;
  c10::ScalarType dtype;
  uint64_t byte_offset;
  uint64_t byte_length;
};

struct TensorDesc {
  StorageRef storage;
  int64_t offset;
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;
};

// What one checkpoint's pickles may build together, derived from CheckpointLimits::max_tensors.
struct Budget {
  uint64_t cells_left;
  size_t max_tensors;
};

struct Heap {
  std::deque<std::string> strings;  // Str, Bytes, BigInt (little-endian two's complement); never moved
  std::vector<std::vector<Value>> seqs;
  std::vector<DictObject> dicts;
  std::vector<Global> globals;
  std::vector<StorageRef> storages;
  std::vector<TensorDesc> tensors;

  const std::string& str(const Value& v) const { return strings[static_cast<size_t>(v.i)]; }
  const std::vector<Value>& seq(const Value& v) const { return seqs[static_cast<size_t>(v.i)]; }
  const DictObject& dict(const Value& v) const { return dicts[static_cast<size_t>(v.i)]; }
  const Global& global(const Value& v) const { return globals[static_cast<size_t>(v.i)]; }

  const Value* find(const DictObject& d, const std::string& key) const {
    auto it = d.by_str.find(std::string_view(key));
    return it == d.by_str.end() ? nullptr : &d.items[it->second].second;
  }
};

inline Value make(Kind kind, size_t index) {
  Value v;
  v.kind = kind;
  v.i = static_cast<int64_t>(index);
  return v;
}

// Called for each persistent id the pickle loads (a storage reference in torch.save's format).
using PersistentLoad = std::function<Value(const Value& pid)>;

// Runs the pickle that starts at data[start] to its STOP opcode and returns its value; *end receives the offset
// after STOP. `context` begins every message (file name, and the record for zip archives); offsets in messages
// count from `data`, i.e. they are file offsets in the legacy format. A null persistent_load refuses persistent ids.
Value unpickle(const std::string& context, const uint8_t* data, size_t size, size_t start, Heap& heap, Budget& budget,
               const PersistentLoad& persistent_load, size_t* end);

}  // namespace patchcore::checkpoint

#pragma once
// Storages named by a checkpoint's persistent ids, and the state dict assembled from the unpickled object and
// the storages' bytes, for both on-disk formats. Private to io (checkpoint*.cpp).
#include <c10/core/Allocator.h>

#include <cstdint>
#include <functional>
#include <string>
#include <unordered_map>
#include <vector>

#include "pickle.h"

namespace patchcore::checkpoint {

constexpr size_t kMaxStorageKeyLength = 64;

// Storages named by persistent ids ('storage', torch.<T>Storage, key, location, numel[, view_metadata]).

struct StorageInfo {
  std::string key;
  uint64_t numel;  // in elements of the first reference's type, which the legacy data section counts in
  uint64_t nbytes;
  const uint8_t* legacy_data = nullptr;
};

class StorageTable {
 public:
  using OnNew = std::function<void(const StorageInfo&)>;

  StorageTable(std::string name, const CheckpointLimits& limits, bool legacy, OnNew on_new)
      : name_(std::move(name)), limits_(limits), legacy_(legacy), on_new_(std::move(on_new)) {}

  // How messages name a storage: its zip record, or its key in the legacy format.
  std::string display(const std::string& key) const { return quote_name(legacy_ ? key : "data/" + key); }
  std::string display(size_t index) const { return display(entries[index].key); }

  Value declare(Heap& heap, const Value& pid) {
    const std::string ctx = name_ + ": ";
    if (pid.kind != Kind::Tuple)
      fail(ctx, std::string("persistent id is a ") + kind_name(pid.kind) + ", expected a tuple");
    const auto& items = heap.seq(pid);
    if (items.size() < 5 || items.size() > (legacy_ ? 6u : 5u)) {
      fail(ctx, "persistent id tuple has " + std::to_string(items.size()) + " items");
    }
    if (items[0].kind != Kind::Str || heap.str(items[0]) != "storage")
      fail(ctx, "persistent id is not a 'storage' record");
    if (items[1].kind != Kind::Global || heap.global(items[1]).id != GlobalId::StorageType) {
      fail(ctx, "persistent id names no torch storage type");
    }
    const c10::ScalarType dtype = heap.global(items[1]).dtype;
    const uint64_t element_size = c10::elementSize(dtype);
    const std::string key = storage_key(heap, items[2]);
    if (items[3].kind != Kind::Str) fail(ctx, "storage " + display(key) + " location is not a string");
    if (items[4].kind != Kind::Int || items[4].i < 0) fail(ctx, "storage " + display(key) + " has an invalid size");
    const auto numel = static_cast<uint64_t>(items[4].i);
    uint64_t nbytes = 0;
    if (mul_overflows(numel, element_size, nbytes) || nbytes > limits_.max_tensor_bytes) {
      fail(ctx, "storage " + display(key) + " of " + std::to_string(numel) + " " + dtype_label(dtype) +
                    " elements exceeds the limit of " + std::to_string(limits_.max_tensor_bytes) + " bytes");
    }

    size_t index;
    auto it = by_key_.find(key);
    if (it == by_key_.end()) {
      index = entries.size();
      entries.push_back(StorageInfo{key, numel, nbytes});
      by_key_.emplace(key, index);
      on_new_(entries.back());
    } else {
      index = it->second;
      if (entries[index].nbytes != nbytes) {
        fail(ctx, "storage " + display(key) + " is declared with " + std::to_string(entries[index].nbytes) + " and " +
                      std::to_string(nbytes) + " bytes");
      }
    }

    StorageRef ref{index, dtype, 0, nbytes};
    if (items.size() == 6 && items[5].kind != Kind::None) {
      // Legacy storage view (view_key, offset, size), counted in elements of this storage's type.
      const Value& view = items[5];
      if (view.kind != Kind::Tuple || heap.seq(view).size() != 3)
        fail(ctx, "storage " + display(key) + " has invalid view metadata");
      const auto& v = heap.seq(view);
      storage_key(heap, v[0]);
      if (v[1].kind != Kind::Int || v[2].kind != Kind::Int || v[1].i < 0 || v[2].i < 0) {
        fail(ctx, "storage " + display(key) + " has invalid view metadata");
      }
      const auto view_offset = static_cast<uint64_t>(v[1].i);
      const auto view_size = static_cast<uint64_t>(v[2].i);
      if (view_offset > numel || view_size > numel - view_offset) {
        fail(ctx, "storage view of " + display(key) + " exceeds its storage");
      }
      ref.byte_offset = view_offset * element_size;
      ref.byte_length = view_size * element_size;
    }
    heap.storages.push_back(ref);
    return make(Kind::Storage, heap.storages.size() - 1);
  }

  size_t find(const std::string& key) const {
    auto it = by_key_.find(key);
    return it == by_key_.end() ? entries.size() : it->second;
  }

  std::vector<StorageInfo> entries;

 private:
  // Keys become zip record names: torch writes decimal numbers, anything path-like is refused.
  std::string storage_key(const Heap& heap, const Value& v) const {
    if (v.kind != Kind::Str) fail(name_ + ": ", "storage key is not a string");
    const std::string& key = heap.str(v);
    const bool ok = !key.empty() && key.size() <= kMaxStorageKeyLength &&
                    std::all_of(key.begin(), key.end(),
                                [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; });
    if (!ok) fail(name_ + ": ", "invalid storage key " + quote_name(key));
    return key;
  }

  std::string name_;
  const CheckpointLimits& limits_;
  bool legacy_;
  OnNew on_new_;
  std::unordered_map<std::string, size_t> by_key_;
};

// Where the storages' bytes come from: the legacy file's data section or the zip archive's records.
class StorageSource {
 public:
  virtual ~StorageSource() = default;
  // Bytes of the whole storage (StorageInfo::nbytes of them), valid until release().
  virtual const uint8_t* acquire(size_t storage) = 0;
  virtual void release(size_t storage) = 0;
  // The storage's own aligned buffer, handed over for a tensor to keep; empty where there is none.
  virtual at::DataPtr take(size_t /*storage*/) { return {}; }
};

// The state dict that `root` describes: tensors in file order, each owning its memory, a "module." prefix that
// every key has removed, an outer {"state_dict": ...} or {"model": ...} unwrapped.
StateDict assemble(const std::string& name, const Heap& heap, const Value& root, const StorageTable& table,
                   StorageSource& source, const CheckpointLimits& limits);

// What one checkpoint's pickles may build together.
Budget pickle_budget(const CheckpointLimits& limits);

}  // namespace patchcore::checkpoint

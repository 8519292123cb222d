#include "checkpoint_storage.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>

namespace patchcore::checkpoint {
namespace {

bool is_contiguous(const TensorDesc& t) {
  int64_t expected = 1;
  for (size_t d = t.sizes.size(); d-- > 0;) {
    if (t.sizes[d] == 1) continue;
    if (t.strides[d] != expected) return false;
    expected *= t.sizes[d];
  }
  return true;
}

struct CheckedView {
  uint64_t numel;
  uint64_t extent;  // elements spanned in the storage from the offset on
};

CheckedView check_view(const std::string& name, const std::string& tensor, const TensorDesc& t,
                       const StorageTable& table, const CheckpointLimits& limits) {
  const std::string ctx = name + ": tensor " + quote_name(tensor) + " ";
  const uint64_t element_size = c10::elementSize(t.storage.dtype);
  uint64_t numel = 1;
  for (int64_t s : t.sizes) {
    if (mul_overflows(numel, static_cast<uint64_t>(s), numel)) fail(ctx, "has an absurd shape");
  }
  uint64_t nbytes = 0;
  if (mul_overflows(numel, element_size, nbytes) || nbytes > limits.max_tensor_bytes) {
    fail(ctx, "of " + std::to_string(numel) + " elements exceeds the limit of " +
                  std::to_string(limits.max_tensor_bytes) + " bytes");
  }
  if (numel == 0) return {0, 0};
  uint64_t last = 0;  // index of the last element relative to the offset
  for (size_t d = 0; d < t.sizes.size(); ++d) {
    uint64_t span = 0;
    if (mul_overflows(static_cast<uint64_t>(t.sizes[d] - 1), static_cast<uint64_t>(t.strides[d]), span) ||
        add_overflows(last, span, last)) {
      fail(ctx, "view exceeds its storage");
    }
  }
  const uint64_t storage_numel = t.storage.byte_length / element_size;
  uint64_t end = 0;
  if (add_overflows(static_cast<uint64_t>(t.offset), last, end) || end >= storage_numel) {
    fail(ctx, "view exceeds its storage " + table.display(t.storage.storage) + ": it reaches element " +
                  std::to_string(static_cast<uint64_t>(t.offset) + last) + " of " + std::to_string(storage_numel));
  }
  return {numel, last + 1};
}

// Any byte but 0/1 would be an invalid bool for every kernel that reads it, copy_ included.
void normalize_bools(uint8_t* p, uint64_t count) {
  for (uint64_t k = 0; k < count; ++k) p[k] = p[k] != 0;
}

// A tensor that is its whole storage, contiguously, can keep the storage's buffer instead of a copy.
bool is_whole_storage(const TensorDesc& t, const CheckedView& view, const StorageTable& table) {
  return view.numel > 0 && t.offset == 0 && t.storage.byte_offset == 0 && is_contiguous(t) &&
         view.numel * c10::elementSize(t.storage.dtype) == table.entries[t.storage.storage].nbytes;
}

at::Tensor adopt(at::DataPtr buffer, const TensorDesc& t, const CheckedView& view) {
  auto holder = std::make_shared<at::DataPtr>(std::move(buffer));
  auto* data = static_cast<uint8_t*>(holder->get());
  if (t.storage.dtype == c10::kBool) normalize_bools(data, view.numel);
  return at::from_blob(
      data, t.sizes, [holder](void*) {}, at::TensorOptions().dtype(t.storage.dtype));
}

at::Tensor materialize(const TensorDesc& t, const CheckedView& view, const uint8_t* storage_bytes) {
  const auto options = at::TensorOptions().dtype(t.storage.dtype);
  at::Tensor out = at::empty(t.sizes, options);
  if (view.numel == 0) return out;
  const size_t element_size = c10::elementSize(t.storage.dtype);
  const uint8_t* src = storage_bytes + t.storage.byte_offset + static_cast<uint64_t>(t.offset) * element_size;
  auto copy_raw = [&](void* dst, uint64_t count) {
    std::memcpy(dst, src, count * element_size);
    if (t.storage.dtype == c10::kBool) normalize_bools(static_cast<uint8_t*>(dst), count);
  };
  if (is_contiguous(t)) {
    copy_raw(out.data_ptr(), view.numel);
  } else {
    // Copied to an aligned buffer first: legacy storages sit at arbitrary offsets in the file.
    at::Tensor span = at::empty({static_cast<int64_t>(view.extent)}, options);
    copy_raw(span.data_ptr(), view.extent);
    out.copy_(span.as_strided(t.sizes, t.strides));
  }
  return out;
}

}  // namespace

StateDict assemble(const std::string& name, const Heap& heap, const Value& root, const StorageTable& table,
                   StorageSource& source, const CheckpointLimits& limits) {
  const std::string ctx = name + ": ";
  if (root.kind != Kind::Dict)
    fail(ctx, std::string("checkpoint holds a ") + kind_name(root.kind) + ", not a state dict");
  const DictObject* dict = &heap.dict(root);
  for (const char* wrapper : {"state_dict", "model"}) {
    const Value* inner = heap.find(*dict, wrapper);
    if (inner && inner->kind == Kind::Dict) {
      dict = &heap.dict(*inner);
      break;
    }
  }

  struct Entry {
    std::string name;
    const TensorDesc* desc;
    CheckedView view;
  };
  std::vector<Entry> entries;
  std::vector<size_t> uses(table.entries.size(), 0);
  for (size_t k = 0; k < dict->items.size(); ++k) {
    const auto& [key, value] = dict->items[k];
    if (key.kind != Kind::Str)
      fail(ctx, "state dict key #" + std::to_string(k) + " is a " + kind_name(key.kind) + ", not a string");
    const std::string& tensor_name = heap.str(key);
    if (value.kind != Kind::Tensor) {
      fail(ctx, "entry " + quote_name(tensor_name) + " is a " + kind_name(value.kind) + ", not a tensor");
    }
    const TensorDesc& desc = heap.tensors[static_cast<size_t>(value.i)];
    entries.push_back({tensor_name, &desc, check_view(name, tensor_name, desc, table, limits)});
    ++uses[desc.storage.storage];
  }

  const std::string prefix = "module.";
  const bool strip = !entries.empty() && std::all_of(entries.begin(), entries.end(), [&](const Entry& e) {
    return e.name.compare(0, prefix.size(), prefix) == 0;
  });

  StateDict out;
  out.reserve(entries.size());
  for (const Entry& e : entries) {
    const size_t storage = e.desc->storage.storage;
    at::Tensor tensor;
    if (uses[storage] == 1 && is_whole_storage(*e.desc, e.view, table)) {
      if (at::DataPtr buffer = source.take(storage)) tensor = adopt(std::move(buffer), *e.desc, e.view);
    }
    if (!tensor.defined()) tensor = materialize(*e.desc, e.view, source.acquire(storage));
    if (--uses[storage] == 0) source.release(storage);
    out.emplace_back(strip ? e.name.substr(prefix.size()) : e.name, std::move(tensor));
  }
  return out;
}

Budget pickle_budget(const CheckpointLimits& limits) {
  return {kPickleCellsPerTensor * static_cast<uint64_t>(limits.max_tensors) + kPickleSlack, limits.max_tensors};
}
}  // namespace patchcore::checkpoint

// The legacy format (torch < 1.6 or _use_new_zipfile_serialization=False): magic, protocol and sys_info
// pickles, the object, the list of storage keys, then each storage as an int64 element count and raw bytes.
#include "checkpoint_formats.h"
#include "checkpoint_storage.h"
#include "patchcore/core/bytes.h"

namespace patchcore::checkpoint {
namespace {

class LegacySource : public StorageSource {
 public:
  explicit LegacySource(const StorageTable& table) : table_(table) {}
  const uint8_t* acquire(size_t storage) override { return table_.entries[storage].legacy_data; }
  void release(size_t) override {}

 private:
  const StorageTable& table_;
};

}  // namespace

StateDict load_legacy(const std::string& bytes, const std::string& name, const CheckpointLimits& limits) {
  const auto* data = reinterpret_cast<const uint8_t*>(bytes.data());
  const size_t size = bytes.size();
  const std::string ctx = name + ": ";
  Heap heap;
  Budget budget = pickle_budget(limits);
  size_t pos = 0;
  auto next_pickle = [&](const std::string& context, const PersistentLoad& load) {
    return unpickle(context, data, size, pos, heap, budget, load, &pos);
  };

  static const uint8_t kMagic[] = {0x6c, 0xfc, 0x9c, 0x46, 0xf9,
                                   0x20, 0x6a, 0xa8, 0x50, 0x19};  // 0x1950a86a20f9469cfc6c
  const std::string not_checkpoint = ctx + "not a PyTorch checkpoint: ";
  const Value magic = next_pickle(not_checkpoint, nullptr);
  if (magic.kind != Kind::BigInt ||
      heap.str(magic) != std::string(reinterpret_cast<const char*>(kMagic), sizeof kMagic)) {
    fail(not_checkpoint, "the leading pickle is not the legacy torch.save magic number");
  }
  const Value protocol = next_pickle(ctx, nullptr);
  if (protocol.kind != Kind::Int || protocol.i != 1001) fail(ctx, "unsupported legacy serialization protocol");
  const Value sys_info = next_pickle(ctx, nullptr);
  if (sys_info.kind != Kind::Dict) fail(ctx, "legacy sys_info is not a dict");
  const Value* little = heap.find(heap.dict(sys_info), "little_endian");
  if (little && !(little->kind == Kind::Bool && little->i == 1)) fail(ctx, "big-endian checkpoints are not supported");

  // Storage sizes are checked against the data section below; nothing is allocated before that.
  StorageTable table(name, limits, true, [](const StorageInfo&) {});
  const Value root = next_pickle(ctx, [&](const Value& pid) { return table.declare(heap, pid); });
  const Value keys = next_pickle(ctx, nullptr);
  if (keys.kind != Kind::List) fail(ctx, "legacy storage key list is missing");

  for (const Value& key_value : heap.seq(keys)) {
    if (key_value.kind != Kind::Str)
      fail(ctx, "legacy storage key list holds a " + std::string(kind_name(key_value.kind)));
    const std::string& key = heap.str(key_value);
    const size_t index = table.find(key);
    if (index == table.entries.size()) fail(ctx, "storage " + quote_name(key) + " has data but no tensor refers to it");
    StorageInfo& s = table.entries[index];
    if (s.legacy_data) fail(ctx, "storage " + quote_name(key) + " has data twice");
    if (size - pos < 8) {
      fail(ctx, "truncated: storage " + quote_name(key) + " header at offset " + std::to_string(pos) +
                    " needs 8 bytes, has " + std::to_string(size - pos));
    }
    const auto count = static_cast<int64_t>(load_le64(data + pos));
    if (count < 0 || static_cast<uint64_t>(count) != s.numel) {
      fail(ctx, "storage " + quote_name(key) + " header at offset " + std::to_string(pos) + " says " +
                    std::to_string(count) + " elements, the pickle declares " + std::to_string(s.numel));
    }
    pos += 8;
    if (size - pos < s.nbytes) {
      fail(ctx, "truncated: storage " + quote_name(key) + " needs " + std::to_string(s.nbytes) + " bytes, has " +
                    std::to_string(size - pos));
    }
    s.legacy_data = data + pos;
    pos += s.nbytes;
  }
  for (const StorageInfo& s : table.entries) {
    if (!s.legacy_data) fail(ctx, "truncated: storage " + quote_name(s.key) + " has no data in the file");
  }
  if (pos != size)
    fail(ctx, std::to_string(size - pos) + " unexpected bytes after the last storage at offset " + std::to_string(pos));

  LegacySource source(table);
  return assemble(name, heap, root, table, source, limits);
}
}  // namespace patchcore::checkpoint

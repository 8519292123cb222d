// The zip format (torch >= 1.6): <archive>/data.pkl, <archive>/data/<key>, <archive>/version, read through
// libtorch's PyTorchStreamReader after the central directory has been checked.
#include <c10/util/Exception.h>
#include <caffe2/serialize/inline_container.h>
#include <zlib.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <unordered_map>

#include "checkpoint_formats.h"
#include "checkpoint_storage.h"
#include "patchcore/core/bytes.h"
#include "zip_archive.h"

namespace patchcore::checkpoint {
namespace {

struct ZipRecord {
  uint64_t size;
  uint32_t crc;
};
using ZipRecords = std::unordered_map<std::string, ZipRecord>;  // by name inside the archive folder

// All records of a torch.save archive live in one folder, named by the first, which is where
// PyTorchStreamReader looks them up: the records by their name inside it, and the folder.
ZipRecords archive_records(const std::string& name, const std::map<std::string, zip::Record>& all,
                           std::string& folder) {
  const std::string ctx = name + ": ";
  ZipRecords records;
  for (const auto& [full, record] : all) {
    const size_t slash = full.find('/');
    if (slash == std::string::npos) fail(ctx, "zip record " + quote_name(full) + " is not inside an archive folder");
    if (folder.empty()) folder = full.substr(0, slash + 1);
    if (full.compare(0, folder.size(), folder) != 0)
      fail(ctx, "zip record " + quote_name(full) + " is outside the archive folder " + quote_name(folder));
    records.emplace(full.substr(folder.size()), ZipRecord{record.size, record.crc});
  }
  return records;
}

void check_crc(const std::string& name, const std::string& record, const ZipRecords& records, const void* data,
               uint64_t size) {
  const ZipRecord& r = records.at(record);
  zip::check_crc(name, record, zip::Record{r.size, r.crc, 0}, data, size);
}

// PyTorchStreamReader's constructor reads and parses the version record, and when that fails it throws
// without releasing miniz's state: a leak per damaged file. So the record is checked here first.
void check_version_record(const std::string& name, const uint8_t* d, uint64_t n,
                          const std::map<std::string, zip::Record>& all, const std::string& folder) {
  const std::string ctx = name + ": ";
  std::string record = folder + ".data/version";
  if (!all.count(record)) record = folder + "version";
  auto it = all.find(record);
  if (it == all.end()) fail(ctx, "zip archive has no version record: not a torch.save checkpoint");
  if (it->second.size > 32) fail(ctx, "invalid zip archive version record");
  const std::string text(zip::record_bytes(name, d, n, record, it->second));
  const size_t digits = std::min(text.find_first_not_of("0123456789"), text.size());
  const bool ok = digits > 0 && digits <= 9 && text.find_first_not_of(" \r\n", digits) == std::string::npos;
  const uint64_t version = ok ? std::stoull(text.substr(0, digits)) : 0;
  if (version < caffe2::serialize::kMinSupportedFileFormatVersion ||
      version > caffe2::serialize::kMaxSupportedFileFormatVersion) {
    fail(ctx, "unsupported zip archive version " + quote_name(text));
  }
}

class BoundedMemoryAdapter : public caffe2::serialize::ReadAdapterInterface {
 public:
  BoundedMemoryAdapter(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  size_t size() const override { return size_; }
  size_t read(uint64_t pos, void* buf, size_t n, const char* /*what*/) const override {
    if (pos >= size_) return 0;
    const size_t count = static_cast<size_t>(std::min<uint64_t>(n, size_ - pos));
    std::memcpy(buf, data_ + pos, count);
    return count;
  }

 private:
  const uint8_t* data_;
  size_t size_;
};

// Reads a record through PyTorchStreamReader, then holds it to the central directory's size and CRC.
at::DataPtr read_record(const std::string& name, caffe2::serialize::PyTorchStreamReader& reader,
                        const ZipRecords& records, const std::string& record) {
  at::DataPtr data;
  size_t size = 0;
  try {
    std::tie(data, size) = reader.getRecord(record);
  } catch (const c10::Error& e) {
    fail(name + ": ", "cannot read zip record " + quote_name(record) + ": " + without_backtrace(e));
  }
  if (size != records.at(record).size) {
    fail(name + ": ", "zip record " + quote_name(record) + " size disagrees with the central directory");
  }
  check_crc(name, record, records, data.get(), size);
  return data;
}

class ZipSource : public StorageSource {
 public:
  ZipSource(std::string name, caffe2::serialize::PyTorchStreamReader& reader, const ZipRecords& records,
            const StorageTable& table)
      : name_(std::move(name)), reader_(reader), records_(records), table_(table), loaded_(table.entries.size()) {}

  const uint8_t* acquire(size_t storage) override {
    if (!loaded_[storage])
      loaded_[storage] = read_record(name_, reader_, records_, "data/" + table_.entries[storage].key);
    return static_cast<const uint8_t*>(loaded_[storage].get());
  }

  void release(size_t storage) override { loaded_[storage].clear(); }

  at::DataPtr take(size_t storage) override {
    acquire(storage);
    return std::move(loaded_[storage]);
  }

 private:
  std::string name_;
  caffe2::serialize::PyTorchStreamReader& reader_;
  const ZipRecords& records_;
  const StorageTable& table_;
  std::vector<at::DataPtr> loaded_;
};

}  // namespace

std::string without_backtrace(const c10::Error& e) { return e.what_without_backtrace(); }

StateDict load_zip(const std::string& bytes, const std::string& name, const CheckpointLimits& limits) {
  const std::string ctx = name + ": ";
  const auto* data = reinterpret_cast<const uint8_t*>(bytes.data());
  const std::map<std::string, zip::Record> all =
      zip::stored_records(name, data, bytes.size(), static_cast<uint64_t>(limits.max_tensors) + 64);
  std::string folder;
  const ZipRecords records = archive_records(name, all, folder);
  auto has = [&](const std::string& r) { return records.count(r) > 0; };
  for (const auto& r : records) {
    if (r.first.compare(0, 5, "code/") == 0)
      fail(ctx, "is a TorchScript archive (torch.jit.save), not a torch.save state dict");
  }
  if (!has("data.pkl")) fail(ctx, "zip archive has no data.pkl: not a torch.save checkpoint");
  const uint64_t pickle_size = records.at("data.pkl").size;
  const uint64_t max_pickle = kPickleBytesPerTensor * static_cast<uint64_t>(limits.max_tensors) + kPickleSlack;
  if (pickle_size > max_pickle)
    fail(ctx, "data.pkl of " + std::to_string(pickle_size) + " bytes is larger than the tensor limit allows");
  if (has("byteorder") && records.at("byteorder").size > 16) fail(ctx, "invalid byteorder record");
  check_version_record(name, data, bytes.size(), all, folder);

  std::unique_ptr<caffe2::serialize::PyTorchStreamReader> reader;
  try {
    reader = std::make_unique<caffe2::serialize::PyTorchStreamReader>(
        std::make_shared<BoundedMemoryAdapter>(data, bytes.size()));
  } catch (const c10::Error& e) {
    fail(ctx, "invalid PyTorch zip archive: " + without_backtrace(e));
  }
  const at::DataPtr pickle = read_record(name, *reader, records, "data.pkl");
  if (has("byteorder")) {
    const at::DataPtr order = read_record(name, *reader, records, "byteorder");
    if (std::string(static_cast<const char*>(order.get()), records.at("byteorder").size) != "little") {
      fail(ctx, "big-endian checkpoints are not supported");
    }
  }

  Heap heap;
  Budget budget = pickle_budget(limits);
  StorageTable table(name, limits, false, [&](const StorageInfo& s) {
    const std::string record = "data/" + s.key;
    auto it = records.find(record);
    if (it == records.end()) fail(ctx, "storage " + quote_name(record) + " is missing from the archive");
    if (it->second.size < s.nbytes) {
      fail(ctx, "truncated: storage " + quote_name(record) + " needs " + std::to_string(s.nbytes) + " bytes, has " +
                    std::to_string(it->second.size));
    }
    if (it->second.size > s.nbytes) {
      fail(ctx, "storage " + quote_name(record) + " has " + std::to_string(it->second.size) +
                    " bytes, the pickle declares " + std::to_string(s.nbytes));
    }
  });
  size_t end = 0;
  const Value root = unpickle(
      ctx + "data.pkl: ", static_cast<const uint8_t*>(pickle.get()), pickle_size, 0, heap, budget,
      [&](const Value& pid) { return table.declare(heap, pid); }, &end);
  if (end != pickle_size)
    fail(ctx, "data.pkl has " + std::to_string(pickle_size - end) + " bytes after its STOP opcode");

  ZipSource source(name, *reader, records, table);
  return assemble(name, heap, root, table, source, limits);
}
}  // namespace patchcore::checkpoint

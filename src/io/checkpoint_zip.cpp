// The zip format (torch >= 1.6): <archive>/data.pkl, <archive>/data/<key>, <archive>/version, read through
// libtorch's PyTorchStreamReader after the central directory has been checked.
#include <c10/util/Exception.h>
#include <caffe2/serialize/inline_container.h>
#include <zlib.h>

#include <algorithm>
#include <cstring>
#include <memory>

#include "checkpoint_formats.h"
#include "checkpoint_storage.h"
#include "patchcore/core/bytes.h"

namespace patchcore::checkpoint {
namespace {

struct ZipRecord {
  uint64_t size;
  uint32_t crc;
  uint64_t local_header;
};
using ZipRecords = std::unordered_map<std::string, ZipRecord>;  // by name inside the archive folder

// The miniz inside libtorch is built without checksum checks, so a flipped bit in a record would otherwise load
// as a silently different weight.
void check_crc(const std::string& name, const std::string& record, const ZipRecords& records, const void* data,
               uint64_t size) {
  if (crc32_z(0, static_cast<const Bytef*>(data), static_cast<size_t>(size)) != records.at(record).crc) {
    fail(name + ": ", "zip record " + quote_name(record) + " is corrupt (CRC-32 mismatch)");
  }
}

// miniz (inside PyTorchStreamReader) allocates a record's declared uncompressed size and inflates into it,
// so a small deflated record could claim gigabytes. torch.save only writes stored records: this scan of the
// central directory refuses anything else and learns each record's size before the reader touches it. It
// finds the directory the way miniz does (last end record, zip64 locator just before it).
ZipRecords scan_zip(const std::string& name, const uint8_t* d, uint64_t n, uint64_t max_records) {
  const std::string ctx = name + ": ";
  constexpr uint64_t kEndSize = 22, kLocatorSize = 20, kEnd64Size = 56, kEntrySize = 46, kLocalSize = 30;
  if (n < kEndSize) fail(ctx, "truncated: " + std::to_string(n) + " bytes is too short for a zip archive");
  uint64_t end = n - kEndSize;
  while (load_le32(d + end) != 0x06054b50) {
    if (end == 0 || n - kEndSize - end >= 0xffff) {
      fail(ctx, "truncated or corrupt zip archive: no end-of-central-directory record");
    }
    --end;
  }
  uint64_t disk = load_le16(d + end + 4), dir_disk = load_le16(d + end + 6);
  uint64_t entries_here = load_le16(d + end + 8), entries = load_le16(d + end + 10);
  uint64_t dir_size = load_le32(d + end + 12);
  uint64_t dir_offset = load_le32(d + end + 16);
  uint64_t dir_limit = end;
  if (end >= kLocatorSize && load_le32(d + end - kLocatorSize) == 0x07064b50) {
    const uint64_t end64 = load_le64(d + end - kLocatorSize + 8);
    if (end64 > end - kLocatorSize || end - kLocatorSize - end64 < kEnd64Size || load_le32(d + end64) != 0x06064b50) {
      fail(ctx, "corrupt zip archive: bad zip64 end-of-central-directory record");
    }
    disk = load_le32(d + end64 + 16);
    dir_disk = load_le32(d + end64 + 20);
    entries_here = load_le64(d + end64 + 24);
    entries = load_le64(d + end64 + 32);
    dir_size = load_le64(d + end64 + 40);
    dir_offset = load_le64(d + end64 + 48);
    dir_limit = end64;
  }
  // miniz accepts disk numbers 0/0 or 1/1 only.
  if ((disk != dir_disk || disk > 1) || entries_here != entries) fail(ctx, "multi-disk zip archives are not supported");
  uint64_t dir_end = 0;
  if (add_overflows(dir_offset, dir_size, dir_end) || dir_end > dir_limit) {
    fail(ctx, "truncated or corrupt zip archive: central directory lies outside the file");
  }
  if (entries > max_records)
    fail(ctx, "zip archive has " + std::to_string(entries) + " records, more than the tensor limit allows");

  ZipRecords records;
  std::string folder;
  uint64_t q = dir_offset;
  for (uint64_t k = 0; k < entries; ++k) {
    if (dir_end - q < kEntrySize || load_le32(d + q) != 0x02014b50)
      fail(ctx, "corrupt zip archive: bad central directory entry");
    const uint16_t flags = load_le16(d + q + 8);
    const uint16_t method = load_le16(d + q + 10);
    const uint32_t crc = load_le32(d + q + 16);
    uint64_t compressed = load_le32(d + q + 20);
    uint64_t uncompressed = load_le32(d + q + 24);
    const uint64_t name_len = load_le16(d + q + 28), extra_len = load_le16(d + q + 30),
                   comment_len = load_le16(d + q + 32);
    const uint16_t first_disk = load_le16(d + q + 34);
    const uint32_t external_attributes = load_le32(d + q + 38);
    uint64_t local = load_le32(d + q + 42);
    if (dir_end - q - kEntrySize < name_len + extra_len + comment_len)
      fail(ctx, "corrupt zip archive: bad central directory entry");
    const std::string full(reinterpret_cast<const char*>(d + q + kEntrySize), name_len);
    // zip64 sizes and offset replace the 0xffffffff fields, in this order.
    const uint8_t* x = d + q + kEntrySize + name_len;
    for (uint64_t e = 0; e + 4 <= extra_len;) {
      const uint16_t id = load_le16(x + e), len = load_le16(x + e + 2);
      if (e + 4 + len > extra_len) break;
      if (id == 0x0001) {
        uint64_t f = e + 4;
        for (uint64_t* field : {&uncompressed, &compressed, &local}) {
          if (*field != 0xffffffffu) continue;
          if (f + 8 > e + 4 + len) fail(ctx, "corrupt zip archive: short zip64 field for " + quote_name(full));
          *field = load_le64(x + f);
          f += 8;
        }
      }
      e += 4 + len;
    }
    if (first_disk == 0xffff || (first_disk != disk && first_disk != 1))
      fail(ctx, "multi-disk zip archives are not supported");
    if (flags & 1) fail(ctx, "zip record " + quote_name(full) + " is encrypted");
    // miniz "extracts" a directory by returning success without writing the buffer.
    if ((!full.empty() && full.back() == '/') || (external_attributes & 0x10)) {
      fail(ctx, "zip record " + quote_name(full) + " is a directory");
    }
    if (method != 0) {
      fail(ctx, "zip record " + quote_name(full) + " is compressed (method " + std::to_string(method) +
                    "); torch.save stores records uncompressed");
    }
    uint64_t record_end = 0;
    if (compressed != uncompressed || add_overflows(local, kLocalSize + name_len, record_end) ||
        add_overflows(record_end, compressed, record_end) || record_end > dir_offset) {
      fail(ctx, "truncated or corrupt zip archive: record " + quote_name(full) +
                    " does not fit before the central directory");
    }
    // All records live in one folder, named by the first, which is where PyTorchStreamReader looks them up.
    const size_t slash = full.find('/');
    if (slash == std::string::npos) fail(ctx, "zip record " + quote_name(full) + " is not inside an archive folder");
    if (k == 0) folder = full.substr(0, slash + 1);
    if (full.compare(0, folder.size(), folder) != 0) {
      fail(ctx, "zip record " + quote_name(full) + " is outside the archive folder " + quote_name(folder));
    }
    const std::string relative = full.substr(folder.size());
    if (!records.emplace(relative, ZipRecord{uncompressed, crc, local}).second) {
      fail(ctx, "zip archive has two records named " + quote_name(relative));
    }
    q += kEntrySize + name_len + extra_len + comment_len;
  }
  return records;
}

// PyTorchStreamReader's constructor reads and parses the version record, and when that fails it throws
// without releasing miniz's state: a leak per damaged file. So the record is checked here first.
void check_version_record(const std::string& name, const uint8_t* d, uint64_t n, const ZipRecords& records) {
  const std::string ctx = name + ": ";
  const std::string record = records.count(".data/version") ? ".data/version" : "version";
  auto it = records.find(record);
  if (it == records.end()) fail(ctx, "zip archive has no version record: not a torch.save checkpoint");
  const ZipRecord& r = it->second;
  constexpr uint64_t kLocalSize = 30;
  if (n < kLocalSize || r.local_header > n - kLocalSize || load_le32(d + r.local_header) != 0x04034b50) {
    fail(ctx, "corrupt zip archive: bad local header for " + quote_name(record));
  }
  const uint64_t data =
      r.local_header + kLocalSize + load_le16(d + r.local_header + 26) + load_le16(d + r.local_header + 28);
  if (data > n || r.size > n - data)
    fail(ctx, "truncated or corrupt zip archive: record " + quote_name(record) + " lies outside the file");
  if (r.size > 32) fail(ctx, "invalid zip archive version record");
  check_crc(name, record, records, d + data, r.size);
  const std::string text(reinterpret_cast<const char*>(d + data), r.size);
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
  const ZipRecords records = scan_zip(name, data, bytes.size(), static_cast<uint64_t>(limits.max_tensors) + 64);
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
  check_version_record(name, data, bytes.size(), records);

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

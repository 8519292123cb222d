#include "zip_archive.h"

#include <zlib.h>

#include "patchcore/core/bytes.h"
#include "patchcore/core/error.h"

namespace patchcore::zip {
namespace {

[[noreturn]] void fail(const std::string& context, const std::string& what) { throw ZipError(context + what); }

bool add_overflows(uint64_t a, uint64_t b, uint64_t& out) { return __builtin_add_overflow(a, b, &out); }

}  // namespace

void check_crc(const std::string& name, const std::string& record_name, const Record& record, const void* bytes,
               uint64_t length) {
  if (crc32_z(0, static_cast<const Bytef*>(bytes), static_cast<size_t>(length)) != record.crc)
    fail(name + ": ", "zip record " + quote_name(record_name) + " is corrupt (CRC-32 mismatch)");
}

// The central directory is found the way miniz finds it; torch.save and np.savez only write stored records, and
// miniz would allocate a deflated record's declared size, however large, before inflating it.
std::map<std::string, Record> stored_records(const std::string& name, const uint8_t* d, uint64_t n,
                                             uint64_t max_records) {
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
    fail(ctx, "zip archive has " + std::to_string(entries) + " records, more than the limit of " +
                  std::to_string(max_records));

  std::map<std::string, Record> records;
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
                    "); only stored records are read");
    }
    uint64_t record_end = 0;
    if (compressed != uncompressed || add_overflows(local, kLocalSize + name_len, record_end) ||
        add_overflows(record_end, compressed, record_end) || record_end > dir_offset) {
      fail(ctx, "truncated or corrupt zip archive: record " + quote_name(full) +
                    " does not fit before the central directory");
    }
    if (!records.emplace(full, Record{uncompressed, crc, local}).second)
      fail(ctx, "zip archive has two records named " + quote_name(full));
    q += kEntrySize + name_len + extra_len + comment_len;
  }
  return records;
}

std::string_view record_bytes(const std::string& name, const uint8_t* d, uint64_t n, const std::string& record_name,
                              const Record& r) {
  const std::string ctx = name + ": ";
  constexpr uint64_t kLocalSize = 30;
  if (n < kLocalSize || r.local_header > n - kLocalSize || load_le32(d + r.local_header) != 0x04034b50)
    fail(ctx, "corrupt zip archive: bad local header for " + quote_name(record_name));
  const uint64_t data =
      r.local_header + kLocalSize + load_le16(d + r.local_header + 26) + load_le16(d + r.local_header + 28);
  if (data > n || r.size > n - data)
    fail(ctx, "truncated or corrupt zip archive: record " + quote_name(record_name) + " lies outside the file");
  check_crc(name, record_name, r, d + data, r.size);
  return {reinterpret_cast<const char*>(d + data), static_cast<size_t>(r.size)};
}

}  // namespace patchcore::zip

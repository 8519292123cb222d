#pragma once
// The stored (uncompressed) records of a zip archive held in memory, every size and offset checked against the
// bytes present before anything is read: torch.save's checkpoints and NumPy's .npz files. Private to io.
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <string_view>

namespace patchcore::zip {

// A damaged or unsupported archive; the message starts with the archive's name.
class ZipError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Record {
  uint64_t size;
  uint32_t crc;
  uint64_t local_header;
};

// The records by full name, found through the central directory the way miniz finds it (last end record, zip64
// locator just before it). Refuses compressed, encrypted, directory and multi-disk records, and more than
// `max_records` of them. `name` begins every message.
std::map<std::string, Record> stored_records(const std::string& name, const uint8_t* data, uint64_t size,
                                             uint64_t max_records);

// A record's bytes, located through its local header and checked against its CRC-32.
std::string_view record_bytes(const std::string& name, const uint8_t* data, uint64_t size,
                              const std::string& record_name, const Record& record);

// Throws unless `bytes` match the record's CRC-32: a flipped bit would otherwise load as a silently different
// value.
void check_crc(const std::string& name, const std::string& record_name, const Record& record, const void* bytes,
               uint64_t length);

}  // namespace patchcore::zip

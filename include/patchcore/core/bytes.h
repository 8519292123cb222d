#pragma once
// Fixed-width integers read from byte buffers, for the file formats parsed by hand (checkpoints, image headers).
#include <cstdint>

namespace patchcore {

inline uint16_t load_le16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
inline uint32_t load_le32(const uint8_t* p) {
  return static_cast<uint32_t>(load_le16(p)) | (static_cast<uint32_t>(load_le16(p + 2)) << 16);
}
inline uint64_t load_le64(const uint8_t* p) {
  return static_cast<uint64_t>(load_le32(p)) | (static_cast<uint64_t>(load_le32(p + 4)) << 32);
}
inline uint16_t load_be16(const uint8_t* p) { return static_cast<uint16_t>((p[0] << 8) | p[1]); }
inline uint32_t load_be32(const uint8_t* p) {
  return (static_cast<uint32_t>(load_be16(p)) << 16) | static_cast<uint32_t>(load_be16(p + 2));
}

}  // namespace patchcore

#include "patchcore/io/npy.h"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "patchcore/core/error.h"
#include "patchcore/core/file.h"
#include "zip_archive.h"

namespace patchcore {
namespace {

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw std::runtime_error(path + ": not a valid .npy file: " + what);
}

size_t dtype_size(const std::string& dtype) {
  if (dtype == "f4" || dtype == "i4") return 4;
  if (dtype == "f8" || dtype == "i8") return 8;
  if (dtype == "u2") return 2;
  if (dtype == "u1" || dtype == "b1") return 1;
  return 0;
}

// Extracts the value text of `key` from the header dict literal, e.g. 'descr': '<f4'.
std::string header_value(const std::string& header, const std::string& key, const std::string& path) {
  auto pos = header.find("'" + key + "'");
  if (pos == std::string::npos) fail(path, "header has no '" + key + "'");
  pos = header.find(':', pos);
  if (pos == std::string::npos) fail(path, "header entry '" + key + "' has no value");
  ++pos;
  while (pos < header.size() && header[pos] == ' ') ++pos;
  if (pos >= header.size()) fail(path, "header entry '" + key + "' has no value");
  char open = header[pos];
  char close = open == '\'' ? '\'' : open == '(' ? ')' : ',';
  auto end = header.find(close, pos + 1);
  if (end == std::string::npos) fail(path, "header entry '" + key + "' is not terminated");
  return header.substr(open == '\'' || open == '(' ? pos + 1 : pos, end - pos - (open == '\'' || open == '(' ? 1 : 0));
}

// Every element, stored as Stored, converted to Out.
template <typename Out, typename Stored>
std::vector<Out> elements_as(const NpyArray& a) {
  std::vector<Out> out(static_cast<size_t>(a.numel()));
  for (size_t i = 0; i < out.size(); ++i) {
    Stored v;
    std::memcpy(&v, a.data.data() + i * sizeof(Stored), sizeof(Stored));
    out[i] = static_cast<Out>(v);
  }
  return out;
}

template <typename Out>
std::vector<Out> convert(const NpyArray& a) {
  if (a.dtype == "f4") return elements_as<Out, float>(a);
  if (a.dtype == "f8") return elements_as<Out, double>(a);
  if (a.dtype == "i8") return elements_as<Out, int64_t>(a);
  if (a.dtype == "i4") return elements_as<Out, int32_t>(a);
  if (a.dtype == "u2") return elements_as<Out, uint16_t>(a);
  return elements_as<Out, uint8_t>(a);  // u1, b1
}

}  // namespace

int64_t NpyArray::numel() const {
  int64_t n = 1;
  for (auto s : shape) n *= s;
  return n;
}

size_t NpyArray::item_size() const { return dtype_size(dtype); }
std::vector<float> NpyArray::as_float() const { return convert<float>(*this); }
std::vector<double> NpyArray::as_double() const { return convert<double>(*this); }
std::vector<int64_t> NpyArray::as_int64() const { return convert<int64_t>(*this); }

namespace {

// One .npy file's bytes; `path` names it in messages.
NpyArray parse_npy(std::string_view bytes, const std::string& path) {
  if (bytes.size() < 10 || std::memcmp(bytes.data(), "\x93NUMPY", 6) != 0) fail(path, "bad magic");
  const int major = static_cast<uint8_t>(bytes[6]);
  size_t header_len = 0, offset = 0;
  if (major == 1) {
    header_len = static_cast<uint8_t>(bytes[8]) | (static_cast<size_t>(static_cast<uint8_t>(bytes[9])) << 8);
    offset = 10;
  } else if (major == 2 || major == 3) {
    if (bytes.size() < 12) fail(path, "truncated header");
    uint32_t len;
    std::memcpy(&len, bytes.data() + 8, 4);
    header_len = len;
    offset = 12;
  } else {
    fail(path, "unsupported format version " + std::to_string(major));
  }
  if (offset + header_len > bytes.size()) fail(path, "truncated header");
  const std::string header(bytes.substr(offset, header_len));
  offset += header_len;

  NpyArray a;
  std::string descr = header_value(header, "descr", path);
  if (descr.size() < 2 || (descr[0] != '<' && descr[0] != '|')) fail(path, "unsupported dtype '" + descr + "'");
  a.dtype = descr.substr(1);
  if (dtype_size(a.dtype) == 0) fail(path, "unsupported dtype '" + descr + "'");
  if (header_value(header, "fortran_order", path).find("False") == std::string::npos)
    fail(path, "Fortran order is not supported");
  std::stringstream dims(header_value(header, "shape", path));
  std::string dim;
  while (std::getline(dims, dim, ',')) {
    if (dim.find_first_not_of(' ') == std::string::npos) continue;
    try {
      int64_t v = std::stoll(dim);
      if (v < 0) fail(path, "negative dimension");
      a.shape.push_back(v);
    } catch (const std::logic_error&) {
      fail(path, "bad shape entry '" + dim + "'");
    }
  }
  const size_t expected = static_cast<size_t>(a.numel()) * a.item_size();
  if (bytes.size() - offset != expected)
    fail(path, "data has " + std::to_string(bytes.size() - offset) + " bytes, shape needs " + std::to_string(expected));
  a.data.assign(bytes.begin() + static_cast<std::ptrdiff_t>(offset), bytes.end());
  return a;
}

}  // namespace

NpyArray read_npy(const std::string& path) { return parse_npy(read_file(path), path); }

std::map<std::string, NpyArray> read_npz(const std::string& path, const std::vector<std::string>& keys) {
  const std::string bytes = read_file(path);
  const auto* data = reinterpret_cast<const uint8_t*>(bytes.data());
  std::map<std::string, NpyArray> arrays;
  try {
    for (const auto& [name, record] : zip::stored_records(path, data, bytes.size(), 4096)) {
      if (name.size() < 5 || name.compare(name.size() - 4, 4, ".npy") != 0)
        throw std::runtime_error(path + ": not a NumPy .npz archive: record " + quote_name(name) + " is not a .npy");
      const std::string key = name.substr(0, name.size() - 4);
      if (!keys.empty() && std::find(keys.begin(), keys.end(), key) == keys.end()) continue;
      arrays.emplace(key, parse_npy(zip::record_bytes(path, data, bytes.size(), name, record), path + "[" + name + "]"));
    }
    for (const std::string& key : keys)
      if (!arrays.count(key)) throw std::runtime_error(path + ": has no array '" + key + "'");
  } catch (const zip::ZipError& e) {
    throw std::runtime_error(e.what());
  }
  return arrays;
}

std::string encode_npy(const NpyArray& a) {
  std::string shape;
  for (size_t i = 0; i < a.shape.size(); ++i) shape += (i ? ", " : "") + std::to_string(a.shape[i]);
  if (a.shape.size() == 1) shape += ",";
  const char order = (a.dtype == "u1" || a.dtype == "b1") ? '|' : '<';
  std::string header =
      "{'descr': '" + std::string(1, order) + a.dtype + "', 'fortran_order': False, 'shape': (" + shape + "), }";
  // The total header is padded with spaces to a multiple of 64 bytes and ends in a newline.
  const size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header.push_back('\n');
  const uint16_t len = static_cast<uint16_t>(header.size());
  std::string bytes("\x93NUMPY\x01\x00", 8);
  bytes.push_back(static_cast<char>(len & 0xff));
  bytes.push_back(static_cast<char>(len >> 8));
  bytes += header;
  bytes.append(reinterpret_cast<const char*>(a.data.data()), a.data.size());
  return bytes;
}

void write_npy(const std::string& path, const NpyArray& a) { write_file_atomically(path, encode_npy(a)); }

NpyArray float_array(const float* data, const std::vector<int64_t>& shape) {
  NpyArray a;
  a.dtype = "f4";
  a.shape = shape;
  a.data.resize(static_cast<size_t>(a.numel()) * 4);
  std::memcpy(a.data.data(), data, a.data.size());
  return a;
}

void write_npy(const std::string& path, const float* data, const std::vector<int64_t>& shape) {
  write_npy(path, float_array(data, shape));
}

}  // namespace patchcore

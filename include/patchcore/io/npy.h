#pragma once
// NumPy .npy files (format 1.0/2.0, little-endian, C order): the exchange format for golden
// fixtures written by python3-numpy and for the raw anomaly maps that `patchcore predict` writes.
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace patchcore {

struct NpyArray {
  std::string dtype;  // NumPy descr without byte order: "f4", "f8", "i8", "i4", "u1", "b1", "u2"
  std::vector<int64_t> shape;
  std::vector<uint8_t> data;  // raw little-endian element bytes, C order

  int64_t numel() const;
  size_t item_size() const;
  // Element values converted to the requested type; throws if the stored dtype is not numeric.
  std::vector<float> as_float() const;
  std::vector<double> as_double() const;
  std::vector<int64_t> as_int64() const;
};

// Throws std::runtime_error naming the file and the problem (bad magic, unsupported dtype,
// Fortran order, size that does not match the header).
NpyArray read_npy(const std::string& path);
// The arrays of a NumPy .npz archive as np.savez writes it (stored records <key>.npy), by key: those named in
// `keys`, or every array when `keys` is empty. Throws std::runtime_error naming the file, and the record, when the
// archive or a requested array is damaged or a requested key is missing.
std::map<std::string, NpyArray> read_npz(const std::string& path, const std::vector<std::string>& keys = {});

// A float32 array of `shape` from C-ordered values.
NpyArray float_array(const float* data, const std::vector<int64_t>& shape);
// The bytes of a .npy file (format 1.0) holding `array`.
std::string encode_npy(const NpyArray& array);
// Written to a temporary file in the same folder and renamed, so a reader never sees half a file.
void write_npy(const std::string& path, const float* data, const std::vector<int64_t>& shape);
void write_npy(const std::string& path, const NpyArray& array);

}  // namespace patchcore

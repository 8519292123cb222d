#pragma once
// Training features on their way to the coreset. fit appends every batch's patch embeddings here and keeps
// only the sampler's summary of them in memory, then reads back the rows the sampler selected. The rows wait in
// memory or, where they would not fit there, in a scratch file, so a training set whose features exceed RAM can be
// fitted.
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace patchcore {

class FeatureStore {
 public:
  // Rows of `dim` float32 values in an unnamed file in `directory` (the system's temporary directory when
  // empty). The file has no name, so nothing is left behind however the process ends. Throws
  // std::runtime_error naming the directory when it cannot be created there.
  explicit FeatureStore(int64_t dim, const std::string& directory = "");
  // Rows of `dim` float32 values in memory: an anonymous memory file (memfd_create), which no disk backs but swap.
  // Filling it costs a fraction of what a file system's page cache does on some machines (docs/memory.md).
  static std::unique_ptr<FeatureStore> in_memory(int64_t dim);
  ~FeatureStore();
  FeatureStore(const FeatureStore&) = delete;
  FeatureStore& operator=(const FeatureStore&) = delete;

  // Claims the disk space of `rows` rows in total now, so that a full disk is reported before the long work
  // that would fill it rather than after. Rows in memory claim nothing ahead: fit holds them there only when they
  // fit.
  void reserve(int64_t rows);
  // Appends [n, dim] float32 CPU rows. Throws std::invalid_argument for another shape or dtype and
  // std::runtime_error naming the directory when the write fails (a full disk, say).
  void append(const at::Tensor& rows);
  // The rows at `indices` (each in [0, rows())), in that order: [indices.size(), dim] float32.
  at::Tensor gather(const std::vector<int64_t>& indices) const;

  int64_t rows() const { return rows_; }
  int64_t dim() const { return dim_; }
  // The scratch file's directory; empty for rows in memory.
  const std::string& directory() const { return directory_; }

 private:
  FeatureStore(int fd, int64_t dim);
  // How errors name the store: its directory, or "memory".
  std::string where() const;

  int fd_ = -1;
  int64_t dim_;
  int64_t rows_ = 0;
  std::string directory_;
};

}  // namespace patchcore

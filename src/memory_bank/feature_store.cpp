#include "patchcore/memory_bank/feature_store.h"

#include <ATen/ATen.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <limits>
#include <numeric>
#include <stdexcept>

namespace patchcore {
namespace {

constexpr int64_t kGatherRunRows = 256;  // rows read per pread when selected rows are consecutive

std::string system_error(const std::string& what, int error) { return what + ": " + std::strerror(error); }

}  // namespace

FeatureStore::FeatureStore(int64_t dim, const std::string& directory) : FeatureStore(-1, dim) {
  directory_ = directory.empty() ? std::filesystem::temp_directory_path().string() : directory;
  fd_ = ::open(directory_.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
  if (fd_ < 0 && (errno == EOPNOTSUPP || errno == EISDIR || errno == EINVAL)) {
    // File systems without O_TMPFILE: a named file, unlinked at once, is unnamed from then on.
    std::string path = (std::filesystem::path(directory_) / "patchcore-features-XXXXXX").string();
    fd_ = ::mkostemp(path.data(), O_CLOEXEC);
    if (fd_ >= 0) ::unlink(path.c_str());
  }
  if (fd_ < 0)
    throw std::runtime_error(
        system_error(directory_ + ": cannot create a scratch file for the training features", errno));
}

FeatureStore::FeatureStore(int fd, int64_t dim) : fd_(fd), dim_(dim) {
  if (dim < 1) {
    if (fd >= 0) ::close(fd);
    throw std::invalid_argument("FeatureStore: dim must be >= 1, got " + std::to_string(dim));
  }
}

std::unique_ptr<FeatureStore> FeatureStore::in_memory(int64_t dim) {
  const int fd = ::memfd_create("patchcore-features", MFD_CLOEXEC);
  if (fd < 0) throw std::runtime_error(system_error("cannot hold the training features in memory", errno));
  return std::unique_ptr<FeatureStore>(new FeatureStore(fd, dim));
}

FeatureStore::~FeatureStore() {
  if (fd_ >= 0) ::close(fd_);
}

std::string FeatureStore::where() const { return directory_.empty() ? "memory" : directory_; }

void FeatureStore::reserve(int64_t rows) {
  if (rows <= rows_ || directory_.empty()) return;
  const int64_t row_bytes = dim_ * static_cast<int64_t>(sizeof(float));
  if (rows > std::numeric_limits<int64_t>::max() / row_bytes)
    throw std::runtime_error(directory_ + ": cannot reserve scratch space for " + std::to_string(rows) +
                             " training patches: more bytes than a file can hold");
  const int error = ::posix_fallocate(fd_, 0, rows * row_bytes);
  if (error == EOPNOTSUPP || error == EINVAL) return;  // nothing to claim with; writes still report a full disk
  if (error != 0)
    throw std::runtime_error(system_error(directory_ + ": cannot reserve " + std::to_string(rows * row_bytes >> 20) +
                                              " MiB of scratch space for " + std::to_string(rows) +
                                              " training patches (choose another scratch directory)",
                                          error));
}

void FeatureStore::append(const at::Tensor& rows) {
  if (!rows.defined() || rows.dim() != 2 || rows.size(1) != dim_ || rows.scalar_type() != at::kFloat ||
      !rows.device().is_cpu())
    throw std::invalid_argument("FeatureStore::append: rows must be [n, " + std::to_string(dim_) + "] float32 CPU");
  const at::Tensor data = rows.contiguous();
  const char* bytes = static_cast<const char*>(data.data_ptr());
  const int64_t total = data.numel() * static_cast<int64_t>(sizeof(float));
  const int64_t offset = rows_ * dim_ * static_cast<int64_t>(sizeof(float));
  for (int64_t written = 0; written < total;) {
    const ssize_t n = ::pwrite(fd_, bytes + written, static_cast<size_t>(total - written), offset + written);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0)
      throw std::runtime_error(system_error(where() + ": writing training features failed", n < 0 ? errno : EIO));
    written += n;
  }
  rows_ += data.size(0);
}

at::Tensor FeatureStore::gather(const std::vector<int64_t>& indices) const {
  for (int64_t i : indices)
    if (i < 0 || i >= rows_)
      throw std::out_of_range("FeatureStore::gather: row " + std::to_string(i) + " is outside the " +
                              std::to_string(rows_) + " stored rows");
  // Read in file order, in runs of consecutive rows, and put each row where it was asked for.
  std::vector<int64_t> order(indices.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return indices[a] < indices[b]; });
  at::Tensor out = at::empty({static_cast<int64_t>(indices.size()), dim_}, at::kFloat);
  float* dst = out.data_ptr<float>();
  const size_t row_bytes = static_cast<size_t>(dim_) * sizeof(float);
  std::vector<float> run(static_cast<size_t>(kGatherRunRows * dim_));
  for (size_t q = 0; q < order.size();) {
    const int64_t first = indices[order[q]];
    size_t end = q + 1;
    int64_t last = first;
    while (end < order.size() && indices[order[end]] <= last + 1 && indices[order[end]] - first < kGatherRunRows)
      last = indices[order[end++]];
    const size_t want = static_cast<size_t>(last - first + 1) * row_bytes;
    const off_t offset = static_cast<off_t>(first * dim_ * static_cast<int64_t>(sizeof(float)));
    for (size_t got = 0; got < want;) {
      const ssize_t n = ::pread(fd_, reinterpret_cast<char*>(run.data()) + got, want - got, offset + got);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0)
        throw std::runtime_error(
            system_error(where() + ": reading training features back failed", n < 0 ? errno : EIO));
      got += static_cast<size_t>(n);
    }
    for (; q < end; ++q) std::memcpy(dst + order[q] * dim_, run.data() + (indices[order[q]] - first) * dim_, row_bytes);
  }
  return out;
}

}  // namespace patchcore

#include "faiss_index_file.h"

#include <faiss/Index.h>
#include <faiss/impl/FaissException.h>
#include <faiss/index_io.h>

#include <cctype>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <new>
#include <stdexcept>
#include <utility>
#include <vector>

#include "patchcore/core/file.h"

namespace patchcore {
namespace {

// FAISS sizes its buffers from the counts in a file's header before reading them, so a damaged header can
// make it allocate terabytes, and it trusts the counts that later tell it where codes and ids lie. For the
// kinds we read (the flat indexes and the IVF-PQ, ours and the reference's) every count is checked against the
// bytes the file has left and against the others before FAISS reads the file; other kinds are refused.
class IndexFileCheck {
 public:
  explicit IndexFileCheck(const std::string& filename)
      : filename_(filename), in_(filename, std::ios::binary), size_(std::filesystem::file_size(filename)) {}

  template <typename T>
  T read() {
    T value{};
    in_.read(reinterpret_cast<char*>(&value), sizeof value);
    if (!in_) fail("truncated header");
    return value;
  }
  std::string fourcc() {
    char code[4] = {};
    in_.read(code, 4);
    return in_ ? std::string(code, 4) : std::string();
  }
  uint64_t left() { return size_ - static_cast<uint64_t>(in_.tellg()); }
  // Skips `count` items of `item` bytes, which must all lie in the file.
  void skip(uint64_t count, uint64_t item, const std::string& what) {
    if (count > left() / item) fail(what + " declares " + std::to_string(count) + " items, more than the file holds");
    in_.seekg(static_cast<std::streamoff>(count * item), std::ios::cur);
  }
  [[noreturn]] void fail(const std::string& problem) const {
    throw std::runtime_error(filename_ + ": not a readable FAISS index: " + problem);
  }

  // Layout: int32 d, int64 ntotal, two int64 unused, uint8 is_trained, int32 metric, [float if metric > 1].
  // Every index the scorers write, and the published code's, is trained and measures squared L2 (metric 1); FAISS
  // searches another metric code, or an untrained index, through state it never set up.
  std::pair<int32_t, int64_t> index_header() {
    const auto d = read<int32_t>();
    const auto ntotal = read<int64_t>();
    read<int64_t>(), read<int64_t>();
    const auto trained = read<uint8_t>();
    const auto metric = read<int32_t>();
    if (metric > 1) read<float>();
    if (d < 1 || ntotal < 0) fail("dimension " + std::to_string(d) + ", " + std::to_string(ntotal) + " vectors");
    if (metric != 1) fail("metric " + std::to_string(metric) + " is not squared L2 (1)");
    if (trained != 1) fail("the index is not trained");
    return {d, ntotal};
  }
  // A flat index after its fourcc: the header, then uint64 n and n floats, exactly ntotal x d of them.
  std::pair<int32_t, int64_t> flat_index() {
    const auto [d, ntotal] = index_header();
    const auto count = read<uint64_t>();
    if (count % static_cast<uint64_t>(d) != 0 || count / static_cast<uint64_t>(d) != static_cast<uint64_t>(ntotal))
      fail("the header declares " + std::to_string(ntotal) + " vectors of dimension " + std::to_string(d) + " but " +
           std::to_string(count) + " floats");
    skip(count, sizeof(float), "the vector data");
    return {d, ntotal};
  }
  // IndexIVFPQ after its fourcc, as FAISS 1.7 writes it: IVF header (index header, nlist, nprobe, flat
  // quantizer, direct map), by_residual, code_size, product quantizer (d, M, nbits, centroids), inverted lists.
  void ivfpq_index() {
    const auto [d, ntotal] = index_header();
    const auto nlist = read<uint64_t>();
    read<uint64_t>();  // nprobe
    const std::string quantizer = fourcc();
    if (quantizer != "IxF2" && quantizer != "IxFl") fail("the coarse quantizer is not a flat index");
    const auto [quantizer_d, centroids] = flat_index();
    if (quantizer_d != d || nlist < 1 || static_cast<uint64_t>(centroids) != nlist)
      fail("the coarse quantizer does not hold one centroid of dimension " + std::to_string(d) + " per list");
    const auto direct_map = read<char>();
    skip(read<uint64_t>(), sizeof(int64_t), "the direct map");
    if (direct_map == 2) skip(read<uint64_t>(), 2 * sizeof(int64_t), "the direct map");
    read<uint8_t>();  // by_residual
    const auto code_size = read<uint64_t>();
    const auto pq_d = read<uint64_t>(), m = read<uint64_t>(), nbits = read<uint64_t>();
    if (pq_d != static_cast<uint64_t>(d) || m < 1 || pq_d % m != 0 || nbits < 1 || nbits > 16 ||
        code_size != (m * nbits + 7) / 8)
      fail("the product quantizer (d " + std::to_string(pq_d) + ", M " + std::to_string(m) + ", nbits " +
           std::to_string(nbits) + ", code size " + std::to_string(code_size) + ") does not fit the index");
    if (read<uint64_t>() != pq_d << nbits) fail("the product quantizer's centroids do not match its size");
    skip(pq_d << nbits, sizeof(float), "the product quantizer's centroids");
    if (fourcc() != "ilar" || read<uint64_t>() != nlist || read<uint64_t>() != code_size)
      fail("the inverted lists do not match the index");
    std::vector<uint64_t> sizes(nlist, 0);
    const std::string list_type = fourcc();
    const auto count = read<uint64_t>();
    if (count > left() / sizeof(uint64_t)) fail("the inverted list sizes run past the end of the file");
    if (list_type == "full" && count == nlist) {
      for (auto& n : sizes) n = read<uint64_t>();
    } else if (list_type == "sprs" && count % 2 == 0) {
      for (uint64_t j = 0; j < count; j += 2) {
        const auto list = read<uint64_t>();
        if (list >= nlist) fail("an inverted list number is out of range");
        sizes[list] = read<uint64_t>();
      }
    } else {
      fail("the inverted list sizes are malformed");
    }
    uint64_t vectors = 0;
    for (uint64_t n : sizes) {
      skip(n, code_size + sizeof(int64_t), "an inverted list");
      vectors += n;
    }
    if (vectors != static_cast<uint64_t>(ntotal))
      fail("the inverted lists hold " + std::to_string(vectors) + " vectors, the header " + std::to_string(ntotal));
  }

 private:
  std::string filename_;
  std::ifstream in_;
  uint64_t size_;
};

void check_index_file(const std::string& filename) {
  IndexFileCheck file(filename);
  const std::string kind = file.fourcc();
  if (kind == "IxF2" || kind == "IxFI" || kind == "IxFl") {
    file.flat_index();
  } else if (kind == "IwPQ") {
    file.ivfpq_index();
  } else {
    // Neither FaissNN nor ApproximateFaissNN builds any other kind, so FAISS need not read one.
    std::string shown;
    for (char c : kind) shown += std::isprint(static_cast<unsigned char>(c)) ? c : '?';
    file.fail("index kind '" + shown + "' is neither flat nor IVF-PQ");
  }
  if (file.left() != 0) file.fail("the file continues past the end of the index");
}

}  // namespace

std::unique_ptr<faiss::Index> read_index_file(const std::string& filename) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(filename, ec)) throw std::runtime_error(filename + ": no such index file");
  check_index_file(filename);
  try {
    return std::unique_ptr<faiss::Index>(faiss::read_index(filename.c_str()));
  } catch (const faiss::FaissException& e) {
    // FAISS messages carry source locations; the first line is what a user needs.
    const std::string what = e.what();
    throw std::runtime_error(filename + ": not a readable FAISS index: " + what.substr(0, what.find('\n')));
  } catch (const std::bad_alloc&) {
    throw std::runtime_error(filename + ": not a readable FAISS index: it declares more data than fits in memory");
  }
}

void write_index_file(const faiss::Index& index, const std::string& filename) {
  write_file_atomically(filename, [&](const std::string& tmp) {
    try {
      faiss::write_index(&index, tmp.c_str());
    } catch (const faiss::FaissException& e) {
      throw std::runtime_error(filename + ": cannot write FAISS index: " + e.what());
    }
  });
}

}  // namespace patchcore

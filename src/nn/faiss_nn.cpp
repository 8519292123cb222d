#include "patchcore/nn/faiss_nn.h"

#include <faiss/IndexFlat.h>
#include <faiss/IndexIVFPQ.h>
#include <faiss/impl/FaissException.h>
#include <faiss/index_io.h>
#include <omp.h>

#include <cctype>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "patchcore/core/file.h"

#if __has_include(<faiss/gpu/StandardGpuResources.h>)
#include <faiss/gpu/GpuCloner.h>
#include <faiss/gpu/StandardGpuResources.h>
#define PATCHCORE_FAISS_GPU 1
#endif

namespace patchcore {

struct FaissNN::GpuResources {
#ifdef PATCHCORE_FAISS_GPU
  faiss::gpu::StandardGpuResources resources;
#endif
};

namespace {

constexpr int kCoarseCentroids = 512;
constexpr int kSubQuantizers = 64;
constexpr int kBitsPerCode = 8;

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
  std::pair<int32_t, int64_t> index_header() {
    const auto d = read<int32_t>();
    const auto ntotal = read<int64_t>();
    read<int64_t>(), read<int64_t>(), read<uint8_t>();
    if (read<int32_t>() > 1) read<float>();
    if (d < 1 || ntotal < 0) fail("dimension " + std::to_string(d) + ", " + std::to_string(ntotal) + " vectors");
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

torch::Tensor as_float_rows(const torch::Tensor& t, const char* what) {
  if (!t.defined() || t.dim() != 2) throw std::invalid_argument(std::string(what) + " must be a 2-D [N, D] tensor");
  if (t.size(0) == 0) throw std::invalid_argument(std::string(what) + " is empty");
  if (t.size(1) == 0) throw std::invalid_argument(std::string(what) + " has zero columns");
  return t.to(torch::kCPU, torch::kFloat32).contiguous();
}

}  // namespace

FaissNN::FaissNN(bool on_gpu, int num_workers) : on_gpu_(on_gpu), num_workers_(num_workers) {
  if (num_workers < 1) throw std::invalid_argument("FaissNN: num_workers must be at least 1");
#ifdef PATCHCORE_FAISS_GPU
  if (on_gpu_) gpu_ = std::make_shared<GpuResources>();
#else
  if (on_gpu_) throw std::invalid_argument("FaissNN(on_gpu=true): this FAISS build has no GPU support");
#endif
}

FaissNN::~FaissNN() = default;

std::unique_ptr<faiss::Index> FaissNN::create_index(int64_t dimension) const {
  return std::make_unique<faiss::IndexFlatL2>(dimension);
}

void FaissNN::train(faiss::Index&, const torch::Tensor&) const {}

bool FaissNN::accepts(const faiss::Index& index) const {
  return dynamic_cast<const faiss::IndexFlatL2*>(&index) != nullptr;
}

std::unique_ptr<faiss::Index> ApproximateFaissNN::create_index(int64_t dimension) const {
  if (dimension % kSubQuantizers != 0)
    throw std::invalid_argument("ApproximateFaissNN: feature dimension " + std::to_string(dimension) +
                                " is not divisible by " + std::to_string(kSubQuantizers) + " sub-quantizers");
  // The quantizer is owned by the IVF index (own_fields) so both go away together.
  auto quantizer = new faiss::IndexFlatL2(dimension);
  auto index =
      std::make_unique<faiss::IndexIVFPQ>(quantizer, dimension, kCoarseCentroids, kSubQuantizers, kBitsPerCode);
  index->own_fields = true;
  return index;
}

void ApproximateFaissNN::train(faiss::Index& index, const torch::Tensor& features) const {
  if (features.size(0) < kCoarseCentroids)
    throw std::invalid_argument("ApproximateFaissNN: needs at least " + std::to_string(kCoarseCentroids) +
                                " training rows for its coarse quantizer, got " + std::to_string(features.size(0)));
  index.train(features.size(0), features.data_ptr<float>());
}

bool ApproximateFaissNN::accepts(const faiss::Index& index) const {
  return dynamic_cast<const faiss::IndexIVFPQ*>(&index) != nullptr;
}

std::unique_ptr<faiss::Index> FaissNN::to_device(std::unique_ptr<faiss::Index> index) const {
#ifdef PATCHCORE_FAISS_GPU
  if (on_gpu_) {
    faiss::gpu::GpuClonerOptions options;
    options.useFloat16 = true;
    return std::unique_ptr<faiss::Index>(faiss::gpu::index_cpu_to_gpu(&gpu_->resources, 0, index.get(), &options));
  }
#endif
  return index;
}

std::unique_ptr<faiss::Index> FaissNN::build(const torch::Tensor& features) const {
  const torch::Tensor rows = as_float_rows(features, "features");
  omp_set_num_threads(num_workers_);
  try {
    auto index = create_index(rows.size(1));
    train(*index, rows);
    index = to_device(std::move(index));
    index->add(rows.size(0), rows.data_ptr<float>());
    return index;
  } catch (const faiss::FaissException& e) {
    throw std::runtime_error(std::string(kind()) + ": FAISS failed to build the index: " + e.what());
  }
}

void FaissNN::fit(const torch::Tensor& features) { install(build(features)); }

void FaissNN::install(std::unique_ptr<faiss::Index> index) {
  search_index_ = std::move(index);
  try {
    index_changed();
  } catch (...) {
    // A subclass that cannot use the index must not be left half fitted.
    search_index_.reset();
    index_changed();
    throw;
  }
}

std::pair<torch::Tensor, torch::Tensor> FaissNN::run(int64_t k, const torch::Tensor& query_features,
                                                     const torch::Tensor& index_features) const {
  std::unique_ptr<faiss::Index> temporary;
  const faiss::Index* index = search_index_.get();
  if (index_features.defined()) {
    temporary = build(index_features);
    index = temporary.get();
  }
  if (!index) throw std::logic_error(std::string(kind()) + ": run() before fit() or load()");
  const torch::Tensor queries = checked_queries(k, query_features, index->ntotal, index->d);
  auto distances = torch::empty({queries.size(0), k}, torch::kFloat32);
  auto indices = torch::empty({queries.size(0), k}, torch::kInt64);
  static_assert(sizeof(faiss::Index::idx_t) == sizeof(int64_t), "FAISS ids must be 64-bit");
  omp_set_num_threads(num_workers_);
  index->search(queries.size(0), queries.data_ptr<float>(), k, distances.data_ptr<float>(),
                reinterpret_cast<faiss::Index::idx_t*>(indices.data_ptr<int64_t>()));
  return {distances, indices};
}

torch::Tensor FaissNN::checked_queries(int64_t k, const torch::Tensor& query_features, int64_t rows,
                                       int64_t dimension) const {
  const torch::Tensor queries = as_float_rows(query_features, "query features");
  if (queries.size(1) != dimension)
    throw std::invalid_argument(std::string(kind()) + ": query features have dimension " +
                                std::to_string(queries.size(1)) + ", the index has " + std::to_string(dimension));
  if (k < 1) throw std::invalid_argument(std::string(kind()) + ": n_nearest_neighbours must be at least 1");
  if (k > rows)
    throw std::invalid_argument(std::string(kind()) + ": n_nearest_neighbours " + std::to_string(k) +
                                " is larger than the memory bank (" + std::to_string(rows) + " rows)");
  return queries;
}

void FaissNN::save(const std::string& filename) const {
  if (!search_index_) throw std::logic_error(std::string(kind()) + ": save() before fit()");
  std::unique_ptr<faiss::Index> cpu_copy;
  const faiss::Index* index = search_index_.get();
#ifdef PATCHCORE_FAISS_GPU
  if (on_gpu_) {
    cpu_copy.reset(faiss::gpu::index_gpu_to_cpu(index));
    index = cpu_copy.get();
  }
#endif
  write_file_atomically(filename, [&](const std::string& tmp) {
    try {
      faiss::write_index(index, tmp.c_str());
    } catch (const faiss::FaissException& e) {
      throw std::runtime_error(filename + ": cannot write FAISS index: " + e.what());
    }
  });
}

void FaissNN::load(const std::string& filename) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(filename, ec)) throw std::runtime_error(filename + ": no such index file");
  check_index_file(filename);
  std::unique_ptr<faiss::Index> index;
  try {
    index.reset(faiss::read_index(filename.c_str()));
  } catch (const faiss::FaissException& e) {
    // FAISS messages carry source locations; the first line is what a user needs.
    std::string what = e.what();
    throw std::runtime_error(filename + ": not a readable FAISS index: " + what.substr(0, what.find('\n')));
  } catch (const std::bad_alloc&) {
    throw std::runtime_error(filename + ": not a readable FAISS index: it declares more data than fits in memory");
  }
  if (!accepts(*index))
    throw std::runtime_error(filename + ": holds a FAISS index of another kind than " + kind() + " expects");
  install(to_device(std::move(index)));
}

void FaissNN::reset_index() {
  search_index_.reset();
  index_changed();
}

const float* FaissNN::flat_rows() const {
  const auto* flat = dynamic_cast<const faiss::IndexFlat*>(search_index_.get());
  return flat ? flat->get_xb() : nullptr;
}

int64_t FaissNN::size() const { return search_index_ ? search_index_->ntotal : 0; }
int64_t FaissNN::dimension() const { return search_index_ ? search_index_->d : 0; }

}  // namespace patchcore

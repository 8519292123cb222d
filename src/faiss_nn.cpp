#include "patchcore/faiss_nn.h"

#include <faiss/IndexFlat.h>
#include <faiss/IndexIVFPQ.h>
#include <faiss/impl/FaissException.h>
#include <faiss/index_io.h>
#include <omp.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "patchcore/file_util.h"

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
// make it allocate terabytes. For the flat indexes (ours and the reference's) the header says exactly how
// long the file must be; check that before FAISS reads it. Layout: fourcc, int32 d, int64 ntotal, two
// int64 unused, uint8 is_trained, int32 metric, [float metric_arg if metric > 1], uint64 n, float[n].
void check_flat_index_file(const std::string& filename) {
  std::ifstream in(filename, std::ios::binary);
  char fourcc[4] = {};
  in.read(fourcc, 4);
  const std::string kind(fourcc, 4);
  if (!in || (kind != "IxF2" && kind != "IxFI" && kind != "IxFl")) return;  // another kind: FAISS's own checks
  int32_t d = 0, metric = 0;
  int64_t ntotal = 0, unused[2];
  uint8_t is_trained = 0;
  float metric_arg = 0;
  uint64_t count = 0;
  in.read(reinterpret_cast<char*>(&d), sizeof d).read(reinterpret_cast<char*>(&ntotal), sizeof ntotal);
  in.read(reinterpret_cast<char*>(unused), sizeof unused).read(reinterpret_cast<char*>(&is_trained), 1);
  in.read(reinterpret_cast<char*>(&metric), sizeof metric);
  if (metric > 1) in.read(reinterpret_cast<char*>(&metric_arg), sizeof metric_arg);
  in.read(reinterpret_cast<char*>(&count), sizeof count);
  if (!in) throw std::runtime_error(filename + ": not a readable FAISS index: truncated header");
  const uint64_t header = static_cast<uint64_t>(in.tellg());
  const uint64_t size = std::filesystem::file_size(filename);
  if (d < 1 || ntotal < 0 || count % static_cast<uint64_t>(d) != 0 || count / static_cast<uint64_t>(d) != static_cast<uint64_t>(ntotal) ||
      count > (size - header) / sizeof(float) || header + count * sizeof(float) != size)
    throw std::runtime_error(filename + ": not a readable FAISS index: the header declares " + std::to_string(ntotal) +
                             " vectors of dimension " + std::to_string(d) + " (" + std::to_string(count) +
                             " floats) but the file has " + std::to_string(size) + " bytes");
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
  auto index = std::make_unique<faiss::IndexIVFPQ>(quantizer, dimension, kCoarseCentroids, kSubQuantizers, kBitsPerCode);
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
  check_flat_index_file(filename);
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

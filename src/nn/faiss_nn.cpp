#include "patchcore/nn/faiss_nn.h"

#include <ATen/ATen.h>
#include <faiss/IndexFlat.h>
#include <faiss/IndexIVFPQ.h>
#include <faiss/impl/FaissException.h>

#include <stdexcept>

#include "faiss_index_file.h"
#include "patchcore/core/parallel.h"
#include "patchcore/core/tensor_checks.h"

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

void FaissNN::train(faiss::Index&, const at::Tensor&) const {}

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

void ApproximateFaissNN::train(faiss::Index& index, const at::Tensor& features) const {
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

std::unique_ptr<faiss::Index> FaissNN::build(const at::Tensor& features) const {
  const at::Tensor rows = float_rows(features, std::string(kind()) + ": features");
  std::unique_ptr<faiss::Index> index;
  with_openmp_threads(std::min(num_workers_, num_threads()), [&] {
    try {
      index = create_index(rows.size(1));
      train(*index, rows);
      index = to_device(std::move(index));
      index->add(rows.size(0), rows.data_ptr<float>());
    } catch (const faiss::FaissException& e) {
      throw std::runtime_error(std::string(kind()) + ": FAISS failed to build the index: " + e.what());
    }
  });
  return index;
}

void FaissNN::fit(const at::Tensor& features) { search_index_ = build(features); }

std::pair<at::Tensor, at::Tensor> FaissNN::run(int64_t k, const at::Tensor& query_features,
                                               const at::Tensor& index_features) const {
  std::unique_ptr<faiss::Index> temporary;
  const faiss::Index* index = search_index_.get();
  if (index_features.defined()) {
    temporary = build(index_features);
    index = temporary.get();
  }
  if (!index) throw std::logic_error(std::string(kind()) + ": run() before fit() or load()");
  const at::Tensor queries = checked_queries(k, query_features, index->ntotal, index->d);
  auto distances = at::empty({queries.size(0), k}, at::kFloat);
  auto indices = at::empty({queries.size(0), k}, at::kLong);
  static_assert(sizeof(faiss::Index::idx_t) == sizeof(int64_t), "FAISS ids must be 64-bit");
  with_openmp_threads(std::min(num_workers_, num_threads()), [&] {
    index->search(queries.size(0), queries.data_ptr<float>(), k, distances.data_ptr<float>(),
                  reinterpret_cast<faiss::Index::idx_t*>(indices.data_ptr<int64_t>()));
  });
  return {distances, indices};
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
  write_index_file(*index, filename);
}

void FaissNN::load(const std::string& filename) {
  std::unique_ptr<faiss::Index> index = read_index_file(filename);
  if (!accepts(*index))
    throw std::runtime_error(filename + ": holds a FAISS index of another kind than " + kind() + " expects");
  search_index_ = to_device(std::move(index));
}

void FaissNN::reset_index() { search_index_.reset(); }

at::Tensor FaissNN::rows() const {
  const auto* flat = dynamic_cast<const faiss::IndexFlat*>(search_index_.get());
  if (!flat) throw std::logic_error(std::string(kind()) + ": the index keeps no rows to read back");
  return at::from_blob(const_cast<float*>(flat->get_xb()), {flat->ntotal, flat->d}, at::kFloat).clone();
}

int64_t FaissNN::size() const { return search_index_ ? search_index_->ntotal : 0; }
int64_t FaissNN::dimension() const { return search_index_ ? search_index_->d : 0; }

}  // namespace patchcore

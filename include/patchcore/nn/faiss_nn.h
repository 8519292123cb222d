#pragma once
// common.FaissNN and common.ApproximateFaissNN: FAISS's indexes over the memory bank.
#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <utility>

#include "patchcore/nn/nearest_neighbour_search.h"

namespace faiss {
struct Index;
}

namespace patchcore {

// Brute force over an IndexFlatL2.
class FaissNN : public NearestNeighbourSearch {
 public:
  // on_gpu needs a FAISS built with GPU support; without it this throws instead of silently using the CPU.
  // FAISS's searches run on at most num_workers threads of the thread setting (core/parallel.h).
  explicit FaissNN(bool on_gpu = false, int num_workers = 4);
  ~FaissNN() override;
  FaissNN(const FaissNN&) = delete;
  FaissNN& operator=(const FaissNN&) = delete;

  void fit(const at::Tensor& features) override;
  std::pair<at::Tensor, at::Tensor> run(int64_t n_nearest_neighbours, const at::Tensor& query_features,
                                        const at::Tensor& index_features = {}) const override;
  void save(const std::string& filename) const override;
  void load(const std::string& filename) override;
  void reset_index() override;

  at::Tensor rows() const override;
  bool is_fitted() const override { return search_index_ != nullptr; }
  int64_t size() const override;
  int64_t dimension() const override;
  const char* kind() const override { return "FaissNN"; }
  bool on_gpu() const { return on_gpu_; }
  int num_workers() const { return num_workers_; }

 protected:
  virtual std::unique_ptr<faiss::Index> create_index(int64_t dimension) const;
  // Called before add(); the flat index needs no training.
  virtual void train(faiss::Index& index, const at::Tensor& features) const;
  // True when a loaded index is of the kind this class builds.
  virtual bool accepts(const faiss::Index& index) const;

 private:
  std::unique_ptr<faiss::Index> build(const at::Tensor& features) const;
  std::unique_ptr<faiss::Index> to_device(std::unique_ptr<faiss::Index> index) const;

  bool on_gpu_;
  int num_workers_;
  std::unique_ptr<faiss::Index> search_index_;
  struct GpuResources;
  std::shared_ptr<GpuResources> gpu_;
};

// IVF-PQ: 512 coarse centroids, 64 sub-quantizers of 8 bits, trained on the bank before adding it.
// Needs D divisible by 64 and at least 512 training rows.
class ApproximateFaissNN : public FaissNN {
 public:
  using FaissNN::FaissNN;
  const char* kind() const override { return "ApproximateFaissNN"; }

 protected:
  std::unique_ptr<faiss::Index> create_index(int64_t dimension) const override;
  void train(faiss::Index& index, const at::Tensor& features) const override;
  bool accepts(const faiss::Index& index) const override;
};

}  // namespace patchcore

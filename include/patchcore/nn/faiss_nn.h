#pragma once
// common.FaissNN and common.ApproximateFaissNN: nearest-neighbour search over the memory bank.
//
// Distances are SQUARED L2, as FAISS returns them. Index files use FAISS's own write_index format, so a
// bank saved here loads in the Python reference (faiss.read_index) and the reverse.
#include <torch/torch.h>

#include <memory>
#include <string>
#include <utility>

namespace faiss {
struct Index;
}

namespace patchcore {

class FaissNN {
 public:
  // on_gpu needs a FAISS built with GPU support; without it this throws instead of silently using the CPU.
  explicit FaissNN(bool on_gpu = false, int num_workers = 4);
  virtual ~FaissNN();
  FaissNN(const FaissNN&) = delete;
  FaissNN& operator=(const FaissNN&) = delete;

  // Builds the index from features [N, D] (float32, N >= 1).
  void fit(const torch::Tensor& features);
  // k nearest bank rows of each query [Q, D] → (squared distances [Q, k] float32, indices [Q, k] int64).
  // With index_features, searches a throw-away index of the same kind built from them instead.
  // Thread-safe for concurrent calls on a fitted index.
  virtual std::pair<torch::Tensor, torch::Tensor> run(int64_t n_nearest_neighbours, const torch::Tensor& query_features,
                                                      const torch::Tensor& index_features = {}) const;
  void save(const std::string& filename) const;
  // Throws naming the file when it is missing, truncated, not a FAISS index, or of another index kind.
  void load(const std::string& filename);
  void reset_index();

  bool is_fitted() const { return search_index_ != nullptr; }
  int64_t size() const;       // rows in the bank
  int64_t dimension() const;  // feature length
  bool on_gpu() const { return on_gpu_; }
  int num_workers() const { return num_workers_; }
  // The class name, as patchcore_params.json records the nn_method.
  virtual const char* kind() const { return "FaissNN"; }

 protected:
  virtual std::unique_ptr<faiss::Index> create_index(int64_t dimension) const;
  // Called before add(); the exact index needs no training.
  virtual void train(faiss::Index& index, const torch::Tensor& features) const;
  // True when a loaded index is of the kind this class builds.
  virtual bool accepts(const faiss::Index& index) const;
  // Called after fit(), load() and reset_index(), so a subclass can derive its own search structure from the
  // stored index and drop it with the index.
  virtual void index_changed() {}
  // The bank [size(), dimension()] row-major as a flat CPU index stores it; nullptr for other index kinds.
  const float* flat_rows() const;
  // run()'s argument checks against a bank of `rows` x `dimension`; → the queries as contiguous float32.
  torch::Tensor checked_queries(int64_t n_nearest_neighbours, const torch::Tensor& query_features, int64_t rows,
                                int64_t dimension) const;

 private:
  std::unique_ptr<faiss::Index> build(const torch::Tensor& features) const;
  std::unique_ptr<faiss::Index> to_device(std::unique_ptr<faiss::Index> index) const;
  void install(std::unique_ptr<faiss::Index> index);

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
  void train(faiss::Index& index, const torch::Tensor& features) const override;
  bool accepts(const faiss::Index& index) const override;
};

}  // namespace patchcore

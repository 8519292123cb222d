#include "patchcore/nn/exact_pruned_nn.h"

#include <ATen/ATen.h>
#include <faiss/IndexFlat.h>

#include <filesystem>
#include <stdexcept>

#include "faiss_index_file.h"
#include "patchcore/core/tensor_checks.h"
#include "patchcore/nn/faiss_nn.h"
#include "pruning_index.h"

namespace patchcore {

struct ExactPrunedNN::Bank {
  std::unique_ptr<faiss::IndexFlatL2> flat;
  std::shared_ptr<const pruning::PruningIndex> pruning;
  mutable pruning::SearchHistory history;  // of the searches on this bank, which leave it unchanged
};

ExactPrunedNN::ExactPrunedNN(int num_workers, bool quantized_products)
    : num_workers_(num_workers), quantized_products_(quantized_products) {
  if (num_workers < 1) throw std::invalid_argument("ExactPrunedNN: num_workers must be at least 1");
}

ExactPrunedNN::~ExactPrunedNN() = default;

void ExactPrunedNN::install(std::unique_ptr<Bank> bank, const std::string& source, const std::string& pruning_file) {
  // The new bank replaces the old one even when it cannot be searched: never a half-fitted object.
  bank_.reset();
  const float* rows = bank->flat->get_xb();
  if (!pruning_file.empty())
    bank->pruning = pruning::read_pruning_index(pruning_file, rows, bank->flat->ntotal, bank->flat->d);
  if (!bank->pruning) {
    try {
      bank->pruning = pruning::build_pruning_index(rows, bank->flat->ntotal, bank->flat->d);
    } catch (const std::exception& e) {
      if (source.empty()) throw;
      throw std::runtime_error(source + ": the exact search cannot be built on this memory bank: " + e.what());
    }
  }
  bank_ = std::move(bank);
}

bool ExactPrunedNN::quantized_products_native() { return native_quantized_products(); }

std::string ExactPrunedNN::pruning_filename(const std::string& index_filename) {
  const std::string extension = ".faiss";
  const bool faiss = index_filename.size() > extension.size() &&
                     index_filename.compare(index_filename.size() - extension.size(), extension.size(), extension) == 0;
  return (faiss ? index_filename.substr(0, index_filename.size() - extension.size()) : index_filename) + ".pruning";
}

void ExactPrunedNN::fit(const at::Tensor& features) {
  const at::Tensor rows = float_rows(features, "ExactPrunedNN: features");
  auto bank = std::make_unique<Bank>();
  bank->flat = std::make_unique<faiss::IndexFlatL2>(rows.size(1));
  bank->flat->add(rows.size(0), rows.data_ptr<float>());
  install(std::move(bank), "", "");
}

std::pair<at::Tensor, at::Tensor> ExactPrunedNN::run(int64_t k, const at::Tensor& query_features,
                                                     const at::Tensor& index_features) const {
  if (index_features.defined()) return FaissNN(false, num_workers_).run(k, query_features, index_features);
  return search(k, query_features, nullptr);
}

std::pair<at::Tensor, at::Tensor> ExactPrunedNN::search(int64_t k, const at::Tensor& query_features,
                                                        Stats* stats) const {
  const std::shared_ptr<const Bank> bank = bank_;
  if (!bank) throw std::logic_error("ExactPrunedNN: run() before fit() or load()");
  const pruning::PruningIndex& p = *bank->pruning;
  const at::Tensor queries = checked_queries(k, query_features, p.count, p.dim);
  pruning::SearchCounts counts;
  auto result = pruning::search(p, k, queries, num_workers_, quantized_products_, &bank->history, &counts);
  if (stats) {
    stats->queries += queries.size(0);
    stats->refined += counts.refined;
    stats->exact += counts.exact;
    stats->dense += counts.dense;
  }
  return result;
}

void ExactPrunedNN::save(const std::string& filename) const {
  if (!bank_) throw std::logic_error("ExactPrunedNN: save() before fit()");
  write_index_file(*bank_->flat, filename);
  pruning::write_pruning_index(*bank_->pruning, pruning_filename(filename));
}

void ExactPrunedNN::load(const std::string& filename) {
  std::unique_ptr<faiss::Index> index = read_index_file(filename);
  auto bank = std::make_unique<Bank>();
  bank->flat.reset(dynamic_cast<faiss::IndexFlatL2*>(index.get()));
  if (!bank->flat)
    throw std::runtime_error(filename + ": holds a FAISS index of another kind than ExactPrunedNN expects");
  index.release();
  std::error_code ec;
  const std::string pruning_file = pruning_filename(filename);
  install(std::move(bank), filename, std::filesystem::exists(pruning_file, ec) ? pruning_file : "");
}

void ExactPrunedNN::reset_index() { bank_.reset(); }

at::Tensor ExactPrunedNN::rows() const {
  if (!bank_) throw std::logic_error("ExactPrunedNN: rows() before fit() or load()");
  return at::from_blob(const_cast<float*>(bank_->flat->get_xb()), {bank_->flat->ntotal, bank_->flat->d}, at::kFloat)
      .clone();
}

int64_t ExactPrunedNN::size() const { return bank_ ? bank_->flat->ntotal : 0; }
int64_t ExactPrunedNN::dimension() const { return bank_ ? bank_->flat->d : 0; }

}  // namespace patchcore

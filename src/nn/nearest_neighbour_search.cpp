#include "patchcore/nn/nearest_neighbour_search.h"

#include <stdexcept>

#include "patchcore/core/tensor_checks.h"
#include "patchcore/nn/exact_pruned_nn.h"
#include "patchcore/nn/faiss_nn.h"

namespace patchcore {

std::shared_ptr<NearestNeighbourSearch> make_nn_method(const std::string& kind, int num_workers) {
  if (kind == "FaissNN") return std::make_shared<FaissNN>(false, num_workers);
  if (kind == "ExactPrunedNN") return std::make_shared<ExactPrunedNN>(num_workers);
  if (kind == "ApproximateFaissNN") return std::make_shared<ApproximateFaissNN>(false, num_workers);
  throw std::invalid_argument("unknown nn_method '" + kind + "' (FaissNN, ExactPrunedNN or ApproximateFaissNN)");
}

at::Tensor NearestNeighbourSearch::checked_queries(int64_t k, const at::Tensor& query_features, int64_t rows,
                                                   int64_t dimension) const {
  const at::Tensor queries = float_rows(query_features, std::string(kind()) + ": query features");
  if (queries.size(1) != dimension)
    throw std::invalid_argument(std::string(kind()) + ": query features have dimension " +
                                std::to_string(queries.size(1)) + ", the index has " + std::to_string(dimension));
  if (k < 1) throw std::invalid_argument(std::string(kind()) + ": n_nearest_neighbours must be at least 1");
  if (k > rows)
    throw std::invalid_argument(std::string(kind()) + ": n_nearest_neighbours " + std::to_string(k) +
                                " is larger than the memory bank (" + std::to_string(rows) + " rows)");
  return queries;
}

}  // namespace patchcore

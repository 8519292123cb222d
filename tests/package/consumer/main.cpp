// Fits a memory bank and scores rows against it through the installed headers and library: each bank row is
// its own nearest neighbour, at distance 0.
#include <ATen/ATen.h>
#include <patchcore/nn/faiss_nn.h>
#include <patchcore/nn/nearest_neighbour_scorer.h>
#include <patchcore/patchcore.h>

#include <iostream>

int main() {
  at::Tensor bank = at::rand({100, 16});
  patchcore::NearestNeighbourScorer scorer(1, std::make_shared<patchcore::FaissNN>());
  scorer.fit({bank});
  auto [scores, distances, nearest] = scorer.predict({bank.slice(0, 10, 20)});
  bool own_rows = at::equal(nearest.view(-1), at::arange(10, 20, at::kLong));
  std::cout << "patchcore " << patchcore::version() << ": " << (own_rows ? "ok" : "wrong neighbours") << "\n";
  return own_rows && scores.max().item<float>() < 1e-5f ? 0 : 1;
}

#pragma once
// FAISS index files, read and written for FaissNN and ExactPrunedNN. Private to nn.
#include <memory>
#include <string>

namespace faiss {
struct Index;
}

namespace patchcore {

// Checks the file (a flat or IVF-PQ index, every count against the bytes it has and the others), then has FAISS
// read it. Errors name the file and the problem; other index kinds are refused before FAISS reads them.
std::unique_ptr<faiss::Index> read_index_file(const std::string& filename);
// FAISS's write_index, to a temporary file renamed onto `filename`.
void write_index_file(const faiss::Index& index, const std::string& filename);

}  // namespace patchcore

#pragma once
// A pickle of plain values (dict, list, tuple, str, int, float, bool, None), such as the published PatchCore's
// patchcore_params.pkl, read with the checkpoint reader's pickle VM: nothing in the file is ever called, and every
// size is checked. Private to the library's sources.
#include <nlohmann/json.hpp>

#include <string>

namespace patchcore {

// Tuples become arrays. Throws std::runtime_error naming the file when it is not such a pickle (any other object,
// a non-string dict key, nesting beyond 64 levels, or more than 1 MiB).
nlohmann::json read_plain_pickle(const std::string& path);

}  // namespace patchcore

#include "plain_pickle.h"

#include "patchcore/core/file.h"
#include "pickle.h"

namespace patchcore {
namespace {

using checkpoint::Heap;
using checkpoint::Kind;
using checkpoint::Value;

constexpr uint64_t kMaxBytes = 1 << 20;
constexpr int kMaxDepth = 64;

nlohmann::json to_json(const Heap& heap, const Value& v, const std::string& path, int depth) {
  if (depth > kMaxDepth) throw std::runtime_error(path + ": the pickle nests deeper than " + std::to_string(kMaxDepth));
  switch (v.kind) {
    case Kind::None:
      return nullptr;
    case Kind::Bool:
      return v.i != 0;
    case Kind::Int:
      return v.i;
    case Kind::Float:
      return v.f;
    case Kind::Str:
      return heap.str(v);
    case Kind::Tuple:
    case Kind::List: {
      nlohmann::json array = nlohmann::json::array();
      for (const Value& item : heap.seq(v)) array.push_back(to_json(heap, item, path, depth + 1));
      return array;
    }
    case Kind::Dict: {
      nlohmann::json object = nlohmann::json::object();
      for (const auto& [key, value] : heap.dict(v).items) {
        if (key.kind != Kind::Str) throw std::runtime_error(path + ": a dict key is a " + kind_name(key.kind));
        object[heap.str(key)] = to_json(heap, value, path, depth + 1);
      }
      return object;
    }
    default:
      throw std::runtime_error(path + ": holds a " + std::string(kind_name(v.kind)) + ", not a plain value");
  }
}

}  // namespace

nlohmann::json read_plain_pickle(const std::string& path) {
  const std::string bytes = read_file(path, kMaxBytes);
  Heap heap;
  checkpoint::Budget budget{kMaxBytes, 0};
  try {
    const Value root = checkpoint::unpickle(path + ": ", reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(),
                                            0, heap, budget, nullptr, nullptr);
    return to_json(heap, root, path, 0);
  } catch (const CheckpointError& e) {
    throw std::runtime_error(e.what());
  }
}

}  // namespace patchcore

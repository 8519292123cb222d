#include <gtest/gtest.h>
#include <torch/torch.h>

#include <caffe2/serialize/inline_container.h>

#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "patchcore/core/file.h"
#include "patchcore/io/checkpoint.h"
#include "patchcore/io/npy.h"
#include "support.h"

using namespace patchcore;
using nlohmann::json;

namespace {

std::string fixture_path(const std::string& file) { return test::fixture("checkpoints/" + file); }
std::string fixture_bytes(const std::string& file) { return read_file(fixture_path(file)); }
json fixture_json(const std::string& file) { return json::parse(fixture_bytes(file)); }

std::string dtype_name(torch::ScalarType t) {
  static const std::map<torch::ScalarType, std::string> names = {
      {torch::kFloat, "float32"},     {torch::kDouble, "float64"}, {torch::kHalf, "float16"},
      {torch::kBFloat16, "bfloat16"}, {torch::kLong, "int64"},     {torch::kInt, "int32"},
      {torch::kShort, "int16"},       {torch::kChar, "int8"},      {torch::kByte, "uint8"},
      {torch::kBool, "bool"}};
  auto it = names.find(t);
  return it == names.end() ? "?" : it->second;
}

std::vector<int64_t> shape_of(const torch::Tensor& t) { return t.sizes().vec(); }

// Every value compared exactly: float16/bfloat16/float32 widen to double without rounding, and the
// fixture script wrote doubles with repr, which round-trips.
void expect_values(const std::string& name, const torch::Tensor& t, const json& expected) {
  ASSERT_EQ(static_cast<size_t>(t.numel()), expected.size()) << name;
  const torch::Tensor flat = t.reshape({-1});
  if (t.is_floating_point()) {
    const torch::Tensor d = flat.to(torch::kDouble);
    for (int64_t k = 0; k < t.numel(); ++k)
      EXPECT_EQ(d[k].item<double>(), expected[k].get<double>()) << name << "[" << k << "]";
  } else if (t.scalar_type() == torch::kBool) {
    for (int64_t k = 0; k < t.numel(); ++k)
      EXPECT_EQ(flat[k].item<bool>(), expected[k].get<bool>()) << name << "[" << k << "]";
  } else {
    const torch::Tensor l = flat.to(torch::kLong);
    for (int64_t k = 0; k < t.numel(); ++k)
      EXPECT_EQ(l[k].item<int64_t>(), expected[k].get<int64_t>()) << name << "[" << k << "]";
  }
}

void expect_owned_contiguous(const std::string& name, const torch::Tensor& t) {
  EXPECT_TRUE(t.is_contiguous()) << name;
  EXPECT_EQ(t.device(), torch::Device(torch::kCPU)) << name;
  EXPECT_EQ(t.storage_offset(), 0) << name;
  EXPECT_EQ(t.storage().nbytes(), static_cast<size_t>(t.numel()) * t.element_size()) << name;
}

uint64_t fnv1a64(const torch::Tensor& t) {
  const auto* p = static_cast<const uint8_t*>(t.data_ptr());
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t k = 0; k < t.nbytes(); ++k) h = (h ^ p[k]) * 0x100000001b3ull;
  return h;
}

// Runs `load` and checks it throws CheckpointError whose message starts with `name` and contains each
// of `needles`; returns the message.
template <typename Load>
std::string expect_error(Load&& load, const std::string& name, const std::vector<std::string>& needles) {
  try {
    load();
  } catch (const CheckpointError& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.rfind(name + ": ", 0), 0u) << msg;
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "'" << n << "' not in: " << msg;
    return msg;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type: " << e.what();
    return {};
  }
  ADD_FAILURE() << name << " loaded; expected an error containing '" << (needles.empty() ? "" : needles[0]) << "'";
  return {};
}

std::string expect_memory_error(const std::string& bytes, const std::string& name,
                                const std::vector<std::string>& needles, const CheckpointLimits& limits = {}) {
  return expect_error([&] { load_state_dict_from_memory(bytes, name, limits); }, name, needles);
}

// --- zip archives rebuilt with libtorch's own writer, so a changed record keeps a valid zip and CRC ---

using Records = std::vector<std::pair<std::string, std::string>>;

Records read_records(const std::string& zip) {
  std::istringstream in(zip);
  caffe2::serialize::PyTorchStreamReader reader(&in);
  Records out;
  for (const auto& name : reader.getAllRecords()) {
    auto [data, size] = reader.getRecord(name);
    out.emplace_back(name, std::string(static_cast<const char*>(data.get()), size));
  }
  return out;
}

std::string write_zip(const Records& records, const std::string& compressed = "") {
  std::string out;
  {
    caffe2::serialize::PyTorchStreamWriter writer([&](const void* p, size_t n) {
      out.append(static_cast<const char*>(p), n);
      return n;
    });
    for (const auto& [name, data] : records) {
      if (name == "version" || name == ".data/version") continue;  // the writer adds its own
      writer.writeRecord(name, data.data(), data.size(), name == compressed);
    }
    writer.writeEndOfFile();
  }
  return out;
}

std::string& record(Records& records, const std::string& name) {
  for (auto& r : records)
    if (r.first == name) return r.second;
  throw std::runtime_error("no record " + name);
}

// --- hand-made pickles for what torch.save cannot be made to write ---

struct PickleWriter {
  std::string out = std::string("\x80\x02", 2);
  PickleWriter& op(char c) {
    out += c;
    return *this;
  }
  PickleWriter& raw(const std::string& s) {
    out += s;
    return *this;
  }
  PickleWriter& str(const std::string& s) {
    out += 'X';
    for (int k = 0; k < 4; ++k) out += static_cast<char>((s.size() >> (8 * k)) & 0xff);
    out += s;
    return *this;
  }
  PickleWriter& integer(int64_t v) {
    if (v >= 0 && v < 256) {
      out += 'K';
      out += static_cast<char>(v);
    } else {
      out += "\x8a\x08";
      for (int k = 0; k < 8; ++k) out += static_cast<char>((static_cast<uint64_t>(v) >> (8 * k)) & 0xff);
    }
    return *this;
  }
  PickleWriter& global(const std::string& module, const std::string& name) {
    return op('c').raw(module + "\n" + name + "\n");
  }
  PickleWriter& ints(const std::vector<int64_t>& values) {
    op('(');
    for (int64_t v : values) integer(v);
    return op('t');
  }
  PickleWriter& ordered_dict() { return global("collections", "OrderedDict").op(')').op('R'); }
  PickleWriter& tensor(const std::string& storage_type, const std::string& key, int64_t numel, int64_t offset,
                       const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides, bool legacy) {
    global("torch._utils", "_rebuild_tensor_v2").op('(');
    op('(').str("storage").global("torch", storage_type).str(key).str("cpu").integer(numel);
    if (legacy) op('N');
    op('t').op('Q');
    integer(offset).ints(sizes).ints(strides).op('\x89').ordered_dict();
    return op('t').op('R');
  }
  std::string stop() const { return out + "."; }
};

struct Storage {
  std::string key;
  int64_t numel;
  std::string bytes;
};

std::string zip_checkpoint(const std::string& pickle, const std::vector<Storage>& storages) {
  Records records{{"data.pkl", pickle}};
  for (const auto& s : storages) records.emplace_back("data/" + s.key, s.bytes);
  return write_zip(records);
}

std::string legacy_checkpoint(const std::string& pickle, const std::vector<Storage>& storages) {
  std::string out = std::string("\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.", 15);  // magic
  out += std::string("\x80\x02M\xe9\x03.", 6);                                                     // protocol 1001
  out += PickleWriter()
             .op('}')
             .op('(')
             .str("protocol_version")
             .integer(1001)
             .str("little_endian")
             .op('\x88')
             .str("type_sizes")
             .op('}')
             .op('(')
             .str("short")
             .integer(2)
             .str("int")
             .integer(4)
             .str("long")
             .integer(4)
             .op('u')
             .op('u')
             .stop();
  out += pickle;
  PickleWriter keys;
  keys.op(']').op('(');
  for (const auto& s : storages) keys.str(s.key);
  out += keys.op('e').stop();
  for (const auto& s : storages) {
    for (int k = 0; k < 8; ++k) out += static_cast<char>((static_cast<uint64_t>(s.numel) >> (8 * k)) & 0xff);
    out += s.bytes;
  }
  return out;
}

std::string floats(std::initializer_list<float> values) {
  std::string out(values.size() * 4, '\0');
  std::memcpy(out.data(), values.begin(), out.size());
  return out;
}

// {name: FloatStorage tensor} with the given view of one storage "0" of `numel` floats.
std::string one_tensor_pickle(const std::string& name, int64_t numel, int64_t offset, const std::vector<int64_t>& sizes,
                              const std::vector<int64_t>& strides, bool legacy) {
  return PickleWriter()
      .ordered_dict()
      .op('(')
      .str(name)
      .tensor("FloatStorage", "0", numel, offset, sizes, strides, legacy)
      .op('u')
      .stop();
}

std::string one_tensor_checkpoint(bool legacy, const std::string& name, int64_t numel, int64_t offset,
                                  const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides,
                                  const std::string& bytes) {
  const std::string pickle = one_tensor_pickle(name, numel, offset, sizes, strides, legacy);
  return legacy ? legacy_checkpoint(pickle, {{"0", numel, bytes}}) : zip_checkpoint(pickle, {{"0", numel, bytes}});
}

const char* format_name(bool legacy) { return legacy ? "legacy" : "zip"; }

// Each loaded entry has the golden name, dtype and shape and owns contiguous memory; `values` then checks
// its contents against the golden entry.
void expect_entries(const StateDict& sd, const json& entries,
                    const std::function<void(const std::string&, const torch::Tensor&, const json&)>& values) {
  ASSERT_EQ(sd.size(), entries.size());
  for (size_t k = 0; k < sd.size(); ++k) {
    const auto& [name, t] = sd[k];
    const json& e = entries[k];
    ASSERT_EQ(name, e["name"].get<std::string>());
    EXPECT_EQ(dtype_name(t.scalar_type()), e["dtype"].get<std::string>()) << name;
    EXPECT_EQ(shape_of(t), e["shape"].get<std::vector<int64_t>>()) << name;
    expect_owned_contiguous(name, t);
    values(name, t, e);
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// Checkpoints written by torch.save.

class ResNetFixture : public ::testing::TestWithParam<std::string> {};

TEST_P(ResNetFixture, MatchesTorchLoadExactly) {
  const json golden = fixture_json("resnet18_stem_layer1_0.json");
  const NpyArray npy = read_npy(fixture_path("resnet18_stem_layer1_0.f4.npy"));
  const std::vector<float> all = npy.as_float();
  const StateDict sd = load_state_dict(fixture_path("resnet18_stem_layer1_0." + GetParam() + ".pth"));
  ASSERT_FALSE(sd.empty());
  EXPECT_EQ(sd.front().first, "conv1.weight");
  expect_entries(sd, golden["entries"], [&](const std::string& name, const torch::Tensor& t, const json& e) {
    if (!e.contains("f4_offset")) return expect_values(name, t, e["values"]);
    const size_t offset = e["f4_offset"].get<size_t>();
    ASSERT_LE(offset + t.numel(), all.size());
    EXPECT_EQ(std::memcmp(t.data_ptr<float>(), all.data() + offset, t.nbytes()), 0) << name;
  });
}

INSTANTIATE_TEST_SUITE_P(Formats, ResNetFixture, ::testing::Values("zip", "legacy"));

class DtypesFixture : public ::testing::TestWithParam<std::string> {};

TEST_P(DtypesFixture, EveryDtypeAndViewMatchesTorchLoad) {
  const json golden = fixture_json("dtypes.json");
  expect_entries(
      load_state_dict(fixture_path("dtypes." + GetParam() + ".pth")), golden["entries"],
      [](const std::string& name, const torch::Tensor& t, const json& e) { expect_values(name, t, e["values"]); });
}

INSTANTIATE_TEST_SUITE_P(Formats, DtypesFixture, ::testing::Values("zip", "legacy", "zip_proto4"));

TEST(Checkpoint, ViewsSharingAStorageGetTheirOwnMemory) {
  const StateDict sd = load_state_dict(fixture_path("dtypes.zip.pth"));
  std::map<std::string, torch::Tensor> by_name(sd.begin(), sd.end());
  const torch::Tensor base = by_name.at("base");
  EXPECT_TRUE(torch::equal(by_name.at("transposed"), base.t()));
  EXPECT_TRUE(torch::equal(by_name.at("slice"), base.slice(0, 1).slice(1, 2, 4)));
  by_name.at("transposed").fill_(0);
  EXPECT_NE(base.abs().sum().item<float>(), 0.f);
}

TEST(Checkpoint, SharedResNet18MatchesTorchChecksums) {
  PATCHCORE_REQUIRE_SHARED(path, "weights/resnet18-imagenet-stem-to-layer3.pth");
  const json golden = fixture_json("shared_resnet18.json");
  const StateDict sd = load_state_dict(path);
  ASSERT_EQ(sd.size(), 90u);
  ASSERT_EQ(sd.size(), golden["entries"].size());
  EXPECT_EQ(sd[0].first, "conv1.weight");
  EXPECT_EQ(shape_of(sd[0].second), (std::vector<int64_t>{64, 3, 7, 7}));
  std::map<std::string, torch::Tensor> by_name;
  expect_entries(sd, golden["entries"],
                 [&](const std::string& name, const torch::Tensor& t, const json&) { by_name[name] = t; });
  for (const auto& [name, check] : golden["checked"].items()) {
    const torch::Tensor& t = by_name.at(name);
    char hex[17];
    std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(fnv1a64(t)));
    EXPECT_EQ(std::string(hex), check["fnv1a64"].get<std::string>()) << name;
    EXPECT_NEAR(t.to(torch::kDouble).sum().item<double>(), check["sum"].get<double>(), 1e-9 * (1 + t.numel())) << name;
  }
}

TEST(Checkpoint, UnwrapsStateDictAndModelWrappersAndStripsModulePrefix) {
  const json golden = fixture_json("wrappers.json");
  for (const std::string file : {"wrapped_state_dict.pth", "wrapped_model.pth"}) {
    const StateDict sd = load_state_dict(fixture_path(file));
    std::vector<std::string> names;
    for (const auto& [name, t] : sd) {
      names.push_back(name);
      expect_values(file + ":" + name, t, golden["values"][name]);
    }
    EXPECT_EQ(names, golden[file].get<std::vector<std::string>>()) << file;
  }
}

TEST(Checkpoint, KeepsModulePrefixUnlessEveryKeyHasIt) {
  const std::string bytes(16, '\0');
  const std::string pickle = PickleWriter()
                                 .ordered_dict()
                                 .op('(')
                                 .str("module.a")
                                 .tensor("FloatStorage", "0", 4, 0, {4}, {1}, false)
                                 .str("b")
                                 .tensor("FloatStorage", "0", 4, 0, {2}, {1}, false)
                                 .op('u')
                                 .stop();
  const StateDict sd = load_state_dict_from_memory(zip_checkpoint(pickle, {{"0", 4, bytes}}), "mixed.pth");
  ASSERT_EQ(sd.size(), 2u);
  EXPECT_EQ(sd[0].first, "module.a");
  EXPECT_EQ(sd[1].first, "b");
}

// ------------------------------------------------------------------------------------------------
// Hand-made views in both formats.

class Crafted : public ::testing::TestWithParam<bool> {};

TEST_P(Crafted, StridedViewWithOffsetIsResolved) {
  const bool legacy = GetParam();
  const std::string bytes = floats({0, 1, 2, 3, 4, 5, 6, 7, 8, 9});
  // Elements 1, 4, 7 / 2, 5, 8 : offset 1, sizes (2, 3), strides (1, 3).
  const StateDict sd =
      load_state_dict_from_memory(one_tensor_checkpoint(legacy, "w", 10, 1, {2, 3}, {1, 3}, bytes), "v.pth");
  ASSERT_EQ(sd.size(), 1u);
  const torch::Tensor expected = torch::tensor({1.f, 4.f, 7.f, 2.f, 5.f, 8.f}).reshape({2, 3});
  EXPECT_TRUE(torch::equal(sd[0].second, expected)) << sd[0].second;
  EXPECT_TRUE(sd[0].second.is_contiguous());
}

TEST(Checkpoint, LegacyStorageViewMetadataIsResolved) {
  // ('storage', FloatStorage, '0', 'cpu', 6, ('1', 2, 3)): a view of elements 2..4 of storage 0.
  const std::string pickle = PickleWriter()
                                 .ordered_dict()
                                 .op('(')
                                 .str("w")
                                 .global("torch._utils", "_rebuild_tensor_v2")
                                 .op('(')
                                 .op('(')
                                 .str("storage")
                                 .global("torch", "FloatStorage")
                                 .str("0")
                                 .str("cpu")
                                 .integer(6)
                                 .op('(')
                                 .str("1")
                                 .integer(2)
                                 .integer(3)
                                 .op('t')
                                 .op('t')
                                 .op('Q')
                                 .integer(1)
                                 .ints({2})
                                 .ints({1})
                                 .op('\x89')
                                 .ordered_dict()
                                 .op('t')
                                 .op('R')
                                 .op('u')
                                 .stop();
  const StateDict sd =
      load_state_dict_from_memory(legacy_checkpoint(pickle, {{"0", 6, floats({0, 1, 2, 3, 4, 5})}}), "view.pth");
  ASSERT_EQ(sd.size(), 1u);
  EXPECT_TRUE(torch::equal(sd[0].second, torch::tensor({3.f, 4.f})));
}

TEST_P(Crafted, ViewBeyondItsStorageIsRefused) {
  const bool legacy = GetParam();
  const std::string bytes = floats({0, 1, 2, 3});
  for (const auto& [offset, sizes, strides] :
       std::vector<std::tuple<int64_t, std::vector<int64_t>, std::vector<int64_t>>>{
           {0, {3, 3}, {3, 1}}, {4, {1}, {1}}, {1, {2, 2}, {1, 2}}, {0, {2}, {int64_t{1} << 62}}}) {
    expect_memory_error(one_tensor_checkpoint(legacy, "layer1.0.conv1.weight", 4, offset, sizes, strides, bytes),
                        "view.pth", {"tensor 'layer1.0.conv1.weight' view exceeds its storage"});
  }
}

TEST_P(Crafted, AbsurdShapeOrStorageSizeIsRefusedBeforeAllocating) {
  const bool legacy = GetParam();
  const std::string bytes = floats({0, 1, 2, 3});
  expect_memory_error(one_tensor_checkpoint(legacy, "w", int64_t{1} << 61, 0, {4}, {1}, bytes), "big.pth",
                      {"storage", "exceeds the limit"});
  expect_memory_error(one_tensor_checkpoint(legacy, "w", 4, 0, {int64_t{1} << 20, int64_t{1} << 20}, {0, 0}, bytes),
                      "shape.pth", {"tensor 'w' of 1099511627776 elements exceeds the limit"});
  expect_memory_error(one_tensor_checkpoint(legacy, "w", 4, 0, {int64_t{1} << 40, int64_t{1} << 40}, {0, 0}, bytes),
                      "shape.pth", {"tensor 'w' has an absurd shape"});
}

TEST_P(Crafted, ObjectThatIsNotAStateDictIsRefused) {
  const bool legacy = GetParam();
  const std::string pickle = PickleWriter().op('}').str("epoch").integer(3).op('s').stop();
  const std::string file = legacy ? legacy_checkpoint(pickle, {}) : zip_checkpoint(pickle, {});
  expect_memory_error(file, "epoch.pth", {"entry 'epoch' is a int, not a tensor"});
  const std::string list = PickleWriter().op(']').stop();
  expect_memory_error(legacy ? legacy_checkpoint(list, {}) : zip_checkpoint(list, {}), "list.pth",
                      {"holds a list, not a state dict"});
}

TEST_P(Crafted, GlobalsOutsideTheWhitelistAreRefused) {
  const bool legacy = GetParam();
  const std::vector<std::pair<std::string, std::string>> evil = {
      {PickleWriter().global("os", "system").str("touch /tmp/pwned").op('\x85').op('R').stop(), "'os.system'"},
      {PickleWriter().global("builtins", "eval").str("1").op('\x85').op('R').stop(), "'builtins.eval'"},
      {PickleWriter().global("torch._utils", "_rebuild_qtensor").stop(), "'torch._utils._rebuild_qtensor'"},
      {PickleWriter().global("torch", "load").stop(), "'torch.load'"},
      {PickleWriter().global("collections", "OrderedDict\nos").stop(), "unsupported pickle opcode"},
      // Protocol 4 spelling of the same call.
      {PickleWriter().raw("\x8c\x02os\x8c\x06system\x93").str("id").op('\x85').op('R').stop(), "'os.system'"},
  };
  for (const auto& [pickle, needle] : evil) {
    const std::string file = legacy ? legacy_checkpoint(pickle, {}) : zip_checkpoint(pickle, {});
    expect_memory_error(file, "evil.pth", {needle});
  }
  expect_memory_error(legacy ? legacy_checkpoint(evil[0].first, {}) : zip_checkpoint(evil[0].first, {}), "evil.pth",
                      {"is not allowed"});
}

TEST_P(Crafted, MalformedPicklesAreErrorsNotCrashes) {
  const bool legacy = GetParam();
  const std::vector<std::pair<std::string, std::string>> cases = {
      {PickleWriter().op('h').raw("\x05").stop(), "memo entry 5 was never stored"},
      {PickleWriter().op('0').stop(), "unsupported pickle opcode 0x30"},
      {PickleWriter().op('t').stop(), "no MARK"},
      {PickleWriter().op('(').op('s').stop(), "stack underflow"},
      {PickleWriter().op('N').op('N').stop(), "STOP with 2 values"},
      {PickleWriter().str("x").op('N').op('a').stop(), "append to a str"},
      {PickleWriter().op('}').op(']').integer(1).op('s').stop(), "dict key of unsupported type list"},
      {PickleWriter().global("torch", "FloatStorage").op(')').op('R').stop(), "cannot be called"},
      {PickleWriter().ordered_dict().op('N').op('\x85').op('b').stop(), "BUILD with a tuple state"},
      {PickleWriter().op('N').op('Q').stop(), "persistent id is a None"},
      {std::string("\x80\x07N.", 4), "unsupported pickle protocol 7"},
      {PickleWriter().raw(std::string(300, '(')).stop(), "MARKs nested deeper"},
  };
  for (const auto& [pickle, needle] : cases) {
    const std::string file = legacy ? legacy_checkpoint(pickle, {}) : zip_checkpoint(pickle, {});
    expect_memory_error(file, "bad.pth", {needle});
  }
}

TEST_P(Crafted, DeepNestingNeitherOverflowsTheStackNorLeaks) {
  const bool legacy = GetParam();
  // A million nested 1-tuples.
  const std::string tuples = PickleWriter().op('N').raw(std::string(1000000, '\x85')).stop();
  expect_memory_error(legacy ? legacy_checkpoint(tuples, {}) : zip_checkpoint(tuples, {}), "deep.pth",
                      {"holds a tuple, not a state dict"});
  // 200000 lists each appended to the previous one through the memo, parked in a dict under "k".
  PickleWriter lists;
  lists.op('}').str("k").op(']').op('q').raw("\x01").op('s');
  for (int k = 0; k < 200000; ++k) lists.str("k").op('h').raw("\x01").op(']').op('q').raw("\x01").op('a').op('s');
  const std::string chain = lists.stop();
  expect_memory_error(legacy ? legacy_checkpoint(chain, {}) : zip_checkpoint(chain, {}), "deep.pth",
                      {"entry 'k' is a list, not a tensor"});
}

TEST_P(Crafted, PickleObjectBudgetFollowsTheTensorLimit) {
  const bool legacy = GetParam();
  std::string appends;
  for (int k = 0; k < 1000000; ++k) appends += "]a";
  const std::string pickle = PickleWriter().op(']').raw(appends).stop();
  CheckpointLimits limits;
  limits.max_tensors = 10;
  const std::string file = legacy ? legacy_checkpoint(pickle, {}) : zip_checkpoint(pickle, {});
  expect_memory_error(file, "many.pth", {legacy ? "pickle too large" : "larger than the tensor limit allows"}, limits);
}

INSTANTIATE_TEST_SUITE_P(Formats, Crafted, ::testing::Values(false, true),
                         [](const auto& info) { return format_name(info.param); });

// ------------------------------------------------------------------------------------------------
// Damaged torch.save output.

TEST(CheckpointErrors, MissingFileNamesThePath) {
  const std::string path = test::temp_dir() + "/absent.pth";
  expect_error([&] { load_state_dict(path); }, path, {"no such file"});
}

TEST(CheckpointErrors, TruncatedFilesInBothFormats) {
  for (const std::string format : {"zip", "legacy"}) {
    const std::string file = "resnet18_stem_layer1_0." + format + ".pth";
    const std::string bytes = fixture_bytes(file);
    for (double fraction : {0.0001, 0.003, 0.01, 0.5, 0.9, 0.99999}) {
      const auto cut = static_cast<size_t>(bytes.size() * fraction);
      const std::string path = test::temp_dir() + "/" + file;
      write_file_atomically(
          path, [&](const std::string& tmp) { std::ofstream(tmp, std::ios::binary) << bytes.substr(0, cut); });
      expect_error([&] { load_state_dict(path); }, path, {"truncated"});
    }
  }
}

// The legacy layout the fixture script read with Python's pickle: data offset and storage sizes.
struct LegacyLayout {
  size_t data_offset;
  std::string first_key;  // first in the data section
  uint64_t first_numel;
  uint64_t first_nbytes;
  std::string conv1_key;  // first declared in the pickle
};

LegacyLayout legacy_layout() {
  const json legacy = fixture_json("resnet18_stem_layer1_0.json")["legacy"];
  LegacyLayout out{legacy["data_offset"].get<size_t>(), legacy["data_order"][0].get<std::string>(), 0, 0,
                   legacy["declared"][0]["key"].get<std::string>()};
  for (const auto& d : legacy["declared"]) {
    if (d["key"] == out.first_key) {
      out.first_numel = d["numel"].get<uint64_t>();
      out.first_nbytes = d["nbytes"].get<uint64_t>();
    }
  }
  return out;
}

TEST(CheckpointErrors, LegacyTruncatedInsideAStorageSaysHowManyBytesAreMissing) {
  const LegacyLayout layout = legacy_layout();
  ASSERT_GT(layout.first_nbytes, 100u);
  const std::string bytes = fixture_bytes("resnet18_stem_layer1_0.legacy.pth");
  expect_memory_error(bytes.substr(0, layout.data_offset + 8 + 100), "cut.pth",
                      {"truncated: storage '" + layout.first_key + "' needs " + std::to_string(layout.first_nbytes) +
                       " bytes, has 100"});
  expect_memory_error(bytes.substr(0, layout.data_offset + 3), "cut.pth",
                      {"truncated: storage '" + layout.first_key + "' header"});
}

TEST(CheckpointErrors, ZipRecordShorterThanItsStorage) {
  Records records = read_records(fixture_bytes("resnet18_stem_layer1_0.zip.pth"));
  record(records, "data/0").resize(100);
  expect_memory_error(write_zip(records), "short.pth", {"truncated: storage 'data/0' needs 37632 bytes, has 100"});
  record(records, "data/0").resize(40000);
  expect_memory_error(write_zip(records), "long.pth", {"storage 'data/0' has 40000 bytes, the pickle declares 37632"});
}

TEST(CheckpointErrors, ZipRecordMissing) {
  Records records = read_records(fixture_bytes("resnet18_stem_layer1_0.zip.pth"));
  records.erase(std::remove_if(records.begin(), records.end(), [](const auto& r) { return r.first == "data/3"; }),
                records.end());
  expect_memory_error(write_zip(records), "missing.pth", {"storage 'data/3' is missing"});
}

TEST(CheckpointErrors, FlippedBitInAZipRecordFailsItsChecksum) {
  // libtorch's zip reader does not check CRCs; the loader must.
  const std::string good = fixture_bytes("resnet18_stem_layer1_0.zip.pth");
  Records records = read_records(good);
  const size_t at = good.find(record(records, "data/3"));
  ASSERT_NE(at, std::string::npos);
  for (size_t delta : {size_t{0}, record(records, "data/3").size() / 2}) {
    std::string bad = good;
    bad[at + delta] = static_cast<char>(bad[at + delta] ^ 0x10);
    expect_memory_error(bad, "crc.pth", {"zip record 'data/3' is corrupt (CRC-32 mismatch)"});
  }
  std::string bad_pickle = good;
  bad_pickle[good.find(record(records, "data.pkl")) + 40] ^= 0x01;
  expect_memory_error(bad_pickle, "crc.pth", {"zip record 'data.pkl' is corrupt (CRC-32 mismatch)"});
}

TEST(CheckpointErrors, CompressedZipRecordIsRefused) {
  const Records records = read_records(fixture_bytes("dtypes.zip.pth"));
  expect_memory_error(write_zip(records, "data/0"), "deflated.pth", {"zip record", "data/0", "is compressed"});
}

TEST(CheckpointErrors, ZipWithoutDataPklOrTorchScriptIsNotAStateDict) {
  expect_memory_error(write_zip({{"other.txt", "x"}}), "other.zip", {"no data.pkl"});
  expect_memory_error(write_zip({{"data.pkl", PickleWriter().op('}').stop()}, {"code/__torch__.py", "def f(): pass"}}),
                      "script.pt", {"TorchScript"});
}

TEST(CheckpointErrors, NotACheckpoint) {
  const std::string dir = test::temp_dir();
  auto write = [&](const std::string& name, const std::string& bytes) {
    const std::string path = dir + "/" + name;
    std::ofstream(path, std::ios::binary) << bytes;
    return path;
  };
  const std::string empty = write("empty.pth", "");
  expect_error([&] { load_state_dict(empty); }, empty, {"empty file"});
  const std::string text = write("text.pth", "conv1.weight: [64, 3, 7, 7]\n");
  expect_error([&] { load_state_dict(text); }, text, {"not a PyTorch checkpoint"});
  std::mt19937 rng(7);
  for (int k = 0; k < 20; ++k) {
    std::string random(1000, '\0');
    for (auto& c : random) c = static_cast<char>(rng());
    if (k % 2) random[0] = '\x80';  // looks like a pickle's PROTO opcode
    const std::string path = write("random" + std::to_string(k) + ".pth", random);
    expect_error([&] { load_state_dict(path); }, path, {"not a PyTorch checkpoint"});
  }
}

TEST(CheckpointErrors, UnsupportedOpcodeNamesItsOffset) {
  // Legacy: the object pickle's first opcode after PROTO is the GLOBAL of collections.OrderedDict.
  std::string legacy = fixture_bytes("resnet18_stem_layer1_0.legacy.pth");
  const size_t at = legacy.find("ccollections\nOrderedDict\n");
  ASSERT_NE(at, std::string::npos);
  legacy[at] = 'S';
  expect_memory_error(legacy, "op.pth", {"unsupported pickle opcode 0x53 at offset " + std::to_string(at)});

  Records records = read_records(fixture_bytes("resnet18_stem_layer1_0.zip.pth"));
  ASSERT_EQ(record(records, "data.pkl")[2], 'c');
  record(records, "data.pkl")[2] = 'P';
  expect_memory_error(write_zip(records), "op.pth", {"data.pkl: unsupported pickle opcode 0x50 at offset 2"});
}

TEST(CheckpointErrors, StorageAboveTheLimitIsRefusedBeforeReading) {
  CheckpointLimits limits;
  limits.max_tensor_bytes = 10000;  // conv1.weight's storage has 37632 bytes
  expect_error([&] { load_state_dict(fixture_path("resnet18_stem_layer1_0.zip.pth"), limits); },
               fixture_path("resnet18_stem_layer1_0.zip.pth"),
               {"storage 'data/0' of 9408 float elements exceeds the limit of 10000 bytes"});
  expect_error([&] { load_state_dict(fixture_path("resnet18_stem_layer1_0.legacy.pth"), limits); },
               fixture_path("resnet18_stem_layer1_0.legacy.pth"),
               {"storage '" + legacy_layout().conv1_key + "' of 9408 float elements exceeds the limit of 10000 bytes"});
}

TEST(CheckpointErrors, FileAndTensorCountLimits) {
  CheckpointLimits small_file;
  small_file.max_file_bytes = 1000;
  const std::string path = fixture_path("dtypes.legacy.pth");
  expect_error([&] { load_state_dict(path, small_file); }, path, {"exceeds the limit of 1000 bytes"});
  expect_memory_error(fixture_bytes("dtypes.zip.pth"), "mem.pth", {"exceeds the limit of 1000 bytes"}, small_file);
  CheckpointLimits few;
  few.max_tensors = 5;
  expect_memory_error(fixture_bytes("dtypes.zip.pth"), "many.pth", {"more than 5 tensors"}, few);
  expect_memory_error(fixture_bytes("dtypes.legacy.pth"), "many.pth", {"more than 5 tensors"}, few);
}

TEST(CheckpointErrors, AbsurdElementCountInLegacyStorageHeader) {
  const LegacyLayout layout = legacy_layout();
  const size_t at = layout.data_offset;
  const std::string good = fixture_bytes("resnet18_stem_layer1_0.legacy.pth");
  for (uint64_t count : {uint64_t{1} << 62, ~uint64_t{0}, layout.first_numel - 1, layout.first_numel + 1}) {
    std::string bad = good;
    for (int k = 0; k < 8; ++k) bad[at + k] = static_cast<char>((count >> (8 * k)) & 0xff);
    expect_memory_error(bad, "count.pth",
                        {"storage '" + layout.first_key + "' header at offset " + std::to_string(at),
                         "elements, the pickle declares " + std::to_string(layout.first_numel)});
  }
  expect_memory_error(good + "x", "tail.pth", {"1 unexpected bytes after the last storage"});
}

TEST(CheckpointErrors, BigEndianIsRefused) {
  const std::string pickle = one_tensor_pickle("w", 1, 0, {1}, {1}, true);
  std::string legacy = legacy_checkpoint(pickle, {{"0", 1, floats({1})}});
  const size_t at = legacy.find("little_endian");
  ASSERT_NE(at, std::string::npos);
  legacy[at + 13] = '\x89';  // NEWTRUE -> NEWFALSE
  expect_memory_error(legacy, "be.pth", {"big-endian"});
  const std::string zip = write_zip(
      {{"data.pkl", one_tensor_pickle("w", 1, 0, {1}, {1}, false)}, {"data/0", floats({1})}, {"byteorder", "big"}});
  expect_memory_error(zip, "be.pth", {"big-endian"});
}

// ------------------------------------------------------------------------------------------------
// Crash sweep: every truncation and a byte flip at every offset (strided to a few thousand variants per
// file) must either load or throw CheckpointError.

namespace {

struct SweepResult {
  size_t loaded = 0;
  size_t refused = 0;
};

void load_variant(const std::string& bytes, const std::string& what, SweepResult& result) {
  try {
    const StateDict sd = load_state_dict_from_memory(bytes, what);
    for (const auto& entry : sd) ASSERT_TRUE(entry.second.is_contiguous()) << what;
    ++result.loaded;
  } catch (const CheckpointError& e) {
    ASSERT_EQ(std::string(e.what()).rfind(what + ": ", 0), 0u) << e.what();
    ++result.refused;
  } catch (const std::exception& e) {
    FAIL() << what << ": escaped as another exception type: " << e.what();
  } catch (...) {
    FAIL() << what << ": escaped as a non-standard exception";
  }
}

SweepResult sweep(const std::string& good, size_t max_variants,
                  const std::function<std::string(const std::string&)>& wrap) {
  SweepResult result;
  const size_t step = std::max<size_t>(1, 2 * good.size() / max_variants);
  for (size_t at = 0; at < good.size(); at += step) {
    load_variant(wrap(good.substr(0, at)), "cut@" + std::to_string(at), result);
    std::string flipped = good;
    flipped[at] = static_cast<char>(flipped[at] ^ (at % 3 == 0 ? 0xff : 1 << (at % 8)));
    load_variant(wrap(flipped), "flip@" + std::to_string(at), result);
    if (::testing::Test::HasFatalFailure()) break;
  }
  return result;
}

}  // namespace

TEST(CheckpointSweep, EveryTruncationAndByteFlipOfTheFilesIsACheckpointError) {
  for (const std::string file : {"dtypes.legacy.pth", "dtypes.zip.pth", "wrapped_model.pth"}) {
    const SweepResult r = sweep(fixture_bytes(file), 6000, [](const std::string& b) { return b; });
    ASSERT_FALSE(HasFatalFailure()) << file;
    EXPECT_GT(r.refused, 0u) << file;
  }
}

TEST(CheckpointSweep, EveryTruncationAndByteFlipOfTheZipPickleIsACheckpointError) {
  // Rezipped with a valid CRC, so the damaged data.pkl reaches the pickle VM.
  const Records records = read_records(fixture_bytes("dtypes.zip_proto4.pth"));
  const std::string pickle = [&] {
    Records copy = records;
    return record(copy, "data.pkl");
  }();
  const SweepResult r = sweep(pickle, 3000, [&](const std::string& damaged) {
    Records copy = records;
    record(copy, "data.pkl") = damaged;
    return write_zip(copy);
  });
  ASSERT_FALSE(HasFatalFailure());
  EXPECT_GT(r.refused, 0u);
}

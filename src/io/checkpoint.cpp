#include "patchcore/io/checkpoint.h"

#include <c10/util/Exception.h>
#include <caffe2/serialize/inline_container.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <new>
#include <string_view>
#include <unordered_map>

namespace patchcore {
namespace {

// A state dict nests a few levels deep (dict, rebuild-call tuple, persistent id tuple); these bounds only
// stop a hostile pickle from growing the VM without limit.
constexpr size_t kMaxStackDepth = 1 << 20;
constexpr size_t kMaxMarkDepth = 256;
constexpr size_t kMaxGlobalLength = 256;
constexpr size_t kMaxDims = 64;
constexpr size_t kMaxStorageKeyLength = 64;
// Pickle bytes and VM memory allowed per permitted tensor. A torchvision entry (name, rebuild call,
// persistent id, size/stride tuples, memo entries, its module's _metadata) takes ~100 bytes of pickle
// and ~100 cells of 16 bytes; the limits leave 5-10x headroom.
constexpr uint64_t kPickleBytesPerTensor = 1024;
constexpr uint64_t kPickleCellsPerTensor = 512;
constexpr uint64_t kPickleSlack = 1 << 20;
// Costs in 16-byte cells of what the VM allocates.
constexpr uint64_t kCellsPerObject = 2;  // a pool slot: vector or string header
constexpr uint64_t kCellsPerDict = 10;   // items vector and two index maps
constexpr uint64_t kCellsPerMemoEntry = 3;

[[noreturn]] void fail(const std::string& context, const std::string& what) { throw CheckpointError(context + what); }

std::string hex_byte(uint8_t b) {
  static const char* digits = "0123456789abcdef";
  return std::string("0x") + digits[b >> 4] + digits[b & 15];
}

// Names come from the file: cut and escape them so a message stays one readable line.
std::string quote_name(const std::string& s) {
  std::string out = "'";
  for (size_t i = 0; i < s.size() && i < 200; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7f && c != '\\') {
      out += static_cast<char>(c);
    } else {
      out += "\\x" + hex_byte(c).substr(2);
    }
  }
  if (s.size() > 200) out += "...";
  return out + "'";
}

uint16_t le16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
uint32_t le32(const uint8_t* p) { return static_cast<uint32_t>(le16(p)) | (static_cast<uint32_t>(le16(p + 2)) << 16); }
uint64_t le64(const uint8_t* p) { return static_cast<uint64_t>(le32(p)) | (static_cast<uint64_t>(le32(p + 4)) << 32); }

bool mul_overflows(uint64_t a, uint64_t b, uint64_t& out) { return __builtin_mul_overflow(a, b, &out); }
bool add_overflows(uint64_t a, uint64_t b, uint64_t& out) { return __builtin_add_overflow(a, b, &out); }

std::string dtype_label(c10::ScalarType dtype) {
  std::string s = c10::toString(dtype);
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// ---------------------------------------------------------------------------------------------------
// Pickle values. Everything that is not a scalar lives in a pool owned by the Heap and is referred to by
// index, so memo cycles and deep nesting cost neither leaks nor recursive destruction.

enum class Kind : uint8_t { None, Bool, Int, BigInt, Float, Str, Bytes, Tuple, List, Dict, Global, Storage, Tensor };

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::None:
      return "None";
    case Kind::Bool:
      return "bool";
    case Kind::Int:
      return "int";
    case Kind::BigInt:
      return "big int";
    case Kind::Float:
      return "float";
    case Kind::Str:
      return "str";
    case Kind::Bytes:
      return "bytes";
    case Kind::Tuple:
      return "tuple";
    case Kind::List:
      return "list";
    case Kind::Dict:
      return "dict";
    case Kind::Global:
      return "global";
    case Kind::Storage:
      return "storage";
    case Kind::Tensor:
      return "tensor";
  }
  return "?";
}

struct Value {
  Kind kind = Kind::None;
  union {
    int64_t i = 0;  // Int/Bool value, or the pool index of every non-scalar kind
    double f;
  };
};

enum class GlobalId { OrderedDict, RebuildTensorV2, RebuildTensor, RebuildParameter, StorageType };

struct Global {
  GlobalId id;
  c10::ScalarType dtype;  // StorageType only
  std::string qualified;
};

struct DictObject {
  std::vector<std::pair<Value, Value>> items;           // insertion order is the file order of the state dict
  std::unordered_map<std::string_view, size_t> by_str;  // views into Heap::strings
  std::unordered_map<int64_t, size_t> by_int;
};

// One typed window on a storage: the legacy format's storage views make offset/length non-trivial.
struct StorageRef {
  size_t storage;
  c10::ScalarType dtype;
  uint64_t byte_offset;
  uint64_t byte_length;
};

struct TensorDesc {
  StorageRef storage;
  int64_t offset;
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;
};

// What one checkpoint's pickles may build together, derived from CheckpointLimits::max_tensors.
struct Budget {
  uint64_t cells_left;
  size_t max_tensors;
};

struct Heap {
  std::deque<std::string> strings;  // Str, Bytes, BigInt (little-endian two's complement); never moved
  std::vector<std::vector<Value>> seqs;
  std::vector<DictObject> dicts;
  std::vector<Global> globals;
  std::vector<StorageRef> storages;
  std::vector<TensorDesc> tensors;

  const std::string& str(const Value& v) const { return strings[static_cast<size_t>(v.i)]; }
  const std::vector<Value>& seq(const Value& v) const { return seqs[static_cast<size_t>(v.i)]; }
  const DictObject& dict(const Value& v) const { return dicts[static_cast<size_t>(v.i)]; }
  const Global& global(const Value& v) const { return globals[static_cast<size_t>(v.i)]; }

  const Value* find(const DictObject& d, const std::string& key) const {
    auto it = d.by_str.find(std::string_view(key));
    return it == d.by_str.end() ? nullptr : &d.items[it->second].second;
  }
};

Value make(Kind kind, size_t index) {
  Value v;
  v.kind = kind;
  v.i = static_cast<int64_t>(index);
  return v;
}

const std::unordered_map<std::string, c10::ScalarType>& storage_types() {
  static const std::unordered_map<std::string, c10::ScalarType> types = {
      {"DoubleStorage", c10::kDouble},
      {"FloatStorage", c10::kFloat},
      {"HalfStorage", c10::kHalf},
      {"BFloat16Storage", c10::kBFloat16},
      {"LongStorage", c10::kLong},
      {"IntStorage", c10::kInt},
      {"ShortStorage", c10::kShort},
      {"CharStorage", c10::kChar},
      {"ByteStorage", c10::kByte},
      {"BoolStorage", c10::kBool},
      {"ComplexFloatStorage", c10::kComplexFloat},
      {"ComplexDoubleStorage", c10::kComplexDouble},
  };
  return types;
}

// ---------------------------------------------------------------------------------------------------
// The pickle VM: only what torch.save of a state dict emits (protocols 2-5). Nothing is ever called
// except the whitelisted rebuilders, which are interpreted here rather than looked up.

class Unpickler {
 public:
  using PersistentLoad = std::function<Value(const Value& pid)>;

  // `context` begins every message (file name, and the record for zip archives). The pickle starts at
  // `start`; offsets in messages count from `data`, i.e. they are file offsets in the legacy format.
  Unpickler(std::string context, const uint8_t* data, size_t size, size_t start, Heap& heap, Budget& budget,
            PersistentLoad persistent_load)
      : context_(std::move(context)),
        data_(data),
        size_(size),
        pos_(start),
        heap_(heap),
        budget_(budget),
        persistent_load_(std::move(persistent_load)) {}

  Value run() {
    while (true) {
      if (pos_ >= size_) fail(context_, "truncated: pickle ends at offset " + offset(pos_) + " without a STOP opcode");
      op_at_ = pos_;
      const uint8_t op = data_[pos_++];
      if (op == '.') {
        if (stack_.size() != 1 || !marks_.empty()) {
          malformed("STOP with " + std::to_string(stack_.size()) + " values on the stack");
        }
        return stack_.back();
      }
      step(op);
    }
  }

  size_t end() const { return pos_; }

 private:
  static std::string offset(size_t pos) { return std::to_string(pos); }

  [[noreturn]] void malformed(const std::string& what) const {
    fail(context_,
         "malformed pickle at offset " + offset(op_at_) + " (opcode " + hex_byte(data_[op_at_]) + "): " + what);
  }

  const uint8_t* take(uint64_t n) {
    if (size_ - pos_ < n) {
      fail(context_, "truncated: pickle opcode " + hex_byte(data_[op_at_]) + " at offset " + offset(op_at_) +
                         " needs " + std::to_string(n) + " more bytes, " + std::to_string(size_ - pos_) + " left");
    }
    const uint8_t* p = data_ + pos_;
    pos_ += n;
    return p;
  }

  void charge(uint64_t cells) {
    if (cells > budget_.cells_left)
      fail(context_, "pickle too large: it builds more objects than the tensor limit allows");
    budget_.cells_left -= cells;
  }

  void push(const Value& v) {
    if (stack_.size() >= kMaxStackDepth) malformed("stack deeper than " + std::to_string(kMaxStackDepth));
    stack_.push_back(v);
  }

  // Like CPython, a pop never reaches below the innermost MARK.
  Value pop() {
    const size_t fence = marks_.empty() ? 0 : marks_.back();
    if (stack_.size() <= fence) malformed("stack underflow");
    Value v = stack_.back();
    stack_.pop_back();
    return v;
  }

  Value& top() {
    const size_t fence = marks_.empty() ? 0 : marks_.back();
    if (stack_.size() <= fence) malformed("stack underflow");
    return stack_.back();
  }

  std::vector<Value> pop_to_mark() {
    if (marks_.empty()) malformed("no MARK to pop to");
    const size_t mark = marks_.back();
    marks_.pop_back();
    std::vector<Value> items(stack_.begin() + static_cast<std::ptrdiff_t>(mark), stack_.end());
    stack_.resize(mark);
    return items;
  }

  Value new_string(Kind kind, const uint8_t* p, uint64_t n) {
    charge(kCellsPerObject + n / 16);
    heap_.strings.emplace_back(reinterpret_cast<const char*>(p), static_cast<size_t>(n));
    return make(kind, heap_.strings.size() - 1);
  }

  Value new_seq(Kind kind, std::vector<Value> items) {
    charge(kCellsPerObject + items.size());
    heap_.seqs.push_back(std::move(items));
    return make(kind, heap_.seqs.size() - 1);
  }

  Value new_dict() {
    charge(kCellsPerDict);
    heap_.dicts.emplace_back();
    return make(Kind::Dict, heap_.dicts.size() - 1);
  }

  Value new_int(int64_t i) {
    Value v;
    v.kind = Kind::Int;
    v.i = i;
    return v;
  }

  void push_string(Kind kind, uint64_t n) {
    const uint8_t* p = take(n);
    push(new_string(kind, p, n));
  }

  std::vector<Value>& list_at_top() {
    Value& target = top();
    if (target.kind != Kind::List) malformed("append to a " + std::string(kind_name(target.kind)));
    return heap_.seqs[static_cast<size_t>(target.i)];
  }

  void set_item(const Value& dict_value, const Value& key, const Value& value) {
    if (dict_value.kind != Kind::Dict) malformed("set item on a " + std::string(kind_name(dict_value.kind)));
    charge(6);  // the item pair and its index entry
    DictObject& d = heap_.dicts[static_cast<size_t>(dict_value.i)];
    size_t* slot = nullptr;
    size_t fresh = d.items.size();
    if (key.kind == Kind::Str) {
      slot = &d.by_str.emplace(std::string_view(heap_.str(key)), fresh).first->second;
    } else if (key.kind == Kind::Int) {
      slot = &d.by_int.emplace(key.i, fresh).first->second;
    } else {
      malformed(std::string("dict key of unsupported type ") + kind_name(key.kind));
    }
    // A repeated key keeps its first position and takes the last value, as in Python.
    if (*slot == fresh) {
      d.items.emplace_back(key, value);
    } else {
      d.items[*slot].second = value;
    }
  }

  std::string read_line() {
    const size_t start = pos_;
    while (pos_ < size_ && data_[pos_] != '\n') {
      if (pos_ - start >= kMaxGlobalLength) malformed("GLOBAL name longer than " + std::to_string(kMaxGlobalLength));
      ++pos_;
    }
    if (pos_ >= size_) fail(context_, "truncated: pickle ends inside the GLOBAL at offset " + offset(op_at_));
    std::string line(reinterpret_cast<const char*>(data_ + start), pos_ - start);
    ++pos_;
    return line;
  }

  Value resolve_global(const std::string& module, const std::string& name) {
    Global g{GlobalId::OrderedDict, c10::kFloat, module + "." + name};
    bool known = false;
    if (module == "collections" && name == "OrderedDict") {
      known = true;
    } else if (module == "torch._utils") {
      known = true;
      if (name == "_rebuild_tensor_v2") {
        g.id = GlobalId::RebuildTensorV2;
      } else if (name == "_rebuild_tensor") {
        g.id = GlobalId::RebuildTensor;
      } else if (name == "_rebuild_parameter") {
        g.id = GlobalId::RebuildParameter;
      } else {
        known = false;
      }
    } else if (module == "torch") {
      auto it = storage_types().find(name);
      if (it != storage_types().end()) {
        known = true;
        g.id = GlobalId::StorageType;
        g.dtype = it->second;
      }
    }
    if (!known) {
      fail(context_, "global " + quote_name(g.qualified) + " at offset " + offset(op_at_) +
                         " is not allowed (a state dict needs only collections.OrderedDict, torch._utils tensor "
                         "rebuilders and torch.*Storage types)");
    }
    charge(kCellsPerObject + 2);
    heap_.globals.push_back(std::move(g));
    return make(Kind::Global, heap_.globals.size() - 1);
  }

  int64_t int_arg(const Value& v, const char* what) {
    if (v.kind != Kind::Int) malformed(std::string(what) + " is a " + kind_name(v.kind) + ", expected an int");
    if (v.i < 0) malformed(std::string(what) + " is negative");
    return v.i;
  }

  std::vector<int64_t> int_tuple(const Value& v, const char* what) {
    if (v.kind != Kind::Tuple) malformed(std::string(what) + " is a " + kind_name(v.kind) + ", expected a tuple");
    const auto& items = heap_.seq(v);
    if (items.size() > kMaxDims) malformed(std::string(what) + " has more than " + std::to_string(kMaxDims) + " dims");
    std::vector<int64_t> out;
    for (const auto& item : items) out.push_back(int_arg(item, what));
    return out;
  }

  Value rebuild_tensor(const std::vector<Value>& args) {
    if (args[0].kind != Kind::Storage) malformed(std::string("tensor rebuilt from a ") + kind_name(args[0].kind));
    TensorDesc t{heap_.storages[static_cast<size_t>(args[0].i)], int_arg(args[1], "storage offset"),
                 int_tuple(args[2], "tensor size"), int_tuple(args[3], "tensor stride")};
    if (t.sizes.size() != t.strides.size()) malformed("tensor size and stride differ in length");
    if (heap_.tensors.size() >= budget_.max_tensors) {
      fail(context_, "more than " + std::to_string(budget_.max_tensors) + " tensors (the limit)");
    }
    charge(6 + t.sizes.size());
    heap_.tensors.push_back(std::move(t));
    return make(Kind::Tensor, heap_.tensors.size() - 1);
  }

  void reduce() {
    const Value args_value = pop();
    const Value callable = pop();
    if (callable.kind != Kind::Global) malformed(std::string("REDUCE calls a ") + kind_name(callable.kind));
    if (args_value.kind != Kind::Tuple) malformed(std::string("REDUCE arguments are a ") + kind_name(args_value.kind));
    const std::vector<Value>& args = heap_.seq(args_value);
    const Global& g = heap_.global(callable);
    auto expect_args = [&](size_t lo, size_t hi) {
      if (args.size() < lo || args.size() > hi) {
        malformed(g.qualified + " called with " + std::to_string(args.size()) + " arguments");
      }
    };
    switch (g.id) {
      case GlobalId::OrderedDict:
        expect_args(0, 0);
        push(new_dict());
        return;
      case GlobalId::RebuildTensorV2:
        // (storage, offset, size, stride, requires_grad, backward_hooks[, metadata])
        expect_args(6, 7);
        if (args[4].kind != Kind::Bool) malformed("requires_grad is not a bool");
        if (args[5].kind != Kind::Dict) malformed("backward_hooks is not a dict");
        if (args.size() == 7 && args[6].kind != Kind::Dict && args[6].kind != Kind::None) {
          malformed("tensor metadata is not a dict");
        }
        push(rebuild_tensor(args));
        return;
      case GlobalId::RebuildTensor:
        expect_args(4, 4);
        push(rebuild_tensor(args));
        return;
      case GlobalId::RebuildParameter:
        // (data, requires_grad, backward_hooks): a Parameter is its tensor for a state dict.
        expect_args(3, 3);
        if (args[0].kind != Kind::Tensor) malformed("parameter data is not a tensor");
        push(args[0]);
        return;
      case GlobalId::StorageType:
        malformed(g.qualified + " cannot be called");
    }
  }

  void memo_put(uint64_t index) {
    const Value& v = top();
    if (memo_.find(index) == memo_.end()) charge(kCellsPerMemoEntry);
    memo_[index] = v;
  }

  void memo_get(uint64_t index) {
    auto it = memo_.find(index);
    if (it == memo_.end()) malformed("memo entry " + std::to_string(index) + " was never stored");
    push(it->second);
  }

  void step(uint8_t op) {
    switch (op) {
      case 0x80: {  // PROTO
        const uint8_t version = *take(1);
        if (version < 2 || version > 5) malformed("unsupported pickle protocol " + std::to_string(version));
        return;
      }
      case 0x95: {  // FRAME: a length hint for buffered readers; the data is already in memory
        const uint64_t n = le64(take(8));
        if (n > size_ - pos_) {
          fail(context_, "truncated: pickle frame at offset " + offset(op_at_) + " needs " + std::to_string(n) +
                             " bytes, " + std::to_string(size_ - pos_) + " left");
        }
        return;
      }
      case '(':  // MARK
        if (marks_.size() >= kMaxMarkDepth) malformed("MARKs nested deeper than " + std::to_string(kMaxMarkDepth));
        marks_.push_back(stack_.size());
        return;
      case 'N':
        push(Value{});
        return;
      case 0x88:    // NEWTRUE
      case 0x89: {  // NEWFALSE
        Value v;
        v.kind = Kind::Bool;
        v.i = op == 0x88;
        push(v);
        return;
      }
      case 'K':  // BININT1
        push(new_int(*take(1)));
        return;
      case 'M':  // BININT2
        push(new_int(le16(take(2))));
        return;
      case 'J':  // BININT
        push(new_int(static_cast<int32_t>(le32(take(4)))));
        return;
      case 0x8a: {  // LONG1: little-endian two's complement of n bytes
        const uint8_t n = *take(1);
        const uint8_t* p = take(n);
        if (n > 8) {
          push(new_string(Kind::BigInt, p, n));
          return;
        }
        uint64_t u = 0;
        for (int k = n - 1; k >= 0; --k) u = (u << 8) | p[k];
        if (n > 0 && n < 8 && (p[n - 1] & 0x80)) u |= ~uint64_t{0} << (8 * n);
        push(new_int(static_cast<int64_t>(u)));
        return;
      }
      case 'G': {  // BINFLOAT: big-endian double
        const uint8_t* p = take(8);
        uint64_t bits = 0;
        for (int k = 0; k < 8; ++k) bits = (bits << 8) | p[k];
        Value v;
        v.kind = Kind::Float;
        std::memcpy(&v.f, &bits, sizeof v.f);
        push(v);
        return;
      }
      case 'X':  // BINUNICODE
        push_string(Kind::Str, le32(take(4)));
        return;
      case 0x8c:  // SHORT_BINUNICODE
        push_string(Kind::Str, *take(1));
        return;
      case 0x8d:  // BINUNICODE8
        push_string(Kind::Str, le64(take(8)));
        return;
      case 'T': {  // BINSTRING: Python 2 str, as in checkpoints written by Python 2
        const int32_t n = static_cast<int32_t>(le32(take(4)));
        if (n < 0) malformed("negative string length");
        push_string(Kind::Str, static_cast<uint64_t>(n));
        return;
      }
      case 'U':  // SHORT_BINSTRING
        push_string(Kind::Str, *take(1));
        return;
      case 'B':  // BINBYTES
        push_string(Kind::Bytes, le32(take(4)));
        return;
      case 'C':  // SHORT_BINBYTES
        push_string(Kind::Bytes, *take(1));
        return;
      case 0x8e:  // BINBYTES8
        push_string(Kind::Bytes, le64(take(8)));
        return;
      case ')':
        push(new_seq(Kind::Tuple, {}));
        return;
      case 't':
        push(new_seq(Kind::Tuple, pop_to_mark()));
        return;
      case 0x85:    // TUPLE1
      case 0x86:    // TUPLE2
      case 0x87: {  // TUPLE3
        std::vector<Value> items(static_cast<size_t>(op - 0x84));
        for (size_t k = items.size(); k-- > 0;) items[k] = pop();
        push(new_seq(Kind::Tuple, std::move(items)));
        return;
      }
      case ']':
        push(new_seq(Kind::List, {}));
        return;
      case 'l':
        push(new_seq(Kind::List, pop_to_mark()));
        return;
      case 'a': {  // APPEND
        const Value v = pop();
        charge(1);
        list_at_top().push_back(v);
        return;
      }
      case 'e': {  // APPENDS
        std::vector<Value> items = pop_to_mark();
        charge(items.size());
        auto& list = list_at_top();
        list.insert(list.end(), items.begin(), items.end());
        return;
      }
      case '}':
        push(new_dict());
        return;
      case 'd': {  // DICT
        std::vector<Value> items = pop_to_mark();
        if (items.size() % 2) malformed("DICT with an odd number of items");
        const Value d = new_dict();
        for (size_t k = 0; k < items.size(); k += 2) set_item(d, items[k], items[k + 1]);
        push(d);
        return;
      }
      case 's': {  // SETITEM
        const Value value = pop();
        const Value key = pop();
        set_item(top(), key, value);
        return;
      }
      case 'u': {  // SETITEMS
        std::vector<Value> items = pop_to_mark();
        if (items.size() % 2) malformed("SETITEMS with an odd number of items");
        const Value d = top();
        for (size_t k = 0; k < items.size(); k += 2) set_item(d, items[k], items[k + 1]);
        return;
      }
      case 'c': {  // GLOBAL
        const std::string module = read_line();
        const std::string name = read_line();
        push(resolve_global(module, name));
        return;
      }
      case 0x93: {  // STACK_GLOBAL
        const Value name = pop();
        const Value module = pop();
        if (name.kind != Kind::Str || module.kind != Kind::Str) malformed("STACK_GLOBAL operands are not strings");
        push(resolve_global(heap_.str(module), heap_.str(name)));
        return;
      }
      case 'R':
        reduce();
        return;
      case 'b': {  // BUILD: the only state a state dict carries is OrderedDict's _metadata attribute
        const Value state = pop();
        const Value& target = top();
        if (target.kind != Kind::Dict) malformed(std::string("BUILD on a ") + kind_name(target.kind));
        if (state.kind != Kind::Dict && state.kind != Kind::None) {
          malformed(std::string("BUILD with a ") + kind_name(state.kind) + " state");
        }
        return;
      }
      case 'Q': {  // BINPERSID
        const Value pid = pop();
        if (!persistent_load_) malformed("persistent id outside the object pickle");
        charge(kCellsPerObject);
        push(persistent_load_(pid));
        return;
      }
      case 'q':  // BINPUT
        memo_put(*take(1));
        return;
      case 'r':  // LONG_BINPUT
        memo_put(le32(take(4)));
        return;
      case 0x94:  // MEMOIZE
        memo_put(memo_.size());
        return;
      case 'h':  // BINGET
        memo_get(*take(1));
        return;
      case 'j':  // LONG_BINGET
        memo_get(le32(take(4)));
        return;
      default:
        fail(context_, "unsupported pickle opcode " + hex_byte(op) + " at offset " + offset(op_at_));
    }
  }

  std::string context_;
  const uint8_t* data_;
  size_t size_;
  size_t pos_;
  size_t op_at_ = 0;
  Heap& heap_;
  Budget& budget_;
  PersistentLoad persistent_load_;
  std::vector<Value> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, Value> memo_;
};

// ---------------------------------------------------------------------------------------------------
// Storages named by persistent ids ('storage', torch.<T>Storage, key, location, numel[, view_metadata]).

struct StorageInfo {
  std::string key;
  uint64_t numel;  // in elements of the first reference's type, which the legacy data section counts in
  uint64_t nbytes;
  const uint8_t* legacy_data = nullptr;
};

class StorageTable {
 public:
  using OnNew = std::function<void(const StorageInfo&)>;

  StorageTable(std::string name, const CheckpointLimits& limits, bool legacy, OnNew on_new)
      : name_(std::move(name)), limits_(limits), legacy_(legacy), on_new_(std::move(on_new)) {}

  // How messages name a storage: its zip record, or its key in the legacy format.
  std::string display(const std::string& key) const { return quote_name(legacy_ ? key : "data/" + key); }
  std::string display(size_t index) const { return display(entries[index].key); }

  Value declare(Heap& heap, const Value& pid) {
    const std::string ctx = name_ + ": ";
    if (pid.kind != Kind::Tuple)
      fail(ctx, std::string("persistent id is a ") + kind_name(pid.kind) + ", expected a tuple");
    const auto& items = heap.seq(pid);
    if (items.size() < 5 || items.size() > (legacy_ ? 6u : 5u)) {
      fail(ctx, "persistent id tuple has " + std::to_string(items.size()) + " items");
    }
    if (items[0].kind != Kind::Str || heap.str(items[0]) != "storage")
      fail(ctx, "persistent id is not a 'storage' record");
    if (items[1].kind != Kind::Global || heap.global(items[1]).id != GlobalId::StorageType) {
      fail(ctx, "persistent id names no torch storage type");
    }
    const c10::ScalarType dtype = heap.global(items[1]).dtype;
    const uint64_t element_size = c10::elementSize(dtype);
    const std::string key = storage_key(heap, items[2]);
    if (items[3].kind != Kind::Str) fail(ctx, "storage " + display(key) + " location is not a string");
    if (items[4].kind != Kind::Int || items[4].i < 0) fail(ctx, "storage " + display(key) + " has an invalid size");
    const auto numel = static_cast<uint64_t>(items[4].i);
    uint64_t nbytes = 0;
    if (mul_overflows(numel, element_size, nbytes) || nbytes > limits_.max_tensor_bytes) {
      fail(ctx, "storage " + display(key) + " of " + std::to_string(numel) + " " + dtype_label(dtype) +
                    " elements exceeds the limit of " + std::to_string(limits_.max_tensor_bytes) + " bytes");
    }

    size_t index;
    auto it = by_key_.find(key);
    if (it == by_key_.end()) {
      index = entries.size();
      entries.push_back(StorageInfo{key, numel, nbytes});
      by_key_.emplace(key, index);
      on_new_(entries.back());
    } else {
      index = it->second;
      if (entries[index].nbytes != nbytes) {
        fail(ctx, "storage " + display(key) + " is declared with " + std::to_string(entries[index].nbytes) + " and " +
                      std::to_string(nbytes) + " bytes");
      }
    }

    StorageRef ref{index, dtype, 0, nbytes};
    if (items.size() == 6 && items[5].kind != Kind::None) {
      // Legacy storage view (view_key, offset, size), counted in elements of this storage's type.
      const Value& view = items[5];
      if (view.kind != Kind::Tuple || heap.seq(view).size() != 3)
        fail(ctx, "storage " + display(key) + " has invalid view metadata");
      const auto& v = heap.seq(view);
      storage_key(heap, v[0]);
      if (v[1].kind != Kind::Int || v[2].kind != Kind::Int || v[1].i < 0 || v[2].i < 0) {
        fail(ctx, "storage " + display(key) + " has invalid view metadata");
      }
      const auto view_offset = static_cast<uint64_t>(v[1].i);
      const auto view_size = static_cast<uint64_t>(v[2].i);
      if (view_offset > numel || view_size > numel - view_offset) {
        fail(ctx, "storage view of " + display(key) + " exceeds its storage");
      }
      ref.byte_offset = view_offset * element_size;
      ref.byte_length = view_size * element_size;
    }
    heap.storages.push_back(ref);
    return make(Kind::Storage, heap.storages.size() - 1);
  }

  size_t find(const std::string& key) const {
    auto it = by_key_.find(key);
    return it == by_key_.end() ? entries.size() : it->second;
  }

  std::vector<StorageInfo> entries;

 private:
  // Keys become zip record names: torch writes decimal numbers, anything path-like is refused.
  std::string storage_key(const Heap& heap, const Value& v) const {
    if (v.kind != Kind::Str) fail(name_ + ": ", "storage key is not a string");
    const std::string& key = heap.str(v);
    const bool ok = !key.empty() && key.size() <= kMaxStorageKeyLength &&
                    std::all_of(key.begin(), key.end(),
                                [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; });
    if (!ok) fail(name_ + ": ", "invalid storage key " + quote_name(key));
    return key;
  }

  std::string name_;
  const CheckpointLimits& limits_;
  bool legacy_;
  OnNew on_new_;
  std::unordered_map<std::string, size_t> by_key_;
};

// ---------------------------------------------------------------------------------------------------
// Turning the unpickled object into tensors.

class StorageSource {
 public:
  virtual ~StorageSource() = default;
  // Bytes of the whole storage (StorageInfo::nbytes of them), valid until release().
  virtual const uint8_t* acquire(size_t storage) = 0;
  virtual void release(size_t storage) = 0;
  // The storage's own aligned buffer, handed over for a tensor to keep; empty where there is none.
  virtual at::DataPtr take(size_t /*storage*/) { return {}; }
};

bool is_contiguous(const TensorDesc& t) {
  int64_t expected = 1;
  for (size_t d = t.sizes.size(); d-- > 0;) {
    if (t.sizes[d] == 1) continue;
    if (t.strides[d] != expected) return false;
    expected *= t.sizes[d];
  }
  return true;
}

struct CheckedView {
  uint64_t numel;
  uint64_t extent;  // elements spanned in the storage from the offset on
};

CheckedView check_view(const std::string& name, const std::string& tensor, const TensorDesc& t,
                       const StorageTable& table, const CheckpointLimits& limits) {
  const std::string ctx = name + ": tensor " + quote_name(tensor) + " ";
  const uint64_t element_size = c10::elementSize(t.storage.dtype);
  uint64_t numel = 1;
  for (int64_t s : t.sizes) {
    if (mul_overflows(numel, static_cast<uint64_t>(s), numel)) fail(ctx, "has an absurd shape");
  }
  uint64_t nbytes = 0;
  if (mul_overflows(numel, element_size, nbytes) || nbytes > limits.max_tensor_bytes) {
    fail(ctx, "of " + std::to_string(numel) + " elements exceeds the limit of " +
                  std::to_string(limits.max_tensor_bytes) + " bytes");
  }
  if (numel == 0) return {0, 0};
  uint64_t last = 0;  // index of the last element relative to the offset
  for (size_t d = 0; d < t.sizes.size(); ++d) {
    uint64_t span = 0;
    if (mul_overflows(static_cast<uint64_t>(t.sizes[d] - 1), static_cast<uint64_t>(t.strides[d]), span) ||
        add_overflows(last, span, last)) {
      fail(ctx, "view exceeds its storage");
    }
  }
  const uint64_t storage_numel = t.storage.byte_length / element_size;
  uint64_t end = 0;
  if (add_overflows(static_cast<uint64_t>(t.offset), last, end) || end >= storage_numel) {
    fail(ctx, "view exceeds its storage " + table.display(t.storage.storage) + ": it reaches element " +
                  std::to_string(static_cast<uint64_t>(t.offset) + last) + " of " + std::to_string(storage_numel));
  }
  return {numel, last + 1};
}

// Any byte but 0/1 would be an invalid bool for every kernel that reads it, copy_ included.
void normalize_bools(uint8_t* p, uint64_t count) {
  for (uint64_t k = 0; k < count; ++k) p[k] = p[k] != 0;
}

// A tensor that is its whole storage, contiguously, can keep the storage's buffer instead of a copy.
bool is_whole_storage(const TensorDesc& t, const CheckedView& view, const StorageTable& table) {
  return view.numel > 0 && t.offset == 0 && t.storage.byte_offset == 0 && is_contiguous(t) &&
         view.numel * c10::elementSize(t.storage.dtype) == table.entries[t.storage.storage].nbytes;
}

torch::Tensor adopt(at::DataPtr buffer, const TensorDesc& t, const CheckedView& view) {
  auto holder = std::make_shared<at::DataPtr>(std::move(buffer));
  auto* data = static_cast<uint8_t*>(holder->get());
  if (t.storage.dtype == c10::kBool) normalize_bools(data, view.numel);
  return torch::from_blob(
      data, t.sizes, [holder](void*) {}, torch::TensorOptions().dtype(t.storage.dtype));
}

torch::Tensor materialize(const TensorDesc& t, const CheckedView& view, const uint8_t* storage_bytes) {
  const auto options = torch::TensorOptions().dtype(t.storage.dtype);
  torch::Tensor out = torch::empty(t.sizes, options);
  if (view.numel == 0) return out;
  const size_t element_size = c10::elementSize(t.storage.dtype);
  const uint8_t* src = storage_bytes + t.storage.byte_offset + static_cast<uint64_t>(t.offset) * element_size;
  auto copy_raw = [&](void* dst, uint64_t count) {
    std::memcpy(dst, src, count * element_size);
    if (t.storage.dtype == c10::kBool) normalize_bools(static_cast<uint8_t*>(dst), count);
  };
  if (is_contiguous(t)) {
    copy_raw(out.data_ptr(), view.numel);
  } else {
    // Copied to an aligned buffer first: legacy storages sit at arbitrary offsets in the file.
    torch::Tensor span = torch::empty({static_cast<int64_t>(view.extent)}, options);
    copy_raw(span.data_ptr(), view.extent);
    out.copy_(span.as_strided(t.sizes, t.strides));
  }
  return out;
}

StateDict assemble(const std::string& name, const Heap& heap, const Value& root, const StorageTable& table,
                   StorageSource& source, const CheckpointLimits& limits) {
  const std::string ctx = name + ": ";
  if (root.kind != Kind::Dict)
    fail(ctx, std::string("checkpoint holds a ") + kind_name(root.kind) + ", not a state dict");
  const DictObject* dict = &heap.dict(root);
  for (const char* wrapper : {"state_dict", "model"}) {
    const Value* inner = heap.find(*dict, wrapper);
    if (inner && inner->kind == Kind::Dict) {
      dict = &heap.dict(*inner);
      break;
    }
  }

  struct Entry {
    std::string name;
    const TensorDesc* desc;
    CheckedView view;
  };
  std::vector<Entry> entries;
  std::vector<size_t> uses(table.entries.size(), 0);
  for (size_t k = 0; k < dict->items.size(); ++k) {
    const auto& [key, value] = dict->items[k];
    if (key.kind != Kind::Str)
      fail(ctx, "state dict key #" + std::to_string(k) + " is a " + kind_name(key.kind) + ", not a string");
    const std::string& tensor_name = heap.str(key);
    if (value.kind != Kind::Tensor) {
      fail(ctx, "entry " + quote_name(tensor_name) + " is a " + kind_name(value.kind) + ", not a tensor");
    }
    const TensorDesc& desc = heap.tensors[static_cast<size_t>(value.i)];
    entries.push_back({tensor_name, &desc, check_view(name, tensor_name, desc, table, limits)});
    ++uses[desc.storage.storage];
  }

  const std::string prefix = "module.";
  const bool strip = !entries.empty() && std::all_of(entries.begin(), entries.end(), [&](const Entry& e) {
    return e.name.compare(0, prefix.size(), prefix) == 0;
  });

  StateDict out;
  out.reserve(entries.size());
  for (const Entry& e : entries) {
    const size_t storage = e.desc->storage.storage;
    torch::Tensor tensor;
    if (uses[storage] == 1 && is_whole_storage(*e.desc, e.view, table)) {
      if (at::DataPtr buffer = source.take(storage)) tensor = adopt(std::move(buffer), *e.desc, e.view);
    }
    if (!tensor.defined()) tensor = materialize(*e.desc, e.view, source.acquire(storage));
    if (--uses[storage] == 0) source.release(storage);
    out.emplace_back(strip ? e.name.substr(prefix.size()) : e.name, std::move(tensor));
  }
  return out;
}

Budget pickle_budget(const CheckpointLimits& limits) {
  return {kPickleCellsPerTensor * static_cast<uint64_t>(limits.max_tensors) + kPickleSlack, limits.max_tensors};
}

// ---------------------------------------------------------------------------------------------------
// Legacy format.

class LegacySource : public StorageSource {
 public:
  explicit LegacySource(const StorageTable& table) : table_(table) {}
  const uint8_t* acquire(size_t storage) override { return table_.entries[storage].legacy_data; }
  void release(size_t) override {}

 private:
  const StorageTable& table_;
};

StateDict load_legacy(const std::string& bytes, const std::string& name, const CheckpointLimits& limits) {
  const auto* data = reinterpret_cast<const uint8_t*>(bytes.data());
  const size_t size = bytes.size();
  const std::string ctx = name + ": ";
  Heap heap;
  Budget budget = pickle_budget(limits);
  size_t pos = 0;
  auto next_pickle = [&](const std::string& context, Unpickler::PersistentLoad load) {
    Unpickler vm(context, data, size, pos, heap, budget, std::move(load));
    Value v = vm.run();
    pos = vm.end();
    return v;
  };

  static const uint8_t kMagic[] = {0x6c, 0xfc, 0x9c, 0x46, 0xf9,
                                   0x20, 0x6a, 0xa8, 0x50, 0x19};  // 0x1950a86a20f9469cfc6c
  const std::string not_checkpoint = ctx + "not a PyTorch checkpoint: ";
  const Value magic = next_pickle(not_checkpoint, nullptr);
  if (magic.kind != Kind::BigInt ||
      heap.str(magic) != std::string(reinterpret_cast<const char*>(kMagic), sizeof kMagic)) {
    fail(not_checkpoint, "the leading pickle is not the legacy torch.save magic number");
  }
  const Value protocol = next_pickle(ctx, nullptr);
  if (protocol.kind != Kind::Int || protocol.i != 1001) fail(ctx, "unsupported legacy serialization protocol");
  const Value sys_info = next_pickle(ctx, nullptr);
  if (sys_info.kind != Kind::Dict) fail(ctx, "legacy sys_info is not a dict");
  const Value* little = heap.find(heap.dict(sys_info), "little_endian");
  if (little && !(little->kind == Kind::Bool && little->i == 1)) fail(ctx, "big-endian checkpoints are not supported");

  // Storage sizes are checked against the data section below; nothing is allocated before that.
  StorageTable table(name, limits, true, [](const StorageInfo&) {});
  const Value root = next_pickle(ctx, [&](const Value& pid) { return table.declare(heap, pid); });
  const Value keys = next_pickle(ctx, nullptr);
  if (keys.kind != Kind::List) fail(ctx, "legacy storage key list is missing");

  for (const Value& key_value : heap.seq(keys)) {
    if (key_value.kind != Kind::Str)
      fail(ctx, "legacy storage key list holds a " + std::string(kind_name(key_value.kind)));
    const std::string& key = heap.str(key_value);
    const size_t index = table.find(key);
    if (index == table.entries.size()) fail(ctx, "storage " + quote_name(key) + " has data but no tensor refers to it");
    StorageInfo& s = table.entries[index];
    if (s.legacy_data) fail(ctx, "storage " + quote_name(key) + " has data twice");
    if (size - pos < 8) {
      fail(ctx, "truncated: storage " + quote_name(key) + " header at offset " + std::to_string(pos) +
                    " needs 8 bytes, has " + std::to_string(size - pos));
    }
    const auto count = static_cast<int64_t>(le64(data + pos));
    if (count < 0 || static_cast<uint64_t>(count) != s.numel) {
      fail(ctx, "storage " + quote_name(key) + " header at offset " + std::to_string(pos) + " says " +
                    std::to_string(count) + " elements, the pickle declares " + std::to_string(s.numel));
    }
    pos += 8;
    if (size - pos < s.nbytes) {
      fail(ctx, "truncated: storage " + quote_name(key) + " needs " + std::to_string(s.nbytes) + " bytes, has " +
                    std::to_string(size - pos));
    }
    s.legacy_data = data + pos;
    pos += s.nbytes;
  }
  for (const StorageInfo& s : table.entries) {
    if (!s.legacy_data) fail(ctx, "truncated: storage " + quote_name(s.key) + " has no data in the file");
  }
  if (pos != size)
    fail(ctx, std::to_string(size - pos) + " unexpected bytes after the last storage at offset " + std::to_string(pos));

  LegacySource source(table);
  return assemble(name, heap, root, table, source, limits);
}

// ---------------------------------------------------------------------------------------------------
// Zip format.

// CRC-32 (zip's polynomial), slicing by 8: the miniz inside libtorch is built without checksum checks,
// so a flipped bit in a record would otherwise load as a silently different weight.
uint32_t crc32(const uint8_t* p, uint64_t n) {
  static const auto tables = [] {
    std::array<std::array<uint32_t, 256>, 8> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
      t[0][i] = c;
    }
    for (size_t s = 1; s < 8; ++s)
      for (uint32_t i = 0; i < 256; ++i) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xff];
    return t;
  }();
  const auto& t = tables;
  uint32_t c = 0xffffffffu;
  for (; n >= 8; p += 8, n -= 8) {
    const uint32_t lo = le32(p) ^ c, hi = le32(p + 4);
    c = t[7][lo & 0xff] ^ t[6][(lo >> 8) & 0xff] ^ t[5][(lo >> 16) & 0xff] ^ t[4][lo >> 24] ^ t[3][hi & 0xff] ^
        t[2][(hi >> 8) & 0xff] ^ t[1][(hi >> 16) & 0xff] ^ t[0][hi >> 24];
  }
  for (; n > 0; ++p, --n) c = t[0][(c ^ *p) & 0xff] ^ (c >> 8);
  return ~c;
}

struct ZipRecord {
  uint64_t size;
  uint32_t crc;
  uint64_t local_header;
};
using ZipRecords = std::unordered_map<std::string, ZipRecord>;  // by name inside the archive folder

void check_crc(const std::string& name, const std::string& record, const ZipRecords& records, const void* data,
               uint64_t size) {
  if (crc32(static_cast<const uint8_t*>(data), size) != records.at(record).crc) {
    fail(name + ": ", "zip record " + quote_name(record) + " is corrupt (CRC-32 mismatch)");
  }
}

// miniz (inside PyTorchStreamReader) allocates a record's declared uncompressed size and inflates into it,
// so a small deflated record could claim gigabytes. torch.save only writes stored records: this scan of the
// central directory refuses anything else and learns each record's size before the reader touches it. It
// finds the directory the way miniz does (last end record, zip64 locator just before it).
ZipRecords scan_zip(const std::string& name, const uint8_t* d, uint64_t n, uint64_t max_records) {
  const std::string ctx = name + ": ";
  constexpr uint64_t kEndSize = 22, kLocatorSize = 20, kEnd64Size = 56, kEntrySize = 46, kLocalSize = 30;
  if (n < kEndSize) fail(ctx, "truncated: " + std::to_string(n) + " bytes is too short for a zip archive");
  uint64_t end = n - kEndSize;
  while (le32(d + end) != 0x06054b50) {
    if (end == 0 || n - kEndSize - end >= 0xffff) {
      fail(ctx, "truncated or corrupt zip archive: no end-of-central-directory record");
    }
    --end;
  }
  uint64_t disk = le16(d + end + 4), dir_disk = le16(d + end + 6);
  uint64_t entries_here = le16(d + end + 8), entries = le16(d + end + 10);
  uint64_t dir_size = le32(d + end + 12);
  uint64_t dir_offset = le32(d + end + 16);
  uint64_t dir_limit = end;
  if (end >= kLocatorSize && le32(d + end - kLocatorSize) == 0x07064b50) {
    const uint64_t end64 = le64(d + end - kLocatorSize + 8);
    if (end64 > end - kLocatorSize || end - kLocatorSize - end64 < kEnd64Size || le32(d + end64) != 0x06064b50) {
      fail(ctx, "corrupt zip archive: bad zip64 end-of-central-directory record");
    }
    disk = le32(d + end64 + 16);
    dir_disk = le32(d + end64 + 20);
    entries_here = le64(d + end64 + 24);
    entries = le64(d + end64 + 32);
    dir_size = le64(d + end64 + 40);
    dir_offset = le64(d + end64 + 48);
    dir_limit = end64;
  }
  // miniz accepts disk numbers 0/0 or 1/1 only.
  if ((disk != dir_disk || disk > 1) || entries_here != entries) fail(ctx, "multi-disk zip archives are not supported");
  uint64_t dir_end = 0;
  if (add_overflows(dir_offset, dir_size, dir_end) || dir_end > dir_limit) {
    fail(ctx, "truncated or corrupt zip archive: central directory lies outside the file");
  }
  if (entries > max_records)
    fail(ctx, "zip archive has " + std::to_string(entries) + " records, more than the tensor limit allows");

  ZipRecords records;
  std::string folder;
  uint64_t q = dir_offset;
  for (uint64_t k = 0; k < entries; ++k) {
    if (dir_end - q < kEntrySize || le32(d + q) != 0x02014b50)
      fail(ctx, "corrupt zip archive: bad central directory entry");
    const uint16_t flags = le16(d + q + 8);
    const uint16_t method = le16(d + q + 10);
    const uint32_t crc = le32(d + q + 16);
    uint64_t compressed = le32(d + q + 20);
    uint64_t uncompressed = le32(d + q + 24);
    const uint64_t name_len = le16(d + q + 28), extra_len = le16(d + q + 30), comment_len = le16(d + q + 32);
    const uint16_t first_disk = le16(d + q + 34);
    const uint32_t external_attributes = le32(d + q + 38);
    uint64_t local = le32(d + q + 42);
    if (dir_end - q - kEntrySize < name_len + extra_len + comment_len)
      fail(ctx, "corrupt zip archive: bad central directory entry");
    const std::string full(reinterpret_cast<const char*>(d + q + kEntrySize), name_len);
    // zip64 sizes and offset replace the 0xffffffff fields, in this order.
    const uint8_t* x = d + q + kEntrySize + name_len;
    for (uint64_t e = 0; e + 4 <= extra_len;) {
      const uint16_t id = le16(x + e), len = le16(x + e + 2);
      if (e + 4 + len > extra_len) break;
      if (id == 0x0001) {
        uint64_t f = e + 4;
        for (uint64_t* field : {&uncompressed, &compressed, &local}) {
          if (*field != 0xffffffffu) continue;
          if (f + 8 > e + 4 + len) fail(ctx, "corrupt zip archive: short zip64 field for " + quote_name(full));
          *field = le64(x + f);
          f += 8;
        }
      }
      e += 4 + len;
    }
    if (first_disk == 0xffff || (first_disk != disk && first_disk != 1))
      fail(ctx, "multi-disk zip archives are not supported");
    if (flags & 1) fail(ctx, "zip record " + quote_name(full) + " is encrypted");
    // miniz "extracts" a directory by returning success without writing the buffer.
    if ((!full.empty() && full.back() == '/') || (external_attributes & 0x10)) {
      fail(ctx, "zip record " + quote_name(full) + " is a directory");
    }
    if (method != 0) {
      fail(ctx, "zip record " + quote_name(full) + " is compressed (method " + std::to_string(method) +
                    "); torch.save stores records uncompressed");
    }
    uint64_t record_end = 0;
    if (compressed != uncompressed || add_overflows(local, kLocalSize + name_len, record_end) ||
        add_overflows(record_end, compressed, record_end) || record_end > dir_offset) {
      fail(ctx, "truncated or corrupt zip archive: record " + quote_name(full) +
                    " does not fit before the central directory");
    }
    // All records live in one folder, named by the first, which is where PyTorchStreamReader looks them up.
    const size_t slash = full.find('/');
    if (slash == std::string::npos) fail(ctx, "zip record " + quote_name(full) + " is not inside an archive folder");
    if (k == 0) folder = full.substr(0, slash + 1);
    if (full.compare(0, folder.size(), folder) != 0) {
      fail(ctx, "zip record " + quote_name(full) + " is outside the archive folder " + quote_name(folder));
    }
    const std::string relative = full.substr(folder.size());
    if (!records.emplace(relative, ZipRecord{uncompressed, crc, local}).second) {
      fail(ctx, "zip archive has two records named " + quote_name(relative));
    }
    q += kEntrySize + name_len + extra_len + comment_len;
  }
  return records;
}

// PyTorchStreamReader's constructor reads and parses the version record, and when that fails it throws
// without releasing miniz's state: a leak per damaged file. So the record is checked here first.
void check_version_record(const std::string& name, const uint8_t* d, uint64_t n, const ZipRecords& records) {
  const std::string ctx = name + ": ";
  const std::string record = records.count(".data/version") ? ".data/version" : "version";
  auto it = records.find(record);
  if (it == records.end()) fail(ctx, "zip archive has no version record: not a torch.save checkpoint");
  const ZipRecord& r = it->second;
  constexpr uint64_t kLocalSize = 30;
  if (n < kLocalSize || r.local_header > n - kLocalSize || le32(d + r.local_header) != 0x04034b50) {
    fail(ctx, "corrupt zip archive: bad local header for " + quote_name(record));
  }
  const uint64_t data = r.local_header + kLocalSize + le16(d + r.local_header + 26) + le16(d + r.local_header + 28);
  if (data > n || r.size > n - data)
    fail(ctx, "truncated or corrupt zip archive: record " + quote_name(record) + " lies outside the file");
  if (r.size > 32) fail(ctx, "invalid zip archive version record");
  check_crc(name, record, records, d + data, r.size);
  const std::string text(reinterpret_cast<const char*>(d + data), r.size);
  const size_t digits = std::min(text.find_first_not_of("0123456789"), text.size());
  const bool ok = digits > 0 && digits <= 9 && text.find_first_not_of(" \r\n", digits) == std::string::npos;
  const uint64_t version = ok ? std::stoull(text.substr(0, digits)) : 0;
  if (version < caffe2::serialize::kMinSupportedFileFormatVersion ||
      version > caffe2::serialize::kMaxSupportedFileFormatVersion) {
    fail(ctx, "unsupported zip archive version " + quote_name(text));
  }
}

class BoundedMemoryAdapter : public caffe2::serialize::ReadAdapterInterface {
 public:
  BoundedMemoryAdapter(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  size_t size() const override { return size_; }
  size_t read(uint64_t pos, void* buf, size_t n, const char* /*what*/) const override {
    if (pos >= size_) return 0;
    const size_t count = static_cast<size_t>(std::min<uint64_t>(n, size_ - pos));
    std::memcpy(buf, data_ + pos, count);
    return count;
  }

 private:
  const uint8_t* data_;
  size_t size_;
};

std::string without_backtrace(const c10::Error& e) { return e.what_without_backtrace(); }

// Reads a record through PyTorchStreamReader, then holds it to the central directory's size and CRC.
at::DataPtr read_record(const std::string& name, caffe2::serialize::PyTorchStreamReader& reader,
                        const ZipRecords& records, const std::string& record) {
  at::DataPtr data;
  size_t size = 0;
  try {
    std::tie(data, size) = reader.getRecord(record);
  } catch (const c10::Error& e) {
    fail(name + ": ", "cannot read zip record " + quote_name(record) + ": " + without_backtrace(e));
  }
  if (size != records.at(record).size) {
    fail(name + ": ", "zip record " + quote_name(record) + " size disagrees with the central directory");
  }
  check_crc(name, record, records, data.get(), size);
  return data;
}

class ZipSource : public StorageSource {
 public:
  ZipSource(std::string name, caffe2::serialize::PyTorchStreamReader& reader, const ZipRecords& records,
            const StorageTable& table)
      : name_(std::move(name)), reader_(reader), records_(records), table_(table), loaded_(table.entries.size()) {}

  const uint8_t* acquire(size_t storage) override {
    if (!loaded_[storage])
      loaded_[storage] = read_record(name_, reader_, records_, "data/" + table_.entries[storage].key);
    return static_cast<const uint8_t*>(loaded_[storage].get());
  }

  void release(size_t storage) override { loaded_[storage].clear(); }

  at::DataPtr take(size_t storage) override {
    acquire(storage);
    return std::move(loaded_[storage]);
  }

 private:
  std::string name_;
  caffe2::serialize::PyTorchStreamReader& reader_;
  const ZipRecords& records_;
  const StorageTable& table_;
  std::vector<at::DataPtr> loaded_;
};

StateDict load_zip(const std::string& bytes, const std::string& name, const CheckpointLimits& limits) {
  const std::string ctx = name + ": ";
  const auto* data = reinterpret_cast<const uint8_t*>(bytes.data());
  const ZipRecords records = scan_zip(name, data, bytes.size(), static_cast<uint64_t>(limits.max_tensors) + 64);
  auto has = [&](const std::string& r) { return records.count(r) > 0; };
  for (const auto& r : records) {
    if (r.first.compare(0, 5, "code/") == 0)
      fail(ctx, "is a TorchScript archive (torch.jit.save), not a torch.save state dict");
  }
  if (!has("data.pkl")) fail(ctx, "zip archive has no data.pkl: not a torch.save checkpoint");
  const uint64_t pickle_size = records.at("data.pkl").size;
  const uint64_t max_pickle = kPickleBytesPerTensor * static_cast<uint64_t>(limits.max_tensors) + kPickleSlack;
  if (pickle_size > max_pickle)
    fail(ctx, "data.pkl of " + std::to_string(pickle_size) + " bytes is larger than the tensor limit allows");
  if (has("byteorder") && records.at("byteorder").size > 16) fail(ctx, "invalid byteorder record");
  check_version_record(name, data, bytes.size(), records);

  std::unique_ptr<caffe2::serialize::PyTorchStreamReader> reader;
  try {
    reader = std::make_unique<caffe2::serialize::PyTorchStreamReader>(
        std::make_shared<BoundedMemoryAdapter>(data, bytes.size()));
  } catch (const c10::Error& e) {
    fail(ctx, "invalid PyTorch zip archive: " + without_backtrace(e));
  }
  const at::DataPtr pickle = read_record(name, *reader, records, "data.pkl");
  if (has("byteorder")) {
    const at::DataPtr order = read_record(name, *reader, records, "byteorder");
    if (std::string(static_cast<const char*>(order.get()), records.at("byteorder").size) != "little") {
      fail(ctx, "big-endian checkpoints are not supported");
    }
  }

  Heap heap;
  Budget budget = pickle_budget(limits);
  StorageTable table(name, limits, false, [&](const StorageInfo& s) {
    const std::string record = "data/" + s.key;
    auto it = records.find(record);
    if (it == records.end()) fail(ctx, "storage " + quote_name(record) + " is missing from the archive");
    if (it->second.size < s.nbytes) {
      fail(ctx, "truncated: storage " + quote_name(record) + " needs " + std::to_string(s.nbytes) + " bytes, has " +
                    std::to_string(it->second.size));
    }
    if (it->second.size > s.nbytes) {
      fail(ctx, "storage " + quote_name(record) + " has " + std::to_string(it->second.size) +
                    " bytes, the pickle declares " + std::to_string(s.nbytes));
    }
  });
  Unpickler vm(ctx + "data.pkl: ", static_cast<const uint8_t*>(pickle.get()), pickle_size, 0, heap, budget,
               [&](const Value& pid) { return table.declare(heap, pid); });
  const Value root = vm.run();
  if (vm.end() != pickle_size)
    fail(ctx, "data.pkl has " + std::to_string(pickle_size - vm.end()) + " bytes after its STOP opcode");

  ZipSource source(name, *reader, records, table);
  return assemble(name, heap, root, table, source, limits);
}

}  // namespace

StateDict load_state_dict_from_memory(const std::string& bytes, const std::string& name,
                                      const CheckpointLimits& limits) {
  const std::string ctx = name + ": ";
  try {
    if (bytes.size() > limits.max_file_bytes) {
      fail(ctx, "file of " + std::to_string(bytes.size()) + " bytes exceeds the limit of " +
                    std::to_string(limits.max_file_bytes) + " bytes");
    }
    if (bytes.empty()) fail(ctx, "empty file, not a PyTorch checkpoint");
    if (bytes.compare(0, 4, "PK\x03\x04") == 0) return load_zip(bytes, name, limits);
    if (static_cast<uint8_t>(bytes[0]) == 0x80) return load_legacy(bytes, name, limits);
    fail(ctx, "not a PyTorch checkpoint (neither a zip archive nor a legacy torch.save pickle)");
  } catch (const CheckpointError&) {
    throw;
  } catch (const c10::Error& e) {
    throw CheckpointError(ctx + without_backtrace(e));
  } catch (const std::bad_alloc&) {
    throw CheckpointError(ctx + "out of memory while loading");
  } catch (const std::exception& e) {
    throw CheckpointError(ctx + e.what());
  }
}

StateDict load_state_dict(const std::string& path, const CheckpointLimits& limits) {
  std::error_code ec;
  const auto size = std::filesystem::file_size(path, ec);
  if (ec) throw CheckpointError(path + ": cannot read: " + ec.message());
  if (size > limits.max_file_bytes) {
    throw CheckpointError(path + ": file of " + std::to_string(size) + " bytes exceeds the limit of " +
                          std::to_string(limits.max_file_bytes) + " bytes");
  }
  // Read straight into one buffer of the known size: checkpoints are hundreds of megabytes.
  std::ifstream in(path, std::ios::binary);
  if (!in) throw CheckpointError(path + ": cannot open file");
  std::string bytes(static_cast<size_t>(size), '\0');
  in.read(bytes.data(), static_cast<std::streamsize>(size));
  if (static_cast<uint64_t>(in.gcount()) != size || in.peek() != std::ifstream::traits_type::eof()) {
    throw CheckpointError(path + ": read error (the file changed size while being read)");
  }
  return load_state_dict_from_memory(bytes, path, limits);
}

}  // namespace patchcore

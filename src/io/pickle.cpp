#include "pickle.h"

#include <algorithm>
#include <cctype>
#include <cstring>

#include "patchcore/core/bytes.h"

namespace patchcore::checkpoint {
namespace {

// A state dict nests a few levels deep (dict, rebuild-call tuple, persistent id tuple); these bounds only
// stop a hostile pickle from growing the VM without limit.
constexpr size_t kMaxStackDepth = 1 << 20;
constexpr size_t kMaxMarkDepth = 256;
constexpr size_t kMaxGlobalLength = 256;
constexpr size_t kMaxDims = 64;
// Costs in 16-byte cells of what the VM allocates.
constexpr uint64_t kCellsPerObject = 2;  // a pool slot: vector or string header
constexpr uint64_t kCellsPerDict = 10;   // items vector and two index maps
constexpr uint64_t kCellsPerMemoEntry = 3;

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

class Unpickler {
 public:
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
        const uint64_t n = load_le64(take(8));
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
        push(new_int(load_le16(take(2))));
        return;
      case 'J':  // BININT
        push(new_int(static_cast<int32_t>(load_le32(take(4)))));
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
        push_string(Kind::Str, load_le32(take(4)));
        return;
      case 0x8c:  // SHORT_BINUNICODE
        push_string(Kind::Str, *take(1));
        return;
      case 0x8d:  // BINUNICODE8
        push_string(Kind::Str, load_le64(take(8)));
        return;
      case 'T': {  // BINSTRING: Python 2 str, as in checkpoints written by Python 2
        const int32_t n = static_cast<int32_t>(load_le32(take(4)));
        if (n < 0) malformed("negative string length");
        push_string(Kind::Str, static_cast<uint64_t>(n));
        return;
      }
      case 'U':  // SHORT_BINSTRING
        push_string(Kind::Str, *take(1));
        return;
      case 'B':  // BINBYTES
        push_string(Kind::Bytes, load_le32(take(4)));
        return;
      case 'C':  // SHORT_BINBYTES
        push_string(Kind::Bytes, *take(1));
        return;
      case 0x8e:  // BINBYTES8
        push_string(Kind::Bytes, load_le64(take(8)));
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
        memo_put(load_le32(take(4)));
        return;
      case 0x94:  // MEMOIZE
        memo_put(memo_.size());
        return;
      case 'h':  // BINGET
        memo_get(*take(1));
        return;
      case 'j':  // LONG_BINGET
        memo_get(load_le32(take(4)));
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

}  // namespace

[[noreturn]] void fail(const std::string& context, const std::string& what) { throw CheckpointError(context + what); }

std::string hex_byte(uint8_t b) {
  static const char* digits = "0123456789abcdef";
  return std::string("0x") + digits[b >> 4] + digits[b & 15];
}

std::string dtype_label(c10::ScalarType dtype) {
  std::string s = c10::toString(dtype);
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

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

Value unpickle(const std::string& context, const uint8_t* data, size_t size, size_t start, Heap& heap, Budget& budget,
               const PersistentLoad& persistent_load, size_t* end) {
  Unpickler vm(context, data, size, start, heap, budget, persistent_load);
  const Value value = vm.run();
  if (end) *end = vm.end();
  return value;
}

}  // namespace patchcore::checkpoint

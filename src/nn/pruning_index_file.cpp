#include <ATen/ATen.h>
#include <zlib.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string_view>
#include <vector>

#include "patchcore/core/file.h"
#include "pruning_index.h"

namespace patchcore::pruning {
namespace {

constexpr char kMagic[8] = {'P', 'C', 'P', 'R', 'U', 'N', 'E', '2'};
// Earlier layouts: three tiers of 32, 128 and 256 axes.
constexpr char kEarlierMagic[8] = {'P', 'C', 'P', 'R', 'U', 'N', 'E', '1'};

uint32_t crc_of(const void* data, size_t bytes) {
  return static_cast<uint32_t>(crc32_z(0, static_cast<const Bytef*>(data), bytes));
}

uint32_t bank_crc(const float* rows, int64_t n, int64_t d) {
  return crc_of(rows, static_cast<size_t>(n * d) * sizeof(float));
}

class Writer {
 public:
  template <typename T>
  void put(const T& value) {
    bytes_.append(reinterpret_cast<const char*>(&value), sizeof value);
  }
  template <typename T>
  void put(const std::vector<T>& values) {
    bytes_.append(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(T));
  }
  void put(const at::Tensor& t) {
    const at::Tensor c = t.contiguous();
    bytes_.append(static_cast<const char*>(c.data_ptr()), c.numel() * c.element_size());
  }
  std::string& bytes() { return bytes_; }

 private:
  std::string bytes_;
};

class Reader {
 public:
  Reader(const std::string& path, std::string_view bytes) : path_(path), bytes_(bytes) {}
  [[noreturn]] void fail(const std::string& problem) const {
    throw std::runtime_error(path_ + ": not a usable pruning structure: " + problem);
  }
  template <typename T>
  T get() {
    T value;
    take(&value, sizeof value);
    return value;
  }
  // `count` values, checked against the bytes left before anything is allocated.
  template <typename T>
  std::vector<T> get(int64_t count) {
    if (count < 0 || static_cast<uint64_t>(count) > left() / sizeof(T)) fail("an array runs past the end of the file");
    std::vector<T> values(static_cast<size_t>(count));
    take(values.data(), values.size() * sizeof(T));
    return values;
  }
  at::Tensor get_tensor(int64_t rows, int64_t columns) {
    const std::vector<float> values = get<float>(rows * columns);
    return at::from_blob(const_cast<float*>(values.data()), {rows, columns}, at::kFloat).clone();
  }
  size_t left() const { return bytes_.size() - at_; }

 private:
  void take(void* out, size_t n) {
    if (n > left()) fail("truncated");
    std::memcpy(out, bytes_.data() + at_, n);
    at_ += n;
  }
  std::string path_;
  std::string_view bytes_;
  size_t at_ = 0;
};

int64_t aligned(int64_t slots) { return (slots + kLanes - 1) / kLanes * kLanes; }

}  // namespace

void write_pruning_index(const PruningIndex& p, const std::string& path) {
  Writer w;
  w.bytes().append(kMagic, sizeof kMagic);
  w.put(p.count);
  w.put(p.dim);
  w.put(p.slots);
  w.put(p.padding_block);
  w.put(static_cast<int64_t>(p.cells.size()));
  w.put(static_cast<int64_t>(p.box_tail_low.size() / kLanes));  // groups of boxes
  w.put(p.row_error);
  w.put(p.first_tier_norm);
  w.put(bank_crc(p.rows, p.count, p.dim));
  w.put(p.mean);
  w.put(p.basis);
  w.put(p.row_of_slot);
  w.put(p.blocks);
  w.put(p.norms);
  for (const auto& t : p.tails) w.put(t);
  w.put(p.coordinates);
  w.put(p.box_low);
  w.put(p.box_high);
  w.put(p.box_tail_low);
  w.put(p.box_tail_high);
  for (const Cell& c : p.cells) {
    w.put(c.begin);
    w.put(c.end);
    w.put(c.box_group);
    w.put(c.radius);
    w.put(c.tail_low);
    w.put(c.tail_high);
  }
  w.put(p.centres);
  w.put(crc_of(w.bytes().data(), w.bytes().size()));
  write_file_atomically(path, w.bytes());
}

std::shared_ptr<const PruningIndex> read_pruning_index(const std::string& path, const float* rows, int64_t n,
                                                       int64_t d) {
  const std::string bytes = read_file(path);
  Reader r(path, bytes);
  if (bytes.size() >= sizeof kEarlierMagic && std::memcmp(bytes.data(), kEarlierMagic, sizeof kEarlierMagic) == 0)
    return nullptr;
  if (bytes.size() < sizeof kMagic + 4 || std::memcmp(bytes.data(), kMagic, sizeof kMagic) != 0) r.fail("bad magic");
  uint32_t stored_crc;
  std::memcpy(&stored_crc, bytes.data() + bytes.size() - 4, 4);
  if (crc_of(bytes.data(), bytes.size() - 4) != stored_crc) r.fail("CRC-32 mismatch");
  Reader in(path, std::string_view(bytes).substr(sizeof kMagic, bytes.size() - sizeof kMagic - 4));

  auto p = std::make_shared<PruningIndex>();
  p->rows = rows;
  p->count = in.get<int64_t>();
  p->dim = in.get<int64_t>();
  if (p->count != n || p->dim != d)
    in.fail("built for a bank of " + std::to_string(p->count) + " x " + std::to_string(p->dim) + ", the index holds " +
            std::to_string(n) + " x " + std::to_string(d));
  for (int t = 0; t < kTiers; ++t) p->axes[t] = std::min(kTierAxes[t], d);
  p->box_axes = std::min(kBoxAxes, p->axes[0]);
  p->tail_levels[0] = p->box_axes;
  for (int t = 0; t < kTiers; ++t) p->tail_levels[t + 1] = p->axes[t];
  const int64_t width = p->width(), first = p->axes[0];
  p->slots = in.get<int64_t>();
  p->padding_block = in.get<int64_t>();
  const int64_t cells = in.get<int64_t>(), groups = in.get<int64_t>();
  p->row_error = in.get<float>();
  p->first_tier_norm = in.get<float>();
  if (in.get<uint32_t>() != bank_crc(rows, n, d)) in.fail("it was built for another memory bank");
  if (p->slots < kLanes || p->slots % kLanes != 0 || p->padding_block != p->slots / kLanes - 1 || cells < 1 ||
      cells > n || groups < cells || groups > p->slots / kLanes || !std::isfinite(p->row_error) || p->row_error < 0 ||
      !std::isfinite(p->first_tier_norm) || p->first_tier_norm < 0)
    in.fail("inconsistent counts");
  p->mean = in.get_tensor(1, d).view({d});
  p->basis = in.get_tensor(d, width);
  p->row_of_slot = in.get<int64_t>(p->slots);
  p->blocks = in.get<float>(p->slots * first);
  p->norms = in.get<float>(p->slots);
  for (auto& t : p->tails) t = in.get<float>(p->slots);
  p->coordinates = in.get<float>(p->slots * width);
  p->box_low = in.get<float>(groups * p->box_axes * kLanes);
  p->box_high = in.get<float>(groups * p->box_axes * kLanes);
  p->box_tail_low = in.get<float>(groups * kLanes);
  p->box_tail_high = in.get<float>(groups * kLanes);
  p->cells.resize(static_cast<size_t>(cells));
  for (Cell& c : p->cells) {
    c.begin = in.get<int64_t>();
    c.end = in.get<int64_t>();
    c.box_group = in.get<int64_t>();
    c.radius = in.get<double>();
    c.tail_low = in.get<float>();
    c.tail_high = in.get<float>();
  }
  p->centres = in.get<float>((cells + kLanes - 1) / kLanes * first * kLanes);
  if (in.left() != 0) in.fail("the file continues past the structure");

  // Every value the search reads: rows once each, padding that no bound lets through, cells that tile the slots
  // in order with their groups of boxes, finite coordinates.
  std::vector<char> seen(static_cast<size_t>(n), 0);
  for (int64_t s = 0; s < p->slots; ++s) {
    const int64_t row = p->row_of_slot[s];
    if (row < -1 || row >= n || (row >= 0 && seen[row]++)) in.fail("slot " + std::to_string(s) + " holds no valid row");
    if (row < 0 && !(p->norms[s] == std::numeric_limits<float>::infinity()))
      in.fail("padding slot " + std::to_string(s) + " has a finite bound");
  }
  for (int64_t row = 0; row < n; ++row)
    if (!seen[row]) in.fail("row " + std::to_string(row) + " is in no slot");
  int64_t next_slot = 0, next_group = 0;
  for (const Cell& c : p->cells) {
    if (c.begin != next_slot || c.end <= c.begin || c.end != aligned(c.end) || c.box_group != next_group ||
        !std::isfinite(c.radius) || c.radius < 0 || std::isnan(c.tail_low) || std::isnan(c.tail_high))
      in.fail("a cell is out of place");
    next_slot = c.end;
    next_group += ((c.end - c.begin) / kLanes + kLanes - 1) / kLanes;
  }
  if (next_slot != p->padding_block * kLanes || next_group != groups) in.fail("the cells do not tile the slots");
  for (const auto* values : {&p->blocks, &p->coordinates, &p->centres})
    if (!all_finite(values->data(), static_cast<int64_t>(values->size()))) in.fail("a coordinate is not finite");
  for (const auto& values : p->tails)
    if (!all_finite(values.data(), static_cast<int64_t>(values.size()))) in.fail("a coordinate is not finite");
  for (const auto* values : {&p->box_low, &p->box_high, &p->box_tail_low, &p->box_tail_high})
    for (float v : *values)
      if (std::isnan(v)) in.fail("a box bound is not a number");
  if (!at::isfinite(p->mean).all().item<bool>() || !at::isfinite(p->basis).all().item<bool>())
    in.fail("the rotation is not finite");
  derive_dense_tiers(*p);
  return p;
}

}  // namespace patchcore::pruning

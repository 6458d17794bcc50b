#include "ballast/kernels/workspace.h"

#include <algorithm>
#include <cstdint>

#include "ballast/core/error.h"

namespace ballast::kernels {

namespace {
constexpr size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }
}  // namespace

Tensor Workspace::take(std::vector<int64_t> shape, DType dtype) {
  int64_t numel = 1;
  for (int64_t d : shape) {
    check(d >= 0, "workspace: take of a tensor with dimension {}", d);
    numel *= d;
  }
  // Every take gets its own aligned piece, an empty one too (a defined tensor has an address).
  const size_t bytes = round_up(std::max<size_t>(size_t(numel) * dtype_size(dtype), 1), kAlign);
  auto start_of = [](const Tensor& block) {  // the block's first aligned byte
    const auto p = reinterpret_cast<uintptr_t>(block.raw());
    return round_up(p, kAlign) - p;
  };
  auto fits = [&](size_t b, size_t used) {
    return b < blocks_.size() && start_of(blocks_[b]) + used + bytes <= blocks_[b].nbytes();
  };
  if (!fits(block_, used_)) {
    // The blocks after this one were given back by a scope (a layer's scratch that the next layer
    // takes again): the first that holds the take, else a new one.
    size_t next = blocks_.empty() ? 0 : block_ + 1;
    while (next < blocks_.size() && !fits(next, 0)) ++next;
    if (next == blocks_.size()) {
      // Outgrown: another block, a quarter of all before it at least, so that a first pass takes
      // few of them (tens) yet holds about 1.25x what it takes at its peak, where blocks as large
      // as all before held up to 2x (four in-process ranks' first passes at once must fit the
      // device beside the weights); reset() replaces them by one.
      const size_t size = std::max(bytes, capacity() / 4) + kAlign;  // slack to align the start
      blocks_.push_back(be_.alloc({int64_t(size / 4)}, DType::I32));
      ++generation_;
    }
    block_ = next;
    used_ = 0;
  }
  const Tensor& block = blocks_[block_];
  void* p = static_cast<char*>(block.raw()) + start_of(block) + used_;
  used_ += bytes;
  taken_ += bytes;
  high_water_ = std::max(high_water_, taken_);
  return Tensor::borrow(p, std::move(shape), dtype, be_.device());
}

void Workspace::reset() {
  if (blocks_.size() > 1) {
    blocks_.clear();  // frees before allocating, so both are never held at once
    blocks_.push_back(be_.alloc({int64_t((high_water_ + kAlign) / 4)}, DType::I32));
    ++generation_;
  }
  block_ = 0;
  used_ = 0;
  taken_ = 0;
}

Workspace::Scope::~Scope() {
  // Blocks added inside the scope stay, empty, for the takes after it; reset() then sizes one
  // buffer for the deepest point, which is what `taken_` measures.
  ws_.block_ = block_;
  ws_.used_ = used_;
  ws_.taken_ = taken_;
}

size_t Workspace::capacity() const {
  size_t n = 0;
  for (const Tensor& b : blocks_) n += b.nbytes();
  return n;
}

}  // namespace ballast::kernels

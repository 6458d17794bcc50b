#include "ballast/core/tensor.h"

#include <cstdlib>
#include <cstring>

#include "ballast/core/error.h"

namespace ballast {

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (auto d : shape_) n *= d;
  return n;
}

Tensor Tensor::zeros(std::vector<int64_t> shape, DType dtype) {
  Tensor t;
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  size_t bytes = std::max<size_t>(t.nbytes(), 64);
  void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  check(p != nullptr, "out of memory allocating tensor {} ({} bytes)", t, bytes);
  std::memset(p, 0, bytes);
  t.owner_ = std::shared_ptr<void>(p, std::free);
  t.data_ = p;
  return t;
}

Tensor Tensor::borrow(void* data, std::vector<int64_t> shape, DType dtype, Device device,
                      std::shared_ptr<void> owner) {
  Tensor t;
  t.owner_ = std::move(owner);
  t.data_ = data;
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  t.device_ = device;
  return t;
}

float* Tensor::f32() const {
  check(dtype_ == DType::F32, "tensor {} is {}, expected F32", *this, dtype_name(dtype_));
  return static_cast<float*>(data_);
}

Tensor Tensor::reshape(std::vector<int64_t> shape) const {
  Tensor t = *this;
  t.shape_ = std::move(shape);
  check(t.numel() == numel(), "cannot reshape {} to {}", *this, t);
  return t;
}

Tensor Tensor::rows(int64_t begin, int64_t end) const {
  check(rank() >= 1 && 0 <= begin && begin <= end && end <= shape_[0],
        "rows [{}, {}) out of range for {}", begin, end, *this);
  Tensor t = *this;
  t.shape_[0] = end - begin;
  t.data_ = static_cast<char*>(data_) + size_t(begin) * (nbytes() / std::max<int64_t>(1, shape_[0]));
  return t;
}

Tensor Tensor::operator[](int64_t i) const {
  Tensor t = rows(i, i + 1);
  t.shape_.erase(t.shape_.begin());
  return t;
}

std::string Tensor::shape_str() const {
  std::string s = "[";
  for (size_t i = 0; i < shape_.size(); ++i) s += (i ? ", " : "") + std::to_string(shape_[i]);
  return s + "]";
}

}  // namespace ballast

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

size_t Tensor::row_bytes() const {
  size_t n = dtype_size(dtype_);
  for (size_t i = 1; i < shape_.size(); ++i) n *= size_t(shape_[i]);
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

Tensor Tensor::block_scaled(const Tensor& elements, const Tensor& scales) {
  check(elements.dtype() == DType::F8_E4M3 && elements.rank() >= 2,
        "block_scaled: elements {} are {}, expected F8_E4M3 of rank >= 2", elements, dtype_name(elements.dtype()));
  std::vector<int64_t> want(elements.shape_.begin(), elements.shape_.end() - 2);
  want.push_back(scale_blocks(elements.dim(-2)));
  want.push_back(scale_blocks(elements.dim(-1)));
  Tensor s = scales;
  s.scales_ = nullptr;
  check(scales.dtype() == DType::F32 && scales.shape_ == want && scales.device() == elements.device() &&
            (scales.defined() || scales.numel() == 0),
        "block_scaled: scales {} {} for elements {}: expected F32 {} (one per 128 x 128 block) on the same device",
        scales, dtype_name(scales.dtype()), elements, Tensor::borrow(nullptr, want, DType::F32));
  Tensor t = elements;
  t.dtype_ = DType::F8_E4M3_B128;
  t.scales_ = std::make_shared<const Tensor>(std::move(s));
  return t;
}

const Tensor& Tensor::scales() const {
  check(scales_ != nullptr, "tensor {} is {}, which has no block scales", *this, dtype_name(dtype_));
  return *scales_;
}

Tensor Tensor::elements() const {
  check(dtype_ == DType::F8_E4M3_B128, "tensor {} is {}, not block-scaled", *this, dtype_name(dtype_));
  Tensor t = *this;
  t.dtype_ = DType::F8_E4M3;
  t.scales_ = nullptr;
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
  if (scales_) {
    // Blocks tile the last two dims: those must stay, the leading ones may regroup.
    check(t.rank() >= 2 && t.dim(-1) == dim(-1) && t.dim(-2) == dim(-2),
          "cannot reshape block-scaled {} to {}: its last two dims hold the 128 x 128 blocks", *this, t);
    std::vector<int64_t> s(t.shape_.begin(), t.shape_.end() - 2);
    s.push_back(scales_->dim(-2));
    s.push_back(scales_->dim(-1));
    t.scales_ = std::make_shared<const Tensor>(scales_->reshape(std::move(s)));
  }
  return t;
}

Tensor Tensor::rows(int64_t begin, int64_t end) const {
  check(rank() >= 1 && 0 <= begin && begin <= end && end <= shape_[0],
        "rows [{}, {}) out of range for {}", begin, end, *this);
  Tensor t = *this;
  t.shape_[0] = end - begin;
  t.data_ = static_cast<char*>(data_) + size_t(begin) * (nbytes() / std::max<int64_t>(1, shape_[0]));
  if (scales_) {
    if (rank() >= 3) {  // one scale matrix per leading index
      t.scales_ = std::make_shared<const Tensor>(scales_->rows(begin, end));
    } else {
      check(begin % kScaleBlock == 0 && (end % kScaleBlock == 0 || end == shape_[0]),
            "rows [{}, {}) of block-scaled {} would split a 128-row scale block", begin, end, *this);
      t.scales_ = std::make_shared<const Tensor>(scales_->rows(begin / kScaleBlock, scale_blocks(end)));
    }
  }
  return t;
}

Tensor Tensor::operator[](int64_t i) const {
  check(!scales_ || rank() >= 3, "block-scaled {} cannot be indexed below a matrix", *this);
  Tensor t = rows(i, i + 1);
  t.shape_.erase(t.shape_.begin());
  if (scales_) t.scales_ = std::make_shared<const Tensor>((*scales_)[i]);
  return t;
}

Tensor Tensor::view_bytes(size_t offset, std::vector<int64_t> shape, DType dtype) const {
  Tensor t;
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  t.device_ = device_;
  t.owner_ = owner_;
  check(offset <= nbytes() && t.nbytes() <= nbytes() - offset, "view of {} bytes at byte {} of {} ({} bytes)",
        t.nbytes(), offset, *this, nbytes());
  t.data_ = static_cast<char*>(data_) + offset;
  return t;
}

std::string format_shape(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string Tensor::shape_str() const { return format_shape(shape_); }

}  // namespace ballast

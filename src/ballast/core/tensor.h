#pragma once
// A tensor: shape, storage dtype, device, and a pointer into storage that is either owned
// (shared between views) or borrowed (an mmapped checkpoint, a caller's buffer).
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "ballast/core/dtype.h"

namespace ballast {

enum class Device : uint8_t { CPU, CUDA };

class Tensor {
 public:
  Tensor() = default;

  // Owned, zero-initialised CPU storage.
  static Tensor zeros(std::vector<int64_t> shape, DType dtype = DType::F32);
  // Borrowed storage; the caller keeps `data` alive (owner, if given, is held by the view).
  static Tensor borrow(void* data, std::vector<int64_t> shape, DType dtype,
                       Device device = Device::CPU, std::shared_ptr<void> owner = nullptr);

  bool defined() const { return data_ != nullptr; }
  const std::vector<int64_t>& shape() const { return shape_; }
  int rank() const { return int(shape_.size()); }
  int64_t dim(int i) const { return shape_[i < 0 ? shape_.size() + i : i]; }
  int64_t numel() const;
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }

  void* raw() const { return data_; }
  template <typename T>
  T* data() const { return static_cast<T*>(data_); }
  float* f32() const;  // checks dtype F32

  // Same storage, new shape (same numel).
  Tensor reshape(std::vector<int64_t> shape) const;
  // Rows [begin, end) of the first dimension, same storage.
  Tensor rows(int64_t begin, int64_t end) const;
  // Index i of the first dimension, same storage, rank reduced by one.
  Tensor operator[](int64_t i) const;

  std::string shape_str() const;

 private:
  std::shared_ptr<void> owner_;
  void* data_ = nullptr;
  std::vector<int64_t> shape_;
  DType dtype_ = DType::F32;
  Device device_ = Device::CPU;
};

}  // namespace ballast

// Formats a tensor as its shape, "[2, 3]". Passing the tensor (not shape_str()) to check() keeps
// the formatting off the hot path: it happens only when the check fails.
template <>
struct fmt::formatter<ballast::Tensor> : fmt::formatter<std::string> {
  auto format(const ballast::Tensor& t, fmt::format_context& ctx) const {
    return fmt::formatter<std::string>::format(t.shape_str(), ctx);
  }
};

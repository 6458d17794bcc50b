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

// A shape as errors print it: "[2, 3]".
std::string format_shape(const std::vector<int64_t>& shape);

enum class Device : uint8_t { CPU, CUDA };

class Tensor {
 public:
  Tensor() = default;

  // Owned, zero-initialised CPU storage.
  static Tensor zeros(std::vector<int64_t> shape, DType dtype = DType::F32);
  // Borrowed storage; the caller keeps `data` alive (owner, if given, is held by the view).
  static Tensor borrow(void* data, std::vector<int64_t> shape, DType dtype,
                       Device device = Device::CPU, std::shared_ptr<void> owner = nullptr);
  // A block-scaled weight (DType::F8_E4M3_B128, Qwen's fine-grained FP8): `elements` (F8_E4M3,
  // rank >= 2) and `scales` (F32 [..., scale_blocks(rows), scale_blocks(cols)], the same leading
  // dims, on the same device). Element [..., r, c] stands for its e4m3 value times
  // scales[..., r / 128, c / 128]; the blocks at the bottom and right edges may be partial.
  static Tensor block_scaled(const Tensor& elements, const Tensor& scales);

  bool defined() const { return data_ != nullptr; }
  const std::vector<int64_t>& shape() const { return shape_; }
  int rank() const { return int(shape_.size()); }
  int64_t dim(int i) const { return shape_[i < 0 ? shape_.size() + i : i]; }
  int64_t numel() const;
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype_); }  // the elements' bytes
  size_t row_bytes() const;  // the bytes of one row, the first dimension indexing rows
  // The elements' bytes and, for a block-scaled tensor, its scales'.
  size_t storage_bytes() const { return nbytes() + (scales_ ? scales_->nbytes() : 0); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }

  void* raw() const { return data_; }
  template <typename T>
  T* data() const { return static_cast<T*>(data_); }
  float* f32() const;  // checks dtype F32

  // The block scales of an F8_E4M3_B128 tensor (throws for any other dtype).
  const Tensor& scales() const;
  // The e4m3 elements of an F8_E4M3_B128 tensor as F8_E4M3, same storage, without the scales.
  Tensor elements() const;

  // Same storage, new shape (same numel). A block-scaled tensor keeps its last two dims.
  Tensor reshape(std::vector<int64_t> shape) const;
  // Rows [begin, end) of the first dimension, same storage. A block-scaled matrix is cut at block
  // boundaries only (begin a multiple of 128; end too, or the last row): its views keep the scales.
  Tensor rows(int64_t begin, int64_t end) const;
  // Index i of the first dimension, same storage, rank reduced by one.
  Tensor operator[](int64_t i) const;
  // `shape` elements of `dtype` at byte `offset` of this tensor's storage (same storage, kept
  // alive by the view); the range must lie within this tensor's bytes.
  Tensor view_bytes(size_t offset, std::vector<int64_t> shape, DType dtype) const;

  std::string shape_str() const;

 private:
  std::shared_ptr<void> owner_;
  std::shared_ptr<const Tensor> scales_;  // F8_E4M3_B128 only
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

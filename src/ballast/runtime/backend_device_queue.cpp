#include "ballast/runtime/backend_device_queue.h"

#include "ballast/kernels/ops.h"

namespace ballast::runtime {

Tensor BackendDeviceQueue::bytes_at(const void* p, size_t bytes) const {
  return Tensor::borrow(const_cast<void*>(p), {int64_t(bytes)}, DType::U8, be_.device());
}

void BackendDeviceQueue::download(const void* src, void* host, size_t bytes) {
  be_.download(bytes_at(src, bytes), host);
  ++downloads_;
}

void BackendDeviceQueue::upload(const void* host, void* dst, size_t bytes) {
  Tensor t = bytes_at(dst, bytes);
  be_.upload(host, t);
}

void BackendDeviceQueue::copy(const void* src, void* dst, size_t bytes) {
  Tensor t = bytes_at(dst, bytes);
  be_.ops().copy(bytes_at(src, bytes), t);
}

}  // namespace ballast::runtime

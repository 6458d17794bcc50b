#include "ballast/runtime/backend_device_queue.h"

#include <vector>

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

void BackendDeviceQueue::gather_routed(std::span<const Routed> sources, int me, size_t row_bytes, void* out,
                                       int64_t out_rows, void* recv_counts) {
  // Rows as bytes: the op moves rows of any dtype alike.
  const int64_t G = int64_t(sources.size()), width = int64_t(row_bytes);
  std::vector<kernels::RoutedRows> from;
  from.reserve(sources.size());
  for (const Routed& s : sources)
    from.push_back({Tensor::borrow(const_cast<void*>(s.rows), {s.held, width}, DType::U8, be_.device()),
                    Tensor::borrow(const_cast<void*>(s.counts), {G}, DType::I32, be_.device())});
  Tensor rows = Tensor::borrow(out, {out_rows, width}, DType::U8, be_.device());
  Tensor counts = Tensor::borrow(recv_counts, {G}, DType::I32, be_.device());
  be_.ops().gather_routed(from, me, rows, counts);
}

}  // namespace ballast::runtime

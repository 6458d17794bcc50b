#pragma once
// A rank's backend as the queue of work through which the data plane of in-process ranks reaches
// the device they share (dist/device_queue.h): downloads, uploads and copies on the backend's
// stream, in order with its ops, and ordered between the ranks' streams by the backend's marks.
// Counts its downloads: they are the plane's, not the passes'.
#include "ballast/dist/device_queue.h"
#include "ballast/kernels/backend.h"

namespace ballast::runtime {

class BackendDeviceQueue final : public dist::DeviceQueue {
 public:
  explicit BackendDeviceQueue(kernels::Backend& backend) : be_(backend) {}

  Device device() const override { return be_.device(); }
  void download(const void* src, void* host, size_t bytes) override;
  void upload(const void* host, void* dst, size_t bytes) override;
  void copy(const void* src, void* dst, size_t bytes) override;
  void wait() override { be_.synchronize(); }
  const void* mark(int slot) override { return be_.mark(slot); }
  void after(const void* mark) override { be_.after(mark); }
  bool capturing() const override { return be_.capturing(); }
  void gather_routed(std::span<const Routed> sources, int me, size_t row_bytes, void* out, int64_t out_rows,
                     void* recv_counts) override;

  int64_t downloads() const { return downloads_; }

 private:
  Tensor bytes_at(const void* p, size_t bytes) const;

  kernels::Backend& be_;
  int64_t downloads_ = 0;
};

}  // namespace ballast::runtime

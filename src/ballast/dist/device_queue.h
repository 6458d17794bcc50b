#pragma once
// How a rank reaches device memory through its own queue of work (a CUDA stream): what the data
// plane of in-process ranks needs to move the buffers of a device they all address (ranks of one
// process on one GPU). dist/ knows no backend; the runtime implements this over the rank's
// (runtime/backend_device_queue.h). Pointers are device addresses of `device()` unless named host.
#include <cstddef>
#include <cstdint>
#include <span>

#include "ballast/core/tensor.h"

namespace ballast::dist {

class DeviceQueue {
 public:
  virtual ~DeviceQueue() = default;
  virtual Device device() const = 0;
  // `bytes` from src to `host`, after the work queued before it; returns when they are there.
  virtual void download(const void* src, void* host, size_t bytes) = 0;
  // `bytes` from `host` to dst, queued; `host` may change once this returns.
  virtual void upload(const void* host, void* dst, size_t bytes) = 0;
  // `bytes` from src to dst (any rank's buffers: one address space), queued.
  virtual void copy(const void* src, void* dst, size_t bytes) = 0;
  // Returns when everything queued so far is done.
  virtual void wait() = 0;
  // A handle on the work queued so far, valid until this queue's next mark of `slot` (0 or 1:
  // two may be in flight; the next reuses it); null where queued work is done at once.
  virtual const void* mark(int slot) = 0;
  // Work queued from now on waits for the work `mark` (any rank's queue's, or null: none) covers;
  // the host does not wait.
  virtual void after(const void* mark) = 0;
  // Whether the work is being recorded into a graph (a CUDA graph capture) rather than run: then
  // nothing may wait for it on the host (no download, no wait).
  virtual bool capturing() const { return false; }

  // What one source rank sends in an all_to_all_v: its rows (`held` of them) and its send counts
  // (I32 [G]), any rank's buffers.
  struct Routed {
    const void* rows;
    int64_t held;
    const void* counts;
  };
  // all_to_all_v's receiving half with the counts read on the device, queued (no host wait): `out`
  // (room for out_rows rows of row_bytes) gets, by source, the rows each sends to rank `me`, and
  // recv_counts (I32 [G], no source's counts) how many came from each. Counts that reach past a
  // source's rows or out's are the device's error (kernels::Ops::gather_routed).
  virtual void gather_routed(std::span<const Routed> sources, int me, size_t row_bytes, void* out, int64_t out_rows,
                             void* recv_counts) = 0;
};

}  // namespace ballast::dist

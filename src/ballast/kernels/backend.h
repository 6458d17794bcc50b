#pragma once
// The backend contract, part 1: one device's memory, transfers and stream (part 2, the compute
// ops, is ops.h). Everything is in stream order: an op, an upload or a copy runs after the calls
// before it; download() and synchronize() wait for them. A backend counts what it allocates and
// transfers, so that tests can hold a steady-state pass to no allocation and one download.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ballast/core/tensor.h"

namespace ballast::kernels {

class Ops;

struct Counters {
  int64_t allocations = 0;  // device buffers allocated: alloc(), workspace growth, op scratch growth
  int64_t bytes_allocated = 0;
  int64_t uploads = 0;      // host -> device copies
  int64_t bytes_uploaded = 0;
  int64_t downloads = 0;    // device -> host copies
  int64_t bytes_downloaded = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual std::string describe() const = 0;  // e.g. "cpu, 16 threads"
  virtual Ops& ops() = 0;

  // A device buffer, its contents undefined. Counted.
  virtual Tensor alloc(std::vector<int64_t> shape, DType dtype) = 0;
  // A weight as this device reads it: the CPU reads host (mmapped) tensors in place and returns
  // the same view; a GPU copies it to device memory (counted as an allocation and an upload).
  virtual Tensor to_device(const Tensor& host) = 0;
  // dst = dst.nbytes() bytes from `host`, in stream order; `host` may be reused on return.
  virtual void upload(const void* host, Tensor& dst) = 0;
  // src.nbytes() bytes to `host`; waits for the stream. Counted.
  virtual void download(const Tensor& src, void* host) = 0;
  // Waits until everything issued so far has finished.
  virtual void synchronize() = 0;

  const Counters& counters() const { return counters_; }

 protected:
  Counters counters_;
};

}  // namespace ballast::kernels

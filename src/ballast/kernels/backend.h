#pragma once
// The backend contract, part 1: one device's memory, transfers and stream (part 2, the compute
// ops, is ops.h). Everything is in stream order: an op, an upload or a copy runs after the calls
// before it; download() and synchronize() wait for them. A backend counts what it allocates and
// transfers, so that tests can hold a steady-state pass to no allocation and one download.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ballast/core/tensor.h"

namespace ballast::kernels {

class Ops;

// Where a pass spends its time, by op (bench's per-kernel breakdown). Some ops report a variant
// after a space ("matmul gemv", "attention decode"): the kernel path they took.
struct OpTime {
  std::string op;
  int64_t calls = 0;
  double seconds = 0;  // device time
};

struct Counters {
  int64_t allocations = 0;  // device buffers allocated: alloc(), workspace growth, op scratch growth
  int64_t bytes_allocated = 0;
  int64_t uploads = 0;      // host -> device copies
  int64_t bytes_uploaded = 0;
  int64_t downloads = 0;    // device -> host copies
  int64_t bytes_downloaded = 0;
  int64_t graph_replays = 0;  // captured graphs launched
  int64_t graphs = 0;         // captured graphs held now
  // Device memory those graphs took as they were instantiated (free memory before less after;
  // 0 where the backend cannot tell): what a graph of each bucket, or each combination of the
  // ranks' buckets under in-process EP, costs beside the buffers it reads.
  int64_t graph_bytes = 0;
  // Bumped whenever a buffer the ops keep for themselves moves (scratch regrown): graphs
  // captured before then read freed memory and must be captured again.
  int64_t memory_epoch = 0;
};

// A device's memory now, in bytes: what allocations can still get, and all of it.
struct MemoryInfo {
  int64_t free_bytes = 0;
  int64_t total_bytes = 0;
};

// What the hardware can do, measured (bench prints every speed beside these, as ratios).
struct Ceilings {
  double copy_bytes_per_s = 0;  // bytes read + written per second by a large device-to-device copy
  double gemm_flops_per_s = 0;  // a large dense matrix product in the vendor library: bf16 on a
                                // GPU (cuBLAS); on the CPU the faster of OpenBLAS sgemm over the
                                // pool and ballast's own bf16 product (fp32 math either way)
  std::string gemm;             // what was multiplied, e.g. "cuBLAS bf16 8192^3"
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual std::string describe() const = 0;  // e.g. "cpu, 16 threads"
  virtual Ops& ops() = 0;

  // A device buffer, its contents undefined. Counted.
  virtual Tensor alloc(std::vector<int64_t> shape, DType dtype) = 0;
  // A weight as this device reads it: a copy in device memory (counted as an allocation and an
  // upload); the CPU, told so (CpuOptions), returns the host (mmapped) view itself.
  virtual Tensor to_device(const Tensor& host) = 0;
  // dst = dst.nbytes() bytes from `host`, in stream order; `host` may be reused on return.
  virtual void upload(const void* host, Tensor& dst) = 0;
  // src.nbytes() bytes to `host`; waits for the stream. Counted.
  virtual void download(const Tensor& src, void* host) = 0;
  // A download the host does not wait for (the engine's overlap schedule reads a pass's results
  // while the next pass runs): download_async queues src.nbytes() bytes to `host`, memory from
  // host_buffer, in stream order and returns; they are there once wait_downloads() returns, which
  // waits for the downloads queued so far, not for the work queued after them. Counted. A backend
  // without a queue (the CPU) downloads at once and allocates ordinary memory.
  virtual std::shared_ptr<void> host_buffer(size_t bytes) {
    return std::shared_ptr<void>(::operator new(std::max<size_t>(bytes, 1)), [](void* p) { ::operator delete(p); });
  }
  virtual void download_async(const Tensor& src, void* host) { download(src, host); }
  virtual void wait_downloads() {}
  // Waits until everything issued so far has finished.
  virtual void synchronize() = 0;
  // Ordering between the streams of backends on one device without the host waiting: mark(slot)
  // returns a handle on the work issued so far (valid until this backend's next mark of that slot,
  // 0 to 3: the data plane's two, a graph group's two; the next mark of it reuses it); after(m) makes the work issued from then on wait for the work m
  // covers, whichever backend of the device marked it. The CPU backend's work is done when issued:
  // null, nothing.
  virtual const void* mark(int slot) { return nullptr; }
  virtual void after(const void* mark) {}
  // The stream this backend issues its work on (a cudaStream_t for CUDA; null on the CPU): where
  // a transport that queues its own work behind the ops (NCCL) queues it.
  virtual void* stream() const { return nullptr; }

  // Graphs (CUDA graphs): the work issued between begin_capture() and end_capture(key) is
  // recorded, not run, into a graph kept under `key`; replay(key) runs it again on the same
  // buffers, whose contents the caller refreshes first. The work must not allocate, wait or copy
  // from pageable host memory (run it once before capturing, so that every buffer has grown).
  // A backend that cannot capture says so, and callers run their work as it comes.
  virtual bool can_capture() const { return false; }
  virtual void begin_capture() {}
  virtual void end_capture(int64_t key) {}
  virtual bool replay(int64_t key) { return false; }  // false: no graph under key
  virtual int64_t graph_nodes(int64_t key) const { return 0; }  // kernels and copies in the graph
  virtual void drop_graphs() {}
  // Whether the stream's work is being recorded into a graph, by this backend's begin_capture or
  // because it waits (after) for work of a stream that is: then nothing may wait for it.
  virtual bool capturing() const { return false; }

  // Op timing: between start and stop, every op's device time is measured (on a GPU with events
  // around each op, which serialises nothing but adds a little; no graph is captured meanwhile,
  // can_capture() says false). stop returns the ops by decreasing total time.
  virtual void start_op_timing() = 0;
  virtual std::vector<OpTime> stop_op_timing() = 0;

  // An external profiler's window (on a GPU cudaProfilerStart / Stop, which Nsight Compute and
  // Nsight Systems honour with --profile-from-start off / --capture-range cudaProfilerApi): the
  // work issued while it is open is what they record. Nothing on a backend without one.
  virtual void profiler_window(bool open) {}

  // Measures the ceilings now (a second or so; allocates and frees its own buffers).
  virtual Ceilings measure_ceilings() = 0;

  // The device's memory now (a GPU's as its driver reports it; the CPU's: the host's available
  // memory, which counts what the page cache could give back, and its total).
  virtual MemoryInfo memory() const = 0;

  // The element type of the attention layers' K/V caches this backend's attention reads best: F32,
  // or BF16 where its attention multiplies in bf16 anyway (half the bytes a step reads).
  virtual DType kv_cache_dtype() const { return DType::F32; }

  const Counters& counters() const { return counters_; }

 protected:
  Counters counters_;
};

}  // namespace ballast::kernels

#pragma once
// The CUDA backend (sm_90a first): device memory, one stream per backend, every op of ops.h as
// CUDA kernels (cuBLAS where it fits). Host code never reads device data: index inputs stay on
// the device and are checked there. This header needs no CUDA headers, so that code above the
// contract can build one without nvcc.
#include <memory>
#include <string>

#include "ballast/kernels/backend.h"

namespace ballast::kernels {

class CudaOps;

// Whether a CUDA device is visible to this process (false, not an error, without a driver or a
// GPU; also false in a build without CUDA).
bool cuda_available();
// How many CUDA devices are visible to this process (0 without a driver or a GPU).
int cuda_device_count();

struct CudaOptions {
  // Matrix products of many rows with BF16/F16 weights on the tensor cores, x rounded to 16 bits
  // (fp32 accumulation): the serving default. false: fp32 SIMT kernels that equal the CPU
  // reference to fp32 rounding (the conformance and parity tests).
  bool bf16_matmul = true;
};

class CudaBackend final : public Backend {
 public:
  // Takes device `device` (cudaSetDevice on the calling thread; every later call must come from a
  // thread that set it too: the backend sets it on entry). Throws a clear error when no such
  // device exists or this build has no kernels for its architecture.
  explicit CudaBackend(int device = 0, CudaOptions options = {});
  ~CudaBackend() override;

  Device device() const override { return Device::CUDA; }
  std::string describe() const override;
  Ops& ops() override;
  // BF16 under bf16 products (its attention rounds K and V to bf16 to multiply them), else F32.
  DType kv_cache_dtype() const override { return options_.bf16_matmul ? DType::BF16 : DType::F32; }

  Tensor alloc(std::vector<int64_t> shape, DType dtype) override;
  // Weights are copied once into large device blocks (few allocations for a model of many
  // small tensors); the view returned lives as long as the backend.
  Tensor to_device(const Tensor& host) override;
  void upload(const void* host, Tensor& dst) override;
  void download(const Tensor& src, void* host) override;
  std::shared_ptr<void> host_buffer(size_t bytes) override;
  void download_async(const Tensor& src, void* host) override;
  void wait_downloads() override;
  void synchronize() override;
  const void* mark(int slot) override;  // a cudaEvent_t (one a slot, reused) recorded on the stream
  void after(const void* mark) override;

  bool can_capture() const override;  // not while ops are timed
  bool capturing() const override;
  void begin_capture() override;
  void end_capture(int64_t key) override;
  bool replay(int64_t key) override;
  int64_t graph_nodes(int64_t key) const override;
  void drop_graphs() override;
  void start_op_timing() override;
  std::vector<OpTime> stop_op_timing() override;
  void profiler_window(bool open) override;
  Ceilings measure_ceilings() override;
  MemoryInfo memory() const override;

  // The stream every op and copy of this backend is issued on (a cudaStream_t).
  void* stream() const override;
  int device_index() const { return device_; }

  struct Impl;

 private:
  // A download queued on the stream, checked and counted (what download and download_async share):
  // the trace's event (a cudaEvent_t, null when tracing is off) and the host's time of issue.
  struct QueuedDownload {
    void* traced = nullptr;
    double issued = 0;
  };
  QueuedDownload queue_download(const Tensor& src, void* host);

  int device_;
  CudaOptions options_;
  std::unique_ptr<Impl> impl_;
  std::unique_ptr<CudaOps> ops_;
};

}  // namespace ballast::kernels

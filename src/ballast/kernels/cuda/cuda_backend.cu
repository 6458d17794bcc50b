#include "ballast/kernels/cuda/cuda_backend.h"

#include <cuda_profiler_api.h>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <map>
#include <utility>
#include <vector>

#include "ballast/kernels/cuda/cuda_ops.h"
#include "ballast/kernels/cuda/cuda_support.cuh"

namespace ballast::kernels {

using cuda::check_cuda;

// An empty kernel: whether it has an image for the device tells whether this build runs there.
__global__ void cuda_probe_kernel() {}

int cuda_device_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

bool cuda_available() { return cuda_device_count() > 0; }

// BALLAST_CUDA_TRACE=N: every Nth download prints what the stream did since the download before:
// each upload, graph launch and the download itself, with the host's time of issue and the GPU's
// time of completion (a CUDA event after it), both in microseconds after the download before (its
// return on the host, its completion on the GPU). The gaps between passes, where the GPU waits for
// the host, are what it shows (docs/perf.md, session 16). Off: one test of a flag a call.
class CudaTimeline {
 public:
  CudaTimeline() {
    const char* v = std::getenv("BALLAST_CUDA_TRACE");
    every_ = v ? std::max(0, std::atoi(v)) : 0;
  }
  ~CudaTimeline() {
    for (const Mark& m : marks_) cudaEventDestroy(m.done);
    for (cudaEvent_t e : pool_) cudaEventDestroy(e);
    if (ref_done_) cudaEventDestroy(ref_done_);
  }
  bool on() const { return every_ > 0; }
  // The host's time of an issue, in microseconds (0 when tracing is off: no clock read).
  double issue_time() const { return on() ? now_us() : 0; }
  // After an upload or graph launch issued at host time `issued`.
  void mark(cudaStream_t stream, const char* what, int64_t amount, const char* unit, double issued) {
    if (on()) marks_.push_back({what, amount, unit, issued, event(stream)});
  }
  // Around a download: before its copy is queued (returns the event to pass to after_download).
  cudaEvent_t before_download(cudaStream_t stream) { return on() ? event(stream) : nullptr; }
  void after_download(cudaEvent_t done, double issued) {
    if (!done) return;
    const double back = now_us();
    if (ref_done_ && ++downloads_ % every_ == 0) {
      std::string line = fmt::format("[ballast] cuda trace, download {} (us: issued / done)", downloads_);
      for (const Mark& m : marks_)
        line += fmt::format(" | {} {} {}: {:.0f} / {:.0f}", m.what, m.amount, m.unit, m.issued - ref_back_,
                            since_ref(m.done));
      line += fmt::format(" | download: {:.0f} / {:.0f}, back {:.0f}", issued - ref_back_, since_ref(done),
                          back - ref_back_);
      fmt::print(stderr, "{}\n", line);
    }
    for (const Mark& m : marks_) pool_.push_back(m.done);
    marks_.clear();
    if (ref_done_) pool_.push_back(ref_done_);
    ref_done_ = done;
    ref_back_ = back;
  }

 private:
  struct Mark {
    const char* what;
    int64_t amount;
    const char* unit;
    double issued;
    cudaEvent_t done;
  };
  static double now_us() {
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
  }
  cudaEvent_t event(cudaStream_t stream) {
    cudaEvent_t e = nullptr;
    if (pool_.empty()) check_cuda(cudaEventCreate(&e), "trace: cudaEventCreate");
    else e = pool_.back(), pool_.pop_back();
    check_cuda(cudaEventRecord(e, stream), "trace: cudaEventRecord");
    return e;
  }
  double since_ref(cudaEvent_t e) const {
    float ms = 0;
    cudaEventElapsedTime(&ms, ref_done_, e);
    return double(ms) * 1e3;
  }
  int every_ = 0;
  int64_t downloads_ = 0;
  std::vector<Mark> marks_;
  std::vector<cudaEvent_t> pool_;
  cudaEvent_t ref_done_ = nullptr;  // the download before: its completion on the GPU ...
  double ref_back_ = 0;             // ... and its return on the host
};

struct CudaBackend::Impl {
  struct Graph {
    cudaGraphExec_t exec = nullptr;
    int64_t nodes = 0;
    int64_t bytes = 0;  // device memory its instantiation took
  };
  CudaTimeline timeline;
  std::map<int64_t, Graph> graphs;
  cudaStream_t stream = nullptr;
  cudaEvent_t markers[4] = {};  // mark()'s, by slot, made on first use
  // download_async's: the last one's completion (made on first use), and for the trace its
  // event and time of issue until wait_downloads.
  cudaEvent_t downloaded = nullptr;
  cudaEvent_t traced_download = nullptr;
  double download_issued = 0;
  bool downloads_pending = false;
  cublasHandle_t cublas = nullptr;
  std::shared_ptr<void> cublas_workspace;
  cudaDeviceProp props{};
  // Weights: bump-allocated from blocks of at least kWeightBlock bytes.
  static constexpr size_t kWeightBlock = size_t(1) << 30;
  std::vector<std::shared_ptr<void>> weight_blocks;
  char* weight_next = nullptr;
  size_t weight_left = 0;
};

namespace {
constexpr size_t kCublasWorkspace = size_t(32) << 20;  // what cuBLAS asks for on Hopper

// A device allocation owned by a shared_ptr (freed when the last view goes).
std::shared_ptr<void> device_buffer(size_t bytes, int device, const std::string& what) {
  void* p = cuda::device_malloc(std::max<size_t>(bytes, 256), what);
  return std::shared_ptr<void>(p, [device](void* q) {
    cudaSetDevice(device);
    cudaFree(q);
  });
}

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    check(d >= 0, "cuda alloc: negative dimension {}", d);
    n *= d;
  }
  return n;
}
}  // namespace

CudaBackend::CudaBackend(int device, CudaOptions options)
    : device_(device), options_(options), impl_(std::make_unique<Impl>()) {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  check(err == cudaSuccess && n > 0, "--device cuda: no CUDA device is visible ({})",
        err == cudaSuccess ? "none found" : cudaGetErrorString(err));
  check(device >= 0 && device < n, "--device cuda: device {} asked for, {} visible", device, n);
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  check_cuda(cudaGetDeviceProperties(&impl_->props, device), "cudaGetDeviceProperties");
  // The kernels are built for the architectures CMAKE_CUDA_ARCHITECTURES names (sm_90a by
  // default); on another GPU the first launch would fail with "no kernel image": say so up front.
  cudaFuncAttributes attr{};
  const cudaError_t probe = cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(&cuda_probe_kernel));
  check(probe == cudaSuccess,
        "--device cuda: this build has no kernels for {} (compute capability {}.{}): rebuild with "
        "-DCMAKE_CUDA_ARCHITECTURES={}{} ({})",
        impl_->props.name, impl_->props.major, impl_->props.minor, impl_->props.major, impl_->props.minor,
        cudaGetErrorString(probe));
  check_cuda(cudaStreamCreateWithFlags(&impl_->stream, cudaStreamNonBlocking), "cudaStreamCreate");
  check(cublasCreate(&impl_->cublas) == CUBLAS_STATUS_SUCCESS, "cublasCreate failed");
  check(cublasSetStream(impl_->cublas, impl_->stream) == CUBLAS_STATUS_SUCCESS, "cublasSetStream failed");
  // cuBLAS's workspace set once, so that products captured into graphs allocate nothing.
  impl_->cublas_workspace = device_buffer(kCublasWorkspace, device, "the cuBLAS workspace");
  ++counters_.allocations;
  counters_.bytes_allocated += int64_t(kCublasWorkspace);
  check(cublasSetWorkspace(impl_->cublas, impl_->cublas_workspace.get(), kCublasWorkspace) == CUBLAS_STATUS_SUCCESS,
        "cublasSetWorkspace failed");
  const cudaDeviceProp& props = impl_->props;
  const CudaDeviceTraits traits{.sms = std::max(props.multiProcessorCount, 1),
                                .capability = props.major * 10 + props.minor,
                                .smem_optin = props.sharedMemPerBlockOptin,
                                .smem_per_sm = props.sharedMemPerMultiprocessor};
  ops_ = std::make_unique<CudaOps>(counters_, traits, impl_->stream, impl_->cublas, impl_->cublas_workspace.get(),
                                   kCublasWorkspace, options.bf16_matmul);
}

CudaBackend::~CudaBackend() {
  cudaSetDevice(device_);
  if (impl_->stream) cudaStreamSynchronize(impl_->stream);
  drop_graphs();
  ops_.reset();
  if (impl_->cublas) cublasDestroy(impl_->cublas);
  for (cudaEvent_t e : impl_->markers)
    if (e) cudaEventDestroy(e);
  if (impl_->downloaded) cudaEventDestroy(impl_->downloaded);
  if (impl_->stream) cudaStreamDestroy(impl_->stream);
}

std::string CudaBackend::describe() const {
  return fmt::format("cuda:{} {} (sm_{}{}, {:.0f} GiB, {} matrix products)", device_, impl_->props.name,
                     impl_->props.major, impl_->props.minor, double(impl_->props.totalGlobalMem) / double(1 << 30),
                     options_.bf16_matmul ? "bf16 tensor-core" : "fp32");
}

Ops& CudaBackend::ops() { return *ops_; }

void* CudaBackend::stream() const { return impl_->stream; }

MemoryInfo CudaBackend::memory() const {
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  size_t free = 0, total = 0;
  check_cuda(cudaMemGetInfo(&free, &total), "cudaMemGetInfo");
  return {int64_t(free), int64_t(total)};
}

Tensor CudaBackend::alloc(std::vector<int64_t> shape, DType dtype) {
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  const size_t bytes = size_t(numel_of(shape)) * dtype_size(dtype);
  auto owner =
      device_buffer(bytes, device_, fmt::format("cuda alloc of {} {}", dtype_name(dtype), format_shape(shape)));
  ++counters_.allocations;
  counters_.bytes_allocated += int64_t(bytes);
  void* p = owner.get();
  return Tensor::borrow(p, std::move(shape), dtype, Device::CUDA, std::move(owner));
}

Tensor CudaBackend::to_device(const Tensor& host) {
  check(host.device() == Device::CPU, "to_device: tensor {} is not in host memory", host);
  // Block-scaled FP8: the elements and their scales, each copied once.
  if (host.dtype() == DType::F8_E4M3_B128)
    return Tensor::block_scaled(to_device(host.elements()), to_device(host.scales()));
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  const size_t bytes = host.nbytes(), rounded = (std::max<size_t>(bytes, 1) + 255) / 256 * 256;
  if (rounded > impl_->weight_left) {
    const size_t size = std::max(rounded, Impl::kWeightBlock);
    impl_->weight_blocks.push_back(device_buffer(size, device_, "a block of weights"));
    impl_->weight_next = static_cast<char*>(impl_->weight_blocks.back().get());
    impl_->weight_left = size;
    ++counters_.allocations;
    counters_.bytes_allocated += int64_t(size);
  }
  void* p = impl_->weight_next;
  impl_->weight_next += rounded;
  impl_->weight_left -= rounded;
  Tensor t = Tensor::borrow(p, host.shape(), host.dtype(), Device::CUDA, impl_->weight_blocks.back());
  upload(host.raw(), t);
  return t;
}

void CudaBackend::upload(const void* host, Tensor& dst) {
  check(dst.device() == Device::CUDA, "upload: tensor {} is not in CUDA memory", dst);
  if (dst.nbytes() == 0) return;
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  // From pageable memory the copy is staged before the call returns: `host` may be reused.
  const double issued = impl_->timeline.issue_time();
  check_cuda(cudaMemcpyAsync(dst.raw(), host, dst.nbytes(), cudaMemcpyHostToDevice, impl_->stream), "upload");
  impl_->timeline.mark(impl_->stream, "upload", int64_t(dst.nbytes()), "B", issued);
  ++counters_.uploads;
  counters_.bytes_uploaded += int64_t(dst.nbytes());
}

CudaBackend::QueuedDownload CudaBackend::queue_download(const Tensor& src, void* host) {
  check(src.device() == Device::CUDA, "download: tensor {} is not in CUDA memory", src);
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  QueuedDownload q;
  q.issued = impl_->timeline.issue_time();
  ops_->join_side();
  q.traced = impl_->timeline.before_download(impl_->stream);
  if (src.nbytes() > 0)
    check_cuda(cudaMemcpyAsync(host, src.raw(), src.nbytes(), cudaMemcpyDeviceToHost, impl_->stream), "download");
  ++counters_.downloads;
  counters_.bytes_downloaded += int64_t(src.nbytes());
  return q;
}

void CudaBackend::download(const Tensor& src, void* host) {
  const QueuedDownload q = queue_download(src, host);
  check_cuda(cudaStreamSynchronize(impl_->stream), "download: stream");
  impl_->timeline.after_download(static_cast<cudaEvent_t>(q.traced), q.issued);
  ops_->raise_device_faults();
}

std::shared_ptr<void> CudaBackend::host_buffer(size_t bytes) {
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  void* p = nullptr;
  check_cuda(cudaMallocHost(&p, std::max<size_t>(bytes, 1)), "cudaMallocHost (download buffer)");
  return std::shared_ptr<void>(p, [](void* q) { cudaFreeHost(q); });
}

void CudaBackend::download_async(const Tensor& src, void* host) {
  // (Into page-locked memory the copy is queued and the call returns; into pageable memory it
  // would wait.)
  const QueuedDownload q = queue_download(src, host);
  if (!impl_->downloaded)
    check_cuda(cudaEventCreateWithFlags(&impl_->downloaded, cudaEventDisableTiming), "cudaEventCreate");
  check_cuda(cudaEventRecord(impl_->downloaded, impl_->stream), "cudaEventRecord (download)");
  if (q.traced) {
    impl_->traced_download = static_cast<cudaEvent_t>(q.traced);
    impl_->download_issued = q.issued;
  }
  impl_->downloads_pending = true;
}

void CudaBackend::wait_downloads() {
  if (!impl_->downloads_pending) return;
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  check_cuda(cudaEventSynchronize(impl_->downloaded), "download: wait");
  impl_->downloads_pending = false;
  if (impl_->traced_download) impl_->timeline.after_download(std::exchange(impl_->traced_download, nullptr),
                                                              impl_->download_issued);
  ops_->raise_device_faults();
}

void CudaBackend::synchronize() {
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  ops_->join_side();
  check_cuda(cudaStreamSynchronize(impl_->stream), "synchronize");
  ops_->raise_device_faults();
}

const void* CudaBackend::mark(int slot) {
  check(slot >= 0 && slot <= 3, "mark: slot {} (0 to 3)", slot);
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  cudaEvent_t& e = impl_->markers[slot];
  if (!e) check_cuda(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
  // Re-recording is safe once every wait on the last record was issued: a wait takes the event as
  // it was recorded when the wait is issued.
  check_cuda(cudaEventRecord(e, impl_->stream), "cudaEventRecord (mark)");
  return e;
}

void CudaBackend::after(const void* mark) {
  if (!mark) return;
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  check_cuda(cudaStreamWaitEvent(impl_->stream, static_cast<cudaEvent_t>(const_cast<void*>(mark)), 0),
             "cudaStreamWaitEvent (after)");
}

void CudaBackend::begin_capture() {
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  // Thread-local: other ranks' threads may go on issuing their own work meanwhile.
  check_cuda(cudaStreamBeginCapture(impl_->stream, cudaStreamCaptureModeThreadLocal), "graph: begin capture");
}

void CudaBackend::end_capture(int64_t key) {
  cudaGraph_t graph = nullptr;
  ops_->join_side();  // (a capture ends only where every stream it forked has joined)
  check_cuda(cudaStreamEndCapture(impl_->stream, &graph), "graph: end capture");
  Impl::Graph g;
  size_t nodes = 0;
  check_cuda(cudaGraphGetNodes(graph, nullptr, &nodes), "graph: nodes");
  g.nodes = int64_t(nodes);
  size_t free_before = 0, free_after = 0, total = 0;
  check_cuda(cudaMemGetInfo(&free_before, &total), "cudaMemGetInfo");
  const cudaError_t err = cudaGraphInstantiate(&g.exec, graph, 0);
  cudaGraphDestroy(graph);
  check_cuda(err, "graph: instantiate");
  check_cuda(cudaMemGetInfo(&free_after, &total), "cudaMemGetInfo");
  // Other ranks' threads may allocate meanwhile on the same device: an upper bound, 0 if it grew.
  g.bytes = free_before > free_after ? int64_t(free_before - free_after) : 0;
  if (auto it = impl_->graphs.find(key); it != impl_->graphs.end()) {
    cudaGraphExecDestroy(it->second.exec);
    counters_.graph_bytes -= it->second.bytes;
  }
  impl_->graphs[key] = g;
  counters_.graphs = int64_t(impl_->graphs.size());
  counters_.graph_bytes += g.bytes;
}

bool CudaBackend::replay(int64_t key) {
  const auto it = impl_->graphs.find(key);
  if (it == impl_->graphs.end()) return false;
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  const double issued = impl_->timeline.issue_time();
  check_cuda(cudaGraphLaunch(it->second.exec, impl_->stream), "graph: launch");
  impl_->timeline.mark(impl_->stream, "graph", it->second.nodes, "nodes", issued);
  ++counters_.graph_replays;
  return true;
}

int64_t CudaBackend::graph_nodes(int64_t key) const {
  const auto it = impl_->graphs.find(key);
  return it == impl_->graphs.end() ? 0 : it->second.nodes;
}

void CudaBackend::drop_graphs() {
  // A launch still queued (the overlap schedule issues a pass before the last one is done) may
  // run any of them.
  if (!impl_->graphs.empty()) check_cuda(cudaStreamSynchronize(impl_->stream), "drop graphs: stream");
  for (auto& [key, g] : impl_->graphs) cudaGraphExecDestroy(g.exec);
  impl_->graphs.clear();
  counters_.graphs = 0;
  counters_.graph_bytes = 0;
}

bool CudaBackend::can_capture() const { return !ops_->timer().on(); }

bool CudaBackend::capturing() const {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  check_cuda(cudaStreamIsCapturing(impl_->stream, &status), "cudaStreamIsCapturing");
  return status == cudaStreamCaptureStatusActive;
}

void CudaBackend::start_op_timing() {
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  ops_->timer().start();
}

std::vector<OpTime> CudaBackend::stop_op_timing() {
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  return ops_->timer().stop();
}

void CudaBackend::profiler_window(bool open) {
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  check_cuda(cudaStreamSynchronize(impl_->stream), "cudaStreamSynchronize");  // only the window's work
  check_cuda(open ? cudaProfilerStart() : cudaProfilerStop(), open ? "cudaProfilerStart" : "cudaProfilerStop");
}

Ceilings CudaBackend::measure_ceilings() {
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  Ceilings c;
  cudaEvent_t e0, e1;
  check_cuda(cudaEventCreate(&e0), "cudaEventCreate");
  check_cuda(cudaEventCreate(&e1), "cudaEventCreate");
  // Times `runs` calls of fn after 2 untimed ones: seconds per call.
  auto time = [&](int runs, const auto& fn) {
    for (int i = 0; i < 2; ++i) fn();
    check_cuda(cudaEventRecord(e0, impl_->stream), "cudaEventRecord");
    for (int i = 0; i < runs; ++i) fn();
    check_cuda(cudaEventRecord(e1, impl_->stream), "cudaEventRecord");
    check_cuda(cudaEventSynchronize(e1), "cudaEventSynchronize");
    float ms = 0;
    check_cuda(cudaEventElapsedTime(&ms, e0, e1), "cudaEventElapsedTime");
    return double(ms) * 1e-3 / runs;
  };
  {  // Copy: 2 GiB device to device.
    const size_t bytes = size_t(1) << 31;
    auto a = device_buffer(bytes, device_, "ceilings: copy source");
    auto b = device_buffer(bytes, device_, "ceilings: copy target");
    check_cuda(cudaMemsetAsync(a.get(), 0, bytes, impl_->stream), "cudaMemsetAsync");
    const double s = time(5, [&] {
      check_cuda(cudaMemcpyAsync(b.get(), a.get(), bytes, cudaMemcpyDeviceToDevice, impl_->stream), "copy");
    });
    c.copy_bytes_per_s = 2.0 * double(bytes) / s;
  }
  {  // GEMM: bf16 8192^3, fp32 accumulation, random inputs (zeros run faster on the tensor cores).
    const int n = 8192;
    Tensor a = alloc({n, n}, DType::BF16), b = alloc({n, n}, DType::BF16), y = alloc({n, n}, DType::BF16);
    ops_->fill_uniform(a, 1, 1.0f);
    ops_->fill_uniform(b, 2, 1.0f);
    const float alpha = 1.0f, beta = 0.0f;
    const double s = time(10, [&] {
      const cublasStatus_t st = cublasGemmEx(impl_->cublas, CUBLAS_OP_T, CUBLAS_OP_N, n, n, n, &alpha, a.raw(),
                                             CUDA_R_16BF, n, b.raw(), CUDA_R_16BF, n, &beta, y.raw(), CUDA_R_16BF, n,
                                             CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
      check(st == CUBLAS_STATUS_SUCCESS, "ceilings: cublasGemmEx failed ({})", cublasGetStatusString(st));
    });
    c.gemm_flops_per_s = 2.0 * double(n) * n * n / s;
    c.gemm = fmt::format("cuBLAS bf16 {}^3", n);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  return c;
}

}  // namespace ballast::kernels

// Latency and bandwidth of the control plane (barrier, all_reduce) and the data plane
// (all_to_all_v, send_recv), over host buffers, or over GPU buffers with NCCL.
//   bench_dist [G]                      in-process ranks (threads), G = 2 by default
//   mpirun -np G ... bench_dist         MPI processes
//   bench_dist nccl [G]                 in-process ranks on GPUs 0..G-1 (G = the visible GPUs by default)
//   mpirun -np G ... bench_dist nccl    MPI processes, one GPU each by local rank
// Rank 0 prints one line per measurement: its wall time per call, a barrier before and after (GPU
// work waited for before the second).
#include <fmt/format.h>
#ifdef BALLAST_HAS_NCCL
#include <cuda_runtime.h>

#include "ballast/dist/local_gpu.h"
#include "ballast/dist/nccl_data_plane.h"
#include "dist/cuda_tensors.h"
#endif

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>

#include "ballast/dist/mpi_communicator.h"
#include "ballast/dist/mpi_data_plane.h"
#include "ballast/dist/thread_world.h"

using namespace ballast::dist;
using ballast::DType;
using ballast::Tensor;

namespace {

// Where the data plane's buffers live: host tensors, or (NCCL) copies in GPU memory (put), and how
// to wait for the work a plane queued (nothing on the host).
struct Buffers {
  std::function<Tensor(const Tensor& host)> put = [](const Tensor& host) { return host; };
  std::function<void()> wait = [] {};
};

template <typename F>
double seconds_per(Communicator& c, const Buffers& b, int iters, F&& f) {
  c.barrier();
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) f();
  b.wait();
  c.barrier();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters;
}

void bench(Communicator& c, DataPlane& d, const char* kind, const Buffers& b = {}) {
  const int G = c.size(), me = c.rank();
  auto say = [&](const std::string& s) {
    if (me == 0) fmt::print("{} G={} {}\n", kind, G, s);
  };
  say(fmt::format("barrier              {:8.2f} us", 1e6 * seconds_per(c, b, 2000, [&] { c.barrier(); })));
  std::vector<int64_t> counts(48 * 256, 1);
  say(fmt::format("all_reduce 12288xi64 {:8.2f} us",
                  1e6 * seconds_per(c, b, 200, [&] { c.all_reduce_sum(std::span<int64_t>(counts)); })));
  Tensor device_counts = b.put(Tensor::zeros({48 * 256}, DType::I32));
  say(fmt::format("data all_reduce 12288xi32 {:8.2f} us",
                  1e6 * seconds_per(c, b, 200, [&] { d.all_reduce_sum(device_counts); })));
  // Rows of 4 KiB (a 2048-wide bf16 hidden state, as F32 [n, 1024]).
  const int64_t row_elems = 1024, row_bytes = row_elems * 4;
  for (int64_t rows : {int64_t(0), int64_t(1), int64_t(64), int64_t(1024)}) {
    Tensor send = b.put(Tensor::zeros({rows * G, row_elems})), recv = b.put(Tensor::zeros({rows * G, row_elems}));
    Tensor counts = Tensor::zeros({G}, DType::I32), recv_counts = b.put(Tensor::zeros({G}, DType::I32));
    for (int g = 0; g < G; ++g) counts.data<int32_t>()[g] = int32_t(rows);
    const Tensor send_counts = b.put(counts);
    const int iters = rows * row_bytes >= (int64_t(1) << 20) ? 20 : 500;
    const double t = seconds_per(c, b, iters, [&] { d.all_to_all_v(send, send_counts, recv, recv_counts); });
    say(fmt::format("all_to_all_v {:>5} rows of 4 KiB/pair {:8.2f} us  {:8.2f} GB/s out per rank", rows, 1e6 * t,
                    t > 0 ? double(rows * row_bytes) * (G - 1) / t / 1e9 : 0.0));
  }
  if (G >= 2) {
    for (int64_t bytes : {int64_t(8), int64_t(1) << 20, int64_t(64) << 20}) {
      Tensor out = b.put(Tensor::zeros({bytes / 4}, DType::I32)), in = b.put(Tensor::zeros({bytes / 4}, DType::I32));
      const int to = (me + 1) % G, from = (me + G - 1) % G;
      const DataPlane::Transfer items[] = {{DataPlane::Transfer::send, to, out},
                                           {DataPlane::Transfer::recv, from, in}};
      const int iters = bytes >= (int64_t(16) << 20) ? 5 : 200;
      const double t = seconds_per(c, b, iters, [&] { d.send_recv(items); });
      say(fmt::format("send_recv ring {:>9} B  {:8.2f} us  {:8.2f} GB/s per rank", bytes, 1e6 * t,
                      double(bytes) / t / 1e9));
    }
  }
}

}  // namespace

#ifdef BALLAST_HAS_NCCL
using ballast::test::cuda_ok;

// The NCCL plane of this rank on `gpu`, over `c`, with device buffers on its stream.
void bench_nccl(Communicator& c, int gpu) {
  cuda_ok(cudaSetDevice(gpu), "cudaSetDevice");
  cudaStream_t stream = nullptr;
  cuda_ok(cudaStreamCreate(&stream), "cudaStreamCreate");
  {
    NcclDataPlane d(c, gpu, stream);
    Buffers b;
    b.put = ballast::test::to_cuda;
    b.wait = [stream] { cuda_ok(cudaStreamSynchronize(stream), "cudaStreamSynchronize"); };
    bench(c, d, "nccl", b);
  }
  cudaStreamDestroy(stream);
}
#endif

int main(int argc, char** argv) {
  const bool nccl = argc > 1 && std::strcmp(argv[1], "nccl") == 0;
#ifdef BALLAST_HAS_NCCL
  if (nccl) {
    if (mpi_launched()) {
      MpiSession mpi(&argc, &argv);
      MpiCommunicator c;
      int gpus = 0;
      cuda_ok(cudaGetDeviceCount(&gpus), "cudaGetDeviceCount");
      bench_nccl(c, local_gpu(c.local_rank(), c.local_size(), gpus));
      return 0;
    }
    int gpus = 0;
    cuda_ok(cudaGetDeviceCount(&gpus), "cudaGetDeviceCount");
    const int G = argc > 2 ? std::atoi(argv[2]) : gpus;
    ThreadWorld world(G);
    run_ranks(world, [&](Communicator& c) { bench_nccl(c, c.rank()); });
    return 0;
  }
#else
  if (nccl) {
    fmt::print(stderr, "bench_dist: built without NCCL\n");
    return 1;
  }
#endif
  if (mpi_launched()) {
    MpiSession mpi(&argc, &argv);
    MpiCommunicator c;
    MpiDataPlane d;
    bench(c, d, "mpi");
    return 0;
  }
  const int G = argc > 1 ? std::atoi(argv[1]) : 2;
  ThreadWorld world(G);
  run_ranks(world, [&](Communicator& c) { bench(c, world.data_plane(c.rank()), "threads"); });
  return 0;
}

// The NCCL data plane against the conformance suite that the thread and MPI planes pass
// (data_plane_conformance.h), on device buffers: one rank per visible GPU, as in-process threads
// whose control plane (ThreadWorld) carries NCCL's unique id, each rank on its own stream. A
// one-GPU machine runs G = 1 (NCCL refuses two ranks on one GPU); a multi-GPU host runs every
// rank count up to its GPUs. Skipped where no GPU is visible (CI builds it there).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <chrono>
#include <functional>

#include "ballast/dist/nccl_data_plane.h"
#include "ballast/dist/thread_world.h"
#include "dist/cuda_tensors.h"
#include "dist/data_plane_conformance.h"

namespace ballast::dist {
namespace {

namespace dpc = data_plane_conformance;

int visible_gpus() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

using test::cuda_ok;

// Buffers for the plane: copies in device memory of the calling rank's GPU (cuda_tensors.h).
dpc::Memory cuda_memory() { return {Device::CUDA, test::to_cuda, test::to_host}; }

// fn on every rank of G (one GPU each, G <= the visible GPUs), each with its NCCL data plane.
void on_gpus(int G, const std::function<void(DataPlane&)>& fn) {
  ThreadWorld world(G, std::chrono::seconds(120));
  run_ranks(world, [&](Communicator& comm) {
    cuda_ok(cudaSetDevice(comm.rank()), "cudaSetDevice");
    cudaStream_t stream = nullptr;
    cuda_ok(cudaStreamCreate(&stream), "cudaStreamCreate");
    {
      NcclDataPlane plane(comm, comm.rank(), stream);
      fn(plane);
    }
    cudaStreamDestroy(stream);
  });
}

class NcclDataPlaneG : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    if (visible_gpus() < GetParam())
      GTEST_SKIP() << GetParam() << " ranks need " << GetParam() << " GPUs; " << visible_gpus() << " visible";
  }
};

TEST_P(NcclDataPlaneG, Everything) {
  on_gpus(GetParam(), [](DataPlane& d) {
    EXPECT_TRUE(d.moves(Device::CUDA));
    EXPECT_FALSE(d.moves(Device::CPU));
    dpc::everything(d, cuda_memory());
  });
}

TEST_P(NcclDataPlaneG, BadCallsFailOnEveryRankAndThePlaneGoesOn) {
  on_gpus(GetParam(), [](DataPlane& d) { dpc::bad_calls(d, "NCCL", cuda_memory()); });
}

TEST_P(NcclDataPlaneG, SendRecvSizeMismatchFailsOnTheReceiverOnly) {
  on_gpus(GetParam(), [](DataPlane& d) { dpc::send_recv_size_mismatch(d, cuda_memory()); });
}

INSTANTIATE_TEST_SUITE_P(Ranks, NcclDataPlaneG, ::testing::Values(1, 2, 3, 4, 8),
                         [](const auto& info) { return "G" + std::to_string(info.param); });

}  // namespace
}  // namespace ballast::dist

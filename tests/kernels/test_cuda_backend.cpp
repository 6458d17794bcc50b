// The op conformance suite on the CUDA backend (skipped where no CUDA device is visible), and
// what the CUDA backend itself promises: weights copied once into few blocks, counted transfers.
#include <cmath>
#include <memory>
#include <random>

#include "ballast/core/dtype.h"
#include "ballast/kernels/ops.h"

#include "ballast/kernels/cuda/cuda_backend.h"
#include "op_conformance.h"

namespace ballast::kernels::conformance {
namespace {

std::string no_device() { return cuda_available() ? "" : "no CUDA device"; }

INSTANTIATE_TEST_SUITE_P(Cuda, OpConformance,
                         ::testing::Values(BackendCase{"device0",
                                                       [] { return std::unique_ptr<Backend>(std::make_unique<CudaBackend>(0, CudaOptions{.bf16_matmul = false})); },
                                                       no_device}),
                         backend_case_name);

TEST(CudaBackend, WeightsShareFewBlocksAndTransfersAreCounted) {
  if (!cuda_available()) GTEST_SKIP() << "skipped: no CUDA device";
  CudaBackend be(0);
  EXPECT_EQ(be.device(), Device::CUDA);
  EXPECT_NE(be.describe().find("cuda:0"), std::string::npos) << be.describe();
  std::vector<Tensor> host;
  for (int i = 0; i < 50; ++i) host.push_back(Tensor::zeros({64, 64}, DType::BF16));
  const Counters c0 = be.counters();
  std::vector<Tensor> dev;
  for (const Tensor& h : host) dev.push_back(be.to_device(h));
  EXPECT_LE(be.counters().allocations - c0.allocations, 1) << "50 small weights, one block";
  EXPECT_EQ(be.counters().uploads - c0.uploads, 50);
  EXPECT_EQ(dev[1].device(), Device::CUDA);
  std::vector<uint16_t> back(64 * 64, 1);
  be.download(dev[7], back.data());
  EXPECT_EQ(back[100], 0);
  EXPECT_EQ(be.counters().downloads - c0.downloads, 1);
}

// bf16 matrix products (the serving default): cuBLAS on the tensor cores with x rounded to bf16.
// The reference rounds x the same way and sums in double: what is left is fp32 accumulation.
TEST(CudaBackend, Bf16MatmulEqualsTheProductOfRoundedInputs) {
  if (!cuda_available()) GTEST_SKIP() << "skipped: no CUDA device";
  CudaBackend be(0, CudaOptions{.bf16_matmul = true});
  const int64_t T = 40, K = 256, N = 96;
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> x(size_t(T * K)), wf(size_t(N * K));
  for (float& v : x) v = nd(rng);
  Tensor wh = Tensor::zeros({N, K}, DType::BF16);
  for (int64_t i = 0; i < N * K; ++i) {
    wh.data<uint16_t>()[i] = f32_to_bf16(0.1f * nd(rng));
    wf[size_t(i)] = bf16_to_f32(wh.data<uint16_t>()[i]);
  }
  Tensor w = be.to_device(wh), xd = be.alloc({T, K}, DType::F32), y = be.alloc({T, N}, DType::F32);
  be.upload(x.data(), xd);
  be.start_op_timing();
  be.ops().matmul(xd, w, y);
  const std::vector<OpTime> times = be.stop_op_timing();
  ASSERT_EQ(times.size(), 1u);
  EXPECT_EQ(times[0].op, "matmul gemm (cuBLAS bf16)") << "the tensor-core path was taken";
  std::vector<float> got(size_t(T * N));
  be.download(y, got.data());
  double worst = 0;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t n = 0; n < N; ++n) {
      double want = 0, scale = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double p = double(bf16_to_f32(f32_to_bf16(x[size_t(t * K + k)]))) * wf[size_t(n * K + k)];
        want += p;
        scale += std::abs(p);
      }
      worst = std::max(worst, std::abs(got[size_t(t * N + n)] - want) / scale);
    }
  EXPECT_LT(worst, 1e-5) << "relative to the sum of |products|";
}

TEST(CudaBackend, NoGraphIsCapturedWhileOpsAreTimed) {
  if (!cuda_available()) GTEST_SKIP() << "skipped: no CUDA device";
  CudaBackend be(0);
  EXPECT_TRUE(be.can_capture());
  be.start_op_timing();
  EXPECT_FALSE(be.can_capture());
  be.stop_op_timing();
  EXPECT_TRUE(be.can_capture());
}

}  // namespace
}  // namespace ballast::kernels::conformance

// The op conformance suite on the CUDA backend (skipped where no CUDA device is visible), and
// what the CUDA backend itself promises: weights copied once into few blocks, counted transfers.
#include <memory>

#include "ballast/kernels/cuda/cuda_backend.h"
#include "op_conformance.h"

namespace ballast::kernels::conformance {
namespace {

std::string no_device() { return cuda_available() ? "" : "no CUDA device"; }

INSTANTIATE_TEST_SUITE_P(Cuda, OpConformance,
                         ::testing::Values(BackendCase{"device0",
                                                       [] { return std::unique_ptr<Backend>(std::make_unique<CudaBackend>(0)); },
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

}  // namespace
}  // namespace ballast::kernels::conformance

// The op conformance suite on the CPU backend, with one thread and with a pool (the pool takes
// the parallel paths: sequences and expert groups side by side, rows and heads over workers).
#include <memory>

#include "ballast/kernels/cpu/cpu_backend.h"
#include "op_conformance.h"

namespace ballast::kernels::conformance {
namespace {

INSTANTIATE_TEST_SUITE_P(Cpu, OpConformance,
                         ::testing::Values(BackendCase{"threads1", [] { return std::unique_ptr<Backend>(std::make_unique<CpuBackend>(1)); }},
                                           BackendCase{"threads3", [] { return std::unique_ptr<Backend>(std::make_unique<CpuBackend>(3)); }}),
                         backend_case_name);

TEST(CpuBackend, DescribesItselfAndReadsWeightsInPlace) {
  CpuBackend one(1), three(3);
  EXPECT_EQ(one.describe(), "cpu, 1 thread");
  EXPECT_EQ(three.describe(), "cpu, 3 threads");
  EXPECT_EQ(three.device(), Device::CPU);
  Tensor host = Tensor::zeros({4, 4}, DType::BF16);
  const Counters c0 = three.counters();
  const Tensor w = three.to_device(host);
  EXPECT_EQ(w.raw(), host.raw()) << "the host view itself, no copy";
  EXPECT_EQ(three.counters().allocations, c0.allocations);
  EXPECT_EQ(three.counters().uploads, c0.uploads);
}

TEST(CpuBackend, AllocationsAre64ByteAlignedAndOutliveTheBackend) {
  Tensor t;
  {
    CpuBackend be(1);
    for (int64_t n : {1, 3, 17, 1000}) {
      Tensor a = be.alloc({n}, DType::BF16);
      EXPECT_EQ(reinterpret_cast<uintptr_t>(a.raw()) % 64, 0u);
    }
    t = be.alloc({8}, DType::F32);
  }
  t.f32()[7] = 1.0f;  // the tensor owns its memory
  EXPECT_EQ(t.f32()[7], 1.0f);
}

}  // namespace
}  // namespace ballast::kernels::conformance

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

TEST(CpuBackend, DescribesItselfAndCopiesWeightsOrReadsThemInPlace) {
  CpuBackend one(1), three(3), in_place(2, CpuOptions{.copy_weights = false});
  EXPECT_EQ(one.describe(), "cpu, 1 thread");
  EXPECT_EQ(three.describe(), "cpu, 3 threads");
  EXPECT_EQ(three.device(), Device::CPU);
  Tensor host = Tensor::zeros({4, 4}, DType::BF16);
  host.data<uint16_t>()[5] = 0x3f80;
  // By default a weight is copied into the backend's memory, counted as on a GPU.
  const Counters c0 = three.counters();
  const Tensor w = three.to_device(host);
  EXPECT_NE(w.raw(), host.raw());
  EXPECT_EQ(w.shape(), host.shape());
  EXPECT_EQ(w.data<uint16_t>()[5], 0x3f80);
  EXPECT_EQ(three.counters().allocations, c0.allocations + 1);
  EXPECT_EQ(three.counters().uploads, c0.uploads + 1);
  // Block-scaled FP8: elements and scales both copied, still block-scaled.
  Tensor q = Tensor::zeros({2, 130}, DType::F8_E4M3), s = Tensor::zeros({1, 2}, DType::F32);
  s.data<float>()[1] = 0.5f;
  const Tensor f = three.to_device(Tensor::block_scaled(q, s));
  EXPECT_EQ(f.dtype(), DType::F8_E4M3_B128);
  EXPECT_NE(f.scales().raw(), s.raw());
  EXPECT_EQ(f.scales().data<float>()[1], 0.5f);
  // Told so, the backend reads the host view in place: no copy, nothing counted.
  const Counters c1 = in_place.counters();
  EXPECT_EQ(in_place.to_device(host).raw(), host.raw()) << "the host view itself, no copy";
  EXPECT_EQ(in_place.counters().allocations, c1.allocations);
  EXPECT_EQ(in_place.counters().uploads, c1.uploads);
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

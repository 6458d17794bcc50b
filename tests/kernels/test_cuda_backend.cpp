// The op conformance suite on the CUDA backend (skipped where no CUDA device is visible), and
// what the CUDA backend itself promises: weights copied once into few blocks, counted transfers.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <numeric>
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

// A device allocation that cannot be made says what it was for, how large it was and how much of
// the device was free (an out-of-memory on a GPU that several ranks share names whose allocation
// ran out); the backend stays usable.
TEST(CudaBackend, AnAllocationPastTheDeviceSaysWhatAndHowMuch) {
  if (!cuda_available()) GTEST_SKIP() << "skipped: no CUDA device";
  CudaBackend be(0);
  test::expect_error([&] { be.alloc({int64_t(1) << 40}, DType::F32); },
                     {"cuda alloc of F32 [1099511627776]", "cannot allocate 4398.05 GB on cuda:0", "GB free"});
  Tensor t = be.alloc({16}, DType::F32);
  std::vector<float> back(16, 1.0f);
  be.download(t, back.data());
}

// BALLAST_CUDA_TRACE=1: each download prints what the stream did since the one before, each
// transfer and graph with its host issue and GPU completion times, the GPU's after the host's issue.
TEST(CudaBackend, TraceShowsEachTransferAndGraphBetweenDownloads) {
  if (!cuda_available()) GTEST_SKIP() << "skipped: no CUDA device";
  setenv("BALLAST_CUDA_TRACE", "1", 1);
  CudaBackend be(0);
  unsetenv("BALLAST_CUDA_TRACE");
  std::vector<float> host(64, 1.0f), back(64);
  Tensor a = be.alloc({64}, DType::F32), b = be.alloc({64}, DType::F32);
  be.download(a, back.data());  // the first download only starts the timeline
  ::testing::internal::CaptureStderr();
  be.upload(host.data(), a);
  be.begin_capture();
  be.ops().copy(a, b);
  be.end_capture(7);
  ASSERT_TRUE(be.replay(7));
  be.download(b, back.data());
  const std::string line = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(back[5], 1.0f);
  EXPECT_NE(line.find("cuda trace, download 1"), std::string::npos) << line;
  EXPECT_NE(line.find("| upload 256 B: "), std::string::npos) << line;
  EXPECT_NE(line.find("| graph 1 nodes: "), std::string::npos) << line;
  EXPECT_NE(line.find("| download: "), std::string::npos) << line;
  // The graph finishes on the GPU after the host issued it.
  const size_t g = line.find("| graph 1 nodes: ");
  double issued = 0, done = 0;
  ASSERT_EQ(std::sscanf(line.c_str() + g, "| graph 1 nodes: %lf / %lf", &issued, &done), 2) << line;
  EXPECT_GT(done, issued) << line;
  be.drop_graphs();
}

// One timed matmul of host rows x [T, K] by the device weight w [N, K]: the ops it timed and y.
struct TimedMatmul {
  std::vector<OpTime> times;
  std::vector<float> y;
};
TimedMatmul timed_matmul(CudaBackend& be, const std::vector<float>& x, const Tensor& w, int64_t T, int64_t K,
                         int64_t N) {
  Tensor xd = be.alloc({T, K}, DType::F32), y = be.alloc({T, N}, DType::F32);
  be.upload(x.data(), xd);
  be.start_op_timing();
  be.ops().matmul(xd, w, y);
  TimedMatmul r{be.stop_op_timing(), std::vector<float>(size_t(T * N))};
  be.download(y, r.y.data());
  return r;
}

// The largest |got[t, n] - sum_k x[t, k] w[n, k]| relative to sum_k |x[t, k] w[n, k]|, in double:
// x and w are the values the product multiplies (rounded as it rounds them).
double worst_relative_to_products(const std::vector<float>& got, const std::vector<float>& x,
                                  const std::vector<float>& w, int64_t T, int64_t K, int64_t N) {
  double worst = 0;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t n = 0; n < N; ++n) {
      double want = 0, scale = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double p = double(x[size_t(t * K + k)]) * w[size_t(n * K + k)];
        want += p;
        scale += std::abs(p);
      }
      worst = std::max(worst, std::abs(got[size_t(t * N + n)] - want) / scale);
    }
  return worst;
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
  const TimedMatmul r = timed_matmul(be, x, be.to_device(wh), T, K, N);
  ASSERT_EQ(r.times.size(), 1u);
  EXPECT_EQ(r.times[0].op, "matmul gemm (cuBLAS bf16)") << "the tensor-core path was taken";
  std::vector<float> xr(x);
  for (float& v : xr) v = bf16_to_f32(f32_to_bf16(v));
  EXPECT_LT(worst_relative_to_products(r.y, xr, wf, T, K, N), 1e-5) << "relative to the sum of |products|";
}

// E random SwiGLU experts for rows of H (gate and up [I, H], down [H, I], values scale x N(0, 1))
// on the device in dt (BF16, or F8_E4M3_B128 quantized per 128 x 128 block), with the values they
// stand for as stored: stored[3 e + m], m = gate, up, down.
struct RandomExperts {
  std::vector<SwigluWeights> experts;
  std::vector<std::vector<float>> stored;
};
RandomExperts random_experts(CudaBackend& be, DType dt, int64_t E, int64_t H, int64_t I, float scale,
                             std::mt19937& rng, std::normal_distribution<float>& nd) {
  RandomExperts r{{}, std::vector<std::vector<float>>(size_t(E) * 3)};
  for (int64_t e = 0; e < E; ++e) {
    Tensor t[3];
    for (int m = 0; m < 3; ++m) {
      const int64_t rows = m < 2 ? I : H, cols = m < 2 ? H : I;
      std::vector<float>& stored = r.stored[size_t(e * 3 + m)];
      std::vector<float> v(size_t(rows * cols));
      for (float& f : v) f = scale * nd(rng);
      if (dt == DType::F8_E4M3_B128) {
        BlockScaledHost q = block_scaled_host(v, rows, cols);
        stored = q.stored;
        t[m] = be.to_device(q.tensor);
      } else {
        Tensor hst = Tensor::zeros({rows, cols}, DType::BF16);
        for (int64_t i = 0; i < rows * cols; ++i) {
          hst.data<uint16_t>()[i] = f32_to_bf16(v[size_t(i)]);
          stored.push_back(bf16_to_f32(hst.data<uint16_t>()[i]));
        }
        t[m] = be.to_device(hst);
      }
    }
    r.experts.push_back({t[0], t[1], t[2]});
  }
  return r;
}

// T tokens' choices of k distinct experts of E (a shuffle a token): ids [T * k] in token order,
// weights [T * k] from weight(), called for each choice right after its token's shuffle.
template <typename Weight>
std::pair<std::vector<int32_t>, std::vector<float>> random_choices(int64_t T, int64_t k, int64_t E, std::mt19937& rng,
                                                                   Weight weight) {
  std::vector<int32_t> ids(size_t(T * k));
  std::vector<float> w(size_t(T * k));
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int32_t> order(static_cast<size_t>(E));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    for (int64_t j = 0; j < k; ++j) ids[size_t(t * k + j)] = order[size_t(j)], w[size_t(t * k + j)] = weight();
  }
  return {std::move(ids), std::move(w)};
}

// sum += weight * expert e (its weights as stored, r.stored) of the row x [H], in double; scale +=
// the |terms| of down's sums (the bound an fp32 sum's rounding scales with).
void add_expert_in_double(const RandomExperts& r, int32_t e, double weight, const float* x, int64_t H, int64_t I,
                          std::vector<double>& sum, std::vector<double>& scale) {
  const auto &gate = r.stored[size_t(e * 3)], &up = r.stored[size_t(e * 3 + 1)], &down = r.stored[size_t(e * 3 + 2)];
  std::vector<double> h(static_cast<size_t>(I));
  for (int64_t i = 0; i < I; ++i) {
    double g = 0, u = 0;
    for (int64_t c = 0; c < H; ++c) {
      g += double(gate[size_t(i * H + c)]) * x[c];
      u += double(up[size_t(i * H + c)]) * x[c];
    }
    h[size_t(i)] = g / (1.0 + std::exp(-g)) * u;
  }
  for (int64_t n = 0; n < H; ++n)
    for (int64_t i = 0; i < I; ++i) {
      sum[size_t(n)] += weight * down[size_t(n * I + i)] * h[size_t(i)];
      scale[size_t(n)] += std::abs(weight * down[size_t(n * I + i)] * h[size_t(i)]);
    }
}

// Grouped experts with bf16 matrix products: groups of more than 8 rows take the tensor cores
// (x and h rounded to bf16), smaller ones the fp32 kernels. Reference in double from the same
// rounded inputs; h's rounding may land one bf16 step apart where fp32 sums differ in order.
// Block-scaled FP8 experts take the tensor cores as their exact e4m3 values in bf16, each 128-block
// of k summed apart and scaled: the reference is the same with the dequantized weights. Where H and
// I are whole 128-blocks they take the FP8 tensor cores instead (`quantized`): x, and h after the
// gate/up products, quantized per row and 128-block (amax / 448, nearest e4m3) as vLLM and SGLang
// do, so the reference multiplies the same quantized values. The FP8 tensor cores' sums keep ~13
// bits, so an h value within a hair of an e4m3 rounding boundary may round to the other side: the
// step it may take (times its down weight) is allowed on top.
void expect_grouped_experts_equal_rounded_products(DType dt, int64_t H, int64_t I, const std::string& op,
                                                   bool quantized = false,
                                                   // 100, 40, 5, none, 20 rows
                                                   const std::vector<int32_t>& offsets = {0, 100, 140, 145, 145, 165}) {
  CudaBackend be(0, CudaOptions{.bf16_matmul = true});
  const int64_t M = offsets.back(), E = int64_t(offsets.size()) - 1;
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  auto round = [](float v) { return bf16_to_f32(f32_to_bf16(v)); };
  // A row as the tensor cores multiply it: bf16-rounded, or quantized per 128-block; slack: the
  // step an element may take where 0.4% either way would round it differently (quantized only).
  auto as_multiplied = [&](std::vector<double> row, std::vector<double>* slack = nullptr) {
    if (slack) slack->assign(row.size(), 0.0);
    for (size_t b = 0; b < row.size(); b += kScaleBlock) {
      const size_t e = std::min(row.size(), b + kScaleBlock);
      float amax = 0;
      for (size_t k = b; k < e; ++k) amax = std::max(amax, std::abs(float(row[k])));
      const float sc = amax > 0 ? amax / 448.0f : 1.0f;
      auto q = [&](double v) { return double(fp8e4m3_to_f32(f32_to_e4m3(float(v / sc)))) * sc; };
      for (size_t k = b; k < e; ++k) {
        if (slack && quantized) (*slack)[k] = std::abs(q(row[k] * 1.004) - q(row[k] * 0.996));
        row[k] = quantized ? q(row[k]) : double(round(float(row[k])));
      }
    }
    return row;
  };
  std::vector<float> x(size_t(M * H));
  for (float& v : x) v = nd(rng);
  const RandomExperts made = random_experts(be, dt, E, H, I, 0.15f, rng, nd);
  const std::vector<SwigluWeights>& experts = made.experts;
  const std::vector<std::vector<float>>& wf = made.stored;  // gate, up, down as stored
  std::vector<int32_t> perm(static_cast<size_t>(M));
  for (int64_t i = 0; i < M; ++i) perm[size_t(i)] = int32_t(M - 1 - i);  // rows out of order
  Tensor xd = be.alloc({M, H}, DType::F32), pd = be.alloc({M}, DType::I32), od = be.alloc({E + 1}, DType::I32);
  Tensor y = be.alloc({M, H}, DType::F32);
  be.upload(x.data(), xd);
  be.upload(perm.data(), pd);
  be.upload(offsets.data(), od);
  be.start_op_timing();
  be.ops().moe_experts(xd, pd, od, 1, experts, y);
  EXPECT_EQ(be.stop_op_timing().at(0).op, op);
  std::vector<float> got(size_t(M * H));
  be.download(y, got.data());
  double worst = 0;
  for (int64_t e = 0; e < E; ++e) {
    // Groups of more than 8 rows take the tensor-core tiles; with the FP8 tensor cores the small
    // tiles (<= 8 rows) take them too (mma.sync), x and h quantized alike.
    const bool tc = quantized || offsets[size_t(e + 1)] - offsets[size_t(e)] > 8;
    const auto &gate = wf[size_t(e * 3)], &up = wf[size_t(e * 3 + 1)], &down = wf[size_t(e * 3 + 2)];
    for (int32_t j = offsets[size_t(e)]; j < offsets[size_t(e + 1)]; ++j) {
      const int64_t i = perm[size_t(j)];
      std::vector<double> xr(x.begin() + i * H, x.begin() + (i + 1) * H);
      if (tc) xr = as_multiplied(xr);
      std::vector<double> h(static_cast<size_t>(I));
      for (int64_t n = 0; n < I; ++n) {
        double g = 0, u = 0;
        for (int64_t k = 0; k < H; ++k) {
          g += gate[size_t(n * H + k)] * xr[size_t(k)];
          u += up[size_t(n * H + k)] * xr[size_t(k)];
        }
        h[size_t(n)] = g / (1.0 + std::exp(-g)) * u;
      }
      std::vector<double> slack(static_cast<size_t>(I), 0.0);
      if (tc) h = as_multiplied(h, &slack);
      for (int64_t n = 0; n < H; ++n) {
        double want = 0, scale = 0, allowed = 0;
        for (int64_t k = 0; k < I; ++k) {
          const double hv = h[size_t(k)];
          want += down[size_t(n * I + k)] * hv;
          scale += std::abs(down[size_t(n * I + k)] * hv);
          allowed += std::abs(down[size_t(n * I + k)]) * slack[size_t(k)];
        }
        worst = std::max(worst, std::max(0.0, std::abs(got[size_t(i * H + n)] - want) - allowed) / scale);
      }
    }
  }
  // (A wrong layout or scale is off by O(1); the FP8 sums alone by ~2e-4.)
  EXPECT_LT(worst, quantized ? 2e-3 : 5e-3) << "relative to the sum of |products|, past the rounding slack";
}

TEST(CudaBackend, Bf16GroupedExpertsEqualTheProductOfRoundedInputs) {
  if (!cuda_available()) GTEST_SKIP() << "skipped: no CUDA device";
  // Multiples of 8, not of the 32-wide K step or the 64-wide tiles.
  expect_grouped_experts_equal_rounded_products(DType::BF16, 136, 72, "moe_experts (bf16)");
}

TEST(CudaBackend, Fp8GroupedExpertsOnTheTensorCoresEqualTheDequantizedProducts) {
  if (!cuda_available()) GTEST_SKIP() << "skipped: no CUDA device";
  // Several 128-blocks of k with partial ones at the edges (272 = 2 x 128 + 16, 144 = 128 + 16).
  expect_grouped_experts_equal_rounded_products(DType::F8_E4M3_B128, 272, 144,
                                                "moe_experts (FP8 weights, bf16 tensor cores)");
}

TEST(CudaBackend, Fp8GroupedExpertsOnTheFp8TensorCoresEqualTheProductsOfQuantizedInputs) {
  if (!cuda_available()) GTEST_SKIP() << "skipped: no CUDA device";
  // Whole 128-blocks: 6 of x (more stages than are in flight, the stage ring wrapping within an
  // item), 2 of h (fewer). The tiles take one consumer warpgroup (64 rows) for each 64 of a group's
  // mean rows, up to 3: with 33 one (the group of 100 in two tiles), with 67.5 two (150 rows in
  // two tiles, the second's 22 rows leaving a warpgroup idle; 100 rows: the second warpgroup 36),
  // with 133 three (230 rows: 192 + 38; 150: the third warpgroup 22 rows; 20: two idle). Groups of
  // at most 8 rows take the small tiles (the 5 rows of the first case; the last case's 3, 8, 1 and
  // 8), which read the rows the large tiles' pass quantized.
  for (const std::vector<int32_t>& offsets : {std::vector<int32_t>{0, 100, 140, 145, 145, 165},
                                              std::vector<int32_t>{0, 150, 170, 270, 270},
                                              std::vector<int32_t>{0, 230, 380, 400},
                                              std::vector<int32_t>{0, 3, 11, 12, 20, 120}}) {
    SCOPED_TRACE(testing::Message() << offsets.back() << " rows in " << offsets.size() - 1 << " groups");
    expect_grouped_experts_equal_rounded_products(DType::F8_E4M3_B128, 768, 256, "moe_experts (FP8 tensor cores)",
                                                  /*quantized=*/true, offsets);
  }
}

// Few tokens' routed experts in one pass (moe_routed: clusters of blocks, h shared between them,
// the choices added into out in order by the last block of each slice) against the sum in double
// over the weights as stored and against the grouped ops on the same device. The shapes take each
// of the kernel's layouts: the 80B model's (FP8, 2 parts of I, two down rows a warp-load), FP8 with
// two loads a lane a down row, rows of 4,096 (the 397B model's width) with 2 parts and with the
// whole I a cluster (two loads a lane), bf16 with rows of 8 lanes (the demo model's), 4 parts, 4
// loads a lane. Choices of weight 0 and of no expert (-1) add nothing; a second pass over the same out
// adds the same bits again (no atomics in the sums; the arrival counts left at zero). (Every case
// is at most 192 blocks: within two an SM of the GPUs this runs on.)
TEST(CudaBackend, RoutedExpertsInOnePassEqualTheSumsOfTheirProducts) {
  if (!cuda_available()) GTEST_SKIP() << "skipped: no CUDA device";
  struct Case {
    DType dt;
    int64_t H, I, E, T, k;
  };
  for (const Case cs : {Case{DType::F8_E4M3_B128, 2048, 512, 16, 1, 10}, Case{DType::F8_E4M3_B128, 1024, 1024, 12, 4, 6},
                        Case{DType::F8_E4M3_B128, 4096, 512, 4, 3, 3}, Case{DType::F8_E4M3_B128, 4096, 1024, 6, 3, 6},
                        Case{DType::BF16, 256, 64, 8, 3, 4}, Case{DType::BF16, 512, 512, 8, 2, 2},
                        Case{DType::BF16, 256, 1024, 9, 3, 8}}) {
    SCOPED_TRACE(testing::Message() << dtype_name(cs.dt) << " H " << cs.H << " I " << cs.I << " T " << cs.T << " k "
                                    << cs.k);
    CudaBackend be(0, CudaOptions{.bf16_matmul = true});
    const int64_t H = cs.H, I = cs.I, E = cs.E, T = cs.T, k = cs.k;
    std::mt19937 rng(uint32_t(11 + H + I));
    std::normal_distribution<float> nd(0.0f, 1.0f);
    const RandomExperts made = random_experts(be, cs.dt, E, H, I, 0.1f, rng, nd);
    const std::vector<SwigluWeights>& experts = made.experts;
    auto [ids, w] = random_choices(T, k, E, rng, [&] { return 0.05f + std::abs(nd(rng)); });
    if (T * k > 3) {
      ids[1] = -1, w[1] = 0.0f;  // a padding row's choice
      w[2] = 0.0f;               // a choice of weight 0
    }
    std::vector<float> x(size_t(T * H)), out0(size_t(T * H));
    for (float& v : x) v = nd(rng);
    for (float& v : out0) v = nd(rng);
    Tensor xd = be.alloc({T, H}, DType::F32), idd = be.alloc({T, k}, DType::I32), wd = be.alloc({T, k}, DType::F32);
    Tensor out = be.alloc({T, H}, DType::F32);
    be.upload(x.data(), xd);
    be.upload(ids.data(), idd);
    be.upload(w.data(), wd);
    ASSERT_TRUE(be.ops().moe_routed_fits(xd, idd, experts, nullptr));
    std::vector<float> got[2];
    for (std::vector<float>& g : got) {
      be.upload(out0.data(), out);
      be.start_op_timing();
      be.ops().moe_routed(xd, idd, wd, experts, out);
      EXPECT_EQ(be.stop_op_timing().at(0).op, "moe_routed");
      g.resize(size_t(T * H));
      be.download(out, g.data());
    }
    EXPECT_EQ(got[0], got[1]) << "the same sums, bit for bit, a second time";
    double worst = 0;
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> want(out0.begin() + t * H, out0.begin() + (t + 1) * H), scale(size_t(H), 0.0);
      for (int64_t j = 0; j < k; ++j) {
        const int32_t e = ids[size_t(t * k + j)];
        const double wj = w[size_t(t * k + j)];
        if (e >= 0 && wj != 0) add_expert_in_double(made, e, wj, &x[size_t(t * H)], H, I, want, scale);
      }
      for (int64_t n = 0; n < H; ++n)
        worst = std::max(worst, std::abs(got[0][size_t(t * H + n)] - want[size_t(n)]) / (scale[size_t(n)] + 1.0));
    }
    EXPECT_LT(worst, 1e-5) << "relative to the sum of |products| (+ |out| ~ 1)";

    // The grouped ops on the same device, the same inputs.
    const int64_t N = T * k;
    Tensor perm = be.alloc({N}, DType::I32), counts = be.alloc({E}, DType::I32);
    Tensor offsets = be.alloc({E + 1}, DType::I32), none;
    Tensor y = be.alloc({N, H}, DType::F32);
    be.ops().group_by(idd.reshape({N}), none, 1, int(E), perm, counts, offsets, none);
    be.ops().moe_experts(xd, perm, offsets, int(k), experts, y);
    be.upload(out0.data(), out);
    be.ops().moe_combine(y, none, wd, out);
    std::vector<float> grouped(size_t(T * H));
    be.download(out, grouped.data());
    double apart = 0;
    for (size_t i = 0; i < grouped.size(); ++i)
      apart = std::max(apart, double(std::abs(grouped[i] - got[0][i])) / (1.0 + std::abs(grouped[i])));
    // (The grouped FP8 tiles round x to e4m3 a 128-block at a time: their distance from the exact
    // sums grows with the blocks a row sums, H / 128; 2.0e-4 was seen at H 4,096, where the one pass
    // stays within the bound above against the sums in double.)
    EXPECT_LT(apart, H > 2048 ? 3e-4 : 1e-4) << "against group_by, moe_experts and moe_combine";
  }
}

// A choice of an expert past the table, or of one with no weights, is an index fault named at the
// next wait (the rest of out is still computed); the backend serves on.
TEST(CudaBackend, RoutedExpertsInOnePassReportABadChoice) {
  if (!cuda_available()) GTEST_SKIP() << "skipped: no CUDA device";
  CudaBackend be(0, CudaOptions{.bf16_matmul = true});
  const int64_t H = 256, I = 64, E = 4, T = 1, k = 2;
  std::vector<SwigluWeights> experts;
  for (int64_t e = 0; e < E; ++e) {
    auto bf16 = [&](int64_t r, int64_t c) { return be.to_device(Tensor::zeros({r, c}, DType::BF16)); };
    experts.push_back(e == 2 ? SwigluWeights{} : SwigluWeights{bf16(I, H), bf16(I, H), bf16(H, I)});
  }
  Tensor xd = be.alloc({T, H}, DType::F32), idd = be.alloc({T, k}, DType::I32), wd = be.alloc({T, k}, DType::F32);
  Tensor out = be.alloc({T, H}, DType::F32);
  std::vector<float> zeros(size_t(T * H), 0.0f), back(size_t(T * H));
  const std::vector<float> w = {0.5f, 0.5f};
  be.upload(zeros.data(), xd);
  be.upload(w.data(), wd);
  for (const auto& [bad, what] : {std::pair{std::vector<int32_t>{0, 7}, "moe_routed: ids[1] = 7 not below 4 experts"},
                                  std::pair{std::vector<int32_t>{2, 1}, "moe_routed: ids[0] = 2 chooses an expert with no weights"}}) {
    be.upload(bad.data(), idd);
    ASSERT_TRUE(be.ops().moe_routed_fits(xd, idd, experts, nullptr));
    be.ops().moe_routed(xd, idd, wd, experts, out);
    test::expect_error([&] { be.download(out, back.data()); }, {what});
  }
  const std::vector<int32_t> good = {0, 1};
  be.upload(good.data(), idd);
  be.ops().moe_routed(xd, idd, wd, experts, out);
  be.download(out, back.data());
  EXPECT_EQ(back[0], 0.0f);
}

// FP8 dense products with bf16 matrix products. Few rows read the e4m3 weights in place (fp32
// sums of the exact dequantized values) where K is not whole 128-blocks or the rows are one or two
// (3 - 8 rows of whole blocks: the FP8 tensor cores, tested below). Many rows take the FP8 tensor cores where K is whole
// 128-blocks in groups of 4 and N a multiple of 16: x quantized per row and 128-block (amax / 448,
// nearest e4m3, as vLLM and SGLang do), so the reference multiplies the same quantized x; other
// shapes dequantize the weights to bf16 for cuBLAS (each weight rounded to bf16 as x is).
TEST(CudaBackend, Fp8MatmulEqualsTheProductOfWhatItMultiplies) {
  if (!cuda_available()) GTEST_SKIP() << "skipped: no CUDA device";
  CudaBackend be(0, CudaOptions{.bf16_matmul = true});
  enum Path { kInPlace, kBf16, kFp8 };
  struct Case {
    int64_t T, K, N;
    Path path;
    const char* op;
  };
  const Case cases[] = {{3, 272, 200, kInPlace, "matmul gemv"},
                        {40, 272, 200, kBf16, "matmul gemm (FP8 weights as bf16, cuBLAS)"},
                        {40, 512, 208, kFp8, "matmul gemm (FP8 tensor cores, cuBLASLt)"},  // rows padded to 48
                        {48, 1024, 208, kFp8, "matmul gemm (FP8 tensor cores, cuBLASLt)"}};
  std::mt19937 rng(9);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  auto round = [](float v) { return bf16_to_f32(f32_to_bf16(v)); };
  for (const Case& c : cases) {
    SCOPED_TRACE("T=" + std::to_string(c.T) + " K=" + std::to_string(c.K) + " N=" + std::to_string(c.N));
    const int64_t T = c.T, K = c.K, N = c.N;
    std::vector<float> wv(size_t(N * K)), x(size_t(T * K));
    for (float& v : wv) v = 0.1f * nd(rng);
    for (float& v : x) v = nd(rng);
    const BlockScaledHost wq = block_scaled_host(wv, N, K);
    // What the product multiplies x by: itself, bf16-rounded, or quantized per 128-block.
    std::vector<float> xm(x);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t b = 0; b < K; b += kScaleBlock) {
        float amax = 0;
        for (int64_t k = b; k < std::min(K, b + kScaleBlock); ++k) amax = std::max(amax, std::abs(x[size_t(t * K + k)]));
        const float sc = amax > 0 ? amax / 448.0f : 1.0f;
        for (int64_t k = b; k < std::min(K, b + kScaleBlock); ++k) {
          float& v = xm[size_t(t * K + k)];
          v = c.path == kFp8 ? fp8e4m3_to_f32(f32_to_e4m3(v / sc)) * sc : c.path == kBf16 ? round(v) : v;
        }
      }
    const TimedMatmul r = timed_matmul(be, x, be.to_device(wq.tensor), T, K, N);
    EXPECT_EQ(r.times.at(0).op, c.op);
    std::vector<float> wm(wq.stored);  // ... and the weights: bf16-rounded on the dequantizing path
    if (c.path == kBf16)
      for (float& v : wm) v = round(v);
    const double worst = worst_relative_to_products(r.y, xm, wm, T, K, N);
    // The FP8 tensor cores keep fewer bits than fp32 inside each 128-block of k (cuBLASLt promotes
    // the block sums to fp32): 1e-3 of the sum of |products| for them; a wrong scale or layout
    // would be off by O(1).
    EXPECT_LT(worst, c.path == kInPlace ? 2e-6 : (c.path == kFp8 ? 1e-3 : 1e-5)) << "relative to the sum of |products|";
  }
}

// A layout's block tables only (B sequences of W entries, the last a spare -1): sequence b's blocks
// in order after every later sequence's, so that no sequence starts at block 0.
HostLayout reversed_tables(int B, int W, int64_t bs) {
  HostLayout h;
  h.block_size = int(bs);
  h.width = W;
  h.block_tables.assign(size_t(B * W), -1);
  for (int b = 0; b < B; ++b)
    for (int j = 0; j + 1 < W; ++j) h.block_tables[size_t(b * W + j)] = (B - 1 - b) * (W - 1) + j;
  return h;
}

// Ops of a backend with bf16 products (the default outside the reference tests), with the
// conformance fixture's helpers.
//
// Attention over caches of `cache` (F32, or BF16 as CudaBackend keeps them under bf16 products),
// two sequences (`prior` rows cached before their `fresh` new ones), GQA, head dim hd, against the
// softmax in double of bf16-rounded K and V (and Q where `tensor_cores`: the tiles of 64, 128 and
// 256 round Q and the softmax's P too; P's rounding, 2^-9 of each p, moves an output by at most
// 2^-9 sum_s p_s |v_s| / sum_s p_s, allowed twice over). Without the tensor cores (decode rows, other
// head dims) only K and V are rounded (in a bf16 cache): 1e-5 of sum_s p_s |v_s| / sum_s p_s.
class CudaBf16Products : public OpConformance {
 protected:
  void expect_attention_of_rounded_operands(int64_t hd, const std::vector<int>& prior, const std::vector<int>& fresh,
                                            DType cache, bool tensor_cores, int64_t Hq = 4, int64_t bs = 16) {
    const auto round = [](std::vector<float> v) {
      for (float& e : v) e = bf16_to_f32(f32_to_bf16(e));
      return v;
    };
    const int64_t Hkv = 2, row = Hkv * hd;
    const int B = 2, W = 23;  // up to 340 rows of a sequence: 22 blocks of (at least) 16 rows, and a spare entry
    HostLayout h = reversed_tables(B, W, bs);
    const int64_t blocks = B * (W - 1);
    std::vector<float> kc(size_t(blocks * bs * row), 0.0f), vc(kc.size(), 0.0f), k_new, v_new;
    std::vector<std::vector<float>> keys(B), values(B);
    for (int b = 0; b < B; ++b) {
      const int n = prior[size_t(b)] + fresh[size_t(b)];
      keys[size_t(b)] = randn(size_t(n * row), uint32_t(60 + b));
      values[size_t(b)] = randn(size_t(n * row), uint32_t(70 + b));
      for (int r = 0; r < n; ++r) {
        const int64_t slot = int64_t(h.block_tables[size_t(b * W + r / bs)]) * bs + r % bs;
        if (r < prior[size_t(b)]) {
          std::copy_n(keys[size_t(b)].begin() + r * row, row, kc.begin() + slot * row);
          std::copy_n(values[size_t(b)].begin() + r * row, row, vc.begin() + slot * row);
        } else {
          k_new.insert(k_new.end(), keys[size_t(b)].begin() + r * row, keys[size_t(b)].begin() + (r + 1) * row);
          v_new.insert(v_new.end(), values[size_t(b)].begin() + r * row, values[size_t(b)].begin() + (r + 1) * row);
          h.slot_mapping.push_back(int32_t(slot));
        }
      }
      h.cu.push_back(h.cu.back() + fresh[size_t(b)]);
      h.kv_lens.push_back(n);
    }
    const int64_t T = h.cu.back();
    const std::vector<float> q = randn(size_t(T * Hq * hd), 80);
    const auto cache_of = [&](const std::vector<float>& v) {  // writable device memory, as a cache is
      if (cache == DType::F32) return f32(v, {blocks, bs, Hkv, hd});
      std::vector<uint16_t> bits(v.size());
      for (size_t i = 0; i < v.size(); ++i) bits[i] = f32_to_bf16(v[i]);
      return upload(bits, {blocks, bs, Hkv, hd}, DType::BF16);
    };
    Tensor k_cache = cache_of(kc), v_cache = cache_of(vc);
    Tensor out = be().alloc({T, Hq, hd}, DType::F32);
    ops().attention(f32(q, {T, Hq, hd}), f32(k_new, {T, Hkv, hd}), f32(v_new, {T, Hkv, hd}), k_cache, v_cache,
                    layout(h), out);
    const std::vector<float> got = floats(out), qr = tensor_cores ? round(q) : q;
    double worst = 0;  // the largest error over its allowance
    for (int b = 0; b < B; ++b) {
      const std::vector<float> kr = round(keys[size_t(b)]), vr = round(values[size_t(b)]);
      for (int i = 0; i < fresh[size_t(b)]; ++i) {
        const int64_t t = h.cu[size_t(b)] + i, len = prior[size_t(b)] + i + 1;
        for (int64_t hq = 0; hq < Hq; ++hq) {
          std::vector<double> want(static_cast<size_t>(hd)), pv(static_cast<size_t>(hd));
          reference_attention_row(qr.data() + (t * Hq + hq) * hd, kr, vr, len, row, hq / (Hq / Hkv) * hd, hd,
                                  want.data(), pv.data());
          for (int64_t j = 0; j < hd; ++j) {
            const double err = std::abs(got[size_t((t * Hq + hq) * hd + j)] - want[size_t(j)]);
            const double allowed =
                tensor_cores ? 2 * std::ldexp(pv[size_t(j)], -9) + 1e-5 : 1e-5 * pv[size_t(j)] + 1e-6;
            worst = std::max(worst, err / allowed);
          }
        }
      }
    }
    EXPECT_LE(worst, 1.0) << "error over its allowance";
  }
};

std::unique_ptr<Backend> bf16_backend() { return std::make_unique<CudaBackend>(0, CudaOptions{.bf16_matmul = true}); }
INSTANTIATE_TEST_SUITE_P(Cuda, CudaBf16Products, ::testing::Values(BackendCase{"device0", bf16_backend, no_device}),
                         backend_case_name);

// Prefill attention on the bf16 tensor cores: Q, K, V and the softmax's P rounded to bf16, fp32
// sums. Two sequences (one with 40 rows cached before its 300 new ones, one of 129: a tile of one
// row), every tensor-core head dim, fp32 caches (K and V rounded as they are staged) and bf16
// caches (copied into the tiles as they lie, the new rows rounded as they are written; on Hopper
// the wgmma tiles), KV blocks of 16 rows and of 24 (no power of two: rows to blocks by division).
TEST_P(CudaBf16Products, PrefillAttentionEqualsTheSoftmaxOfRoundedOperands) {
  for (const DType cache : {DType::F32, DType::BF16})
    for (const int64_t hd : {64, 128, 256}) {
      SCOPED_TRACE(std::string(dtype_name(cache)) + " caches, hd=" + std::to_string(hd));
      expect_attention_of_rounded_operands(hd, {40, 0}, {300, 129}, cache, /*tensor_cores=*/true);
    }
  SCOPED_TRACE("bf16 caches, hd=256, blocks of 24 rows");
  expect_attention_of_rounded_operands(256, {40, 0}, {300, 129}, DType::BF16, /*tensor_cores=*/true, 4, 24);
}

// bf16 caches beyond the tensor-core tiles: decode rows (sequences of 1 and 3 new rows after 40
// and 7 cached: the rows kernel, 4 query heads a block at hd 256 and 8 query heads on 2 KV heads, 1
// at hd 96 and 6 query heads) at the Qwen head dim and an odd one, and a prefill at a head dim the
// tiles do not take (the SIMT tiles); their products in fp32 of the bf16 K and V.
TEST_P(CudaBf16Products, AttentionReadsBf16Caches) {
  for (const auto& [hd, Hq] : {std::pair<int64_t, int64_t>{256, 8}, {96, 6}}) {
    SCOPED_TRACE("decode, hd=" + std::to_string(hd) + " Hq=" + std::to_string(Hq));
    expect_attention_of_rounded_operands(hd, {40, 7}, {1, 3}, DType::BF16, /*tensor_cores=*/false, Hq);
  }
  SCOPED_TRACE("prefill, hd=96");
  expect_attention_of_rounded_operands(96, {40, 0}, {300, 129}, DType::BF16, /*tensor_cores=*/false);
}

// Gated attention at decode (one row a sequence) in the fused rows kernel (q and the new K normed
// and rotated there, the new row read from shared memory and written to the caches by the kernel,
// the gate at the store) against the three ops it replaces on the same inputs: the same floats
// (the norms and rotation are one device function, the new row rounded as the caches hold it), so
// outputs and caches bit for bit. F32 and BF16 caches; 5 sequences of 0 - 2,000 cached rows (the
// rows split; the longest's splits hold more rows than the kernel copies before its wait) and, at
// the 80B shape (16 q heads on 2 KV heads, 256 dims rotating 64), 136 sequences (rows x heads fill
// the GPU: no split, the gate at the rows kernel's store); 6 q heads of 96 dims.
TEST_P(CudaBf16Products, GatedAttentionAtDecodeIsItsThreeOpsBitForBit) {
  struct Case {
    int64_t Hq, hd;
    int rot;
    int B;
  };
  for (const DType cache : {DType::F32, DType::BF16})
    for (const Case c : {Case{16, 256, 64, 5}, Case{16, 256, 64, 136}, Case{6, 96, 32, 5}}) {
      SCOPED_TRACE(std::string(dtype_name(cache)) + " caches, Hq=" + std::to_string(c.Hq) +
                   " hd=" + std::to_string(c.hd) + " B=" + std::to_string(c.B));
      const int64_t Hq = c.Hq, Hkv = 2, hd = c.hd, row = Hkv * hd, bs = 16;
      const int B = c.B;
      std::vector<int> prior(static_cast<size_t>(B));
      for (int b = 0; b < B; ++b) prior[size_t(b)] = B == 5 ? std::vector<int>{40, 0, 2000, 7, 300}[size_t(b)] : b % 9;
      const int W = *std::max_element(prior.begin(), prior.end()) / int(bs) + 2;
      HostLayout h = reversed_tables(B, W, bs);
      const int64_t blocks = int64_t(B) * (W - 1);
      std::vector<int32_t> pos;
      for (int b = 0; b < B; ++b) {
        const int r = prior[size_t(b)];
        h.slot_mapping.push_back(h.block_tables[size_t(b * W + r / int(bs))] * int32_t(bs) + r % int32_t(bs));
        h.cu.push_back(h.cu.back() + 1);
        h.kv_lens.push_back(r + 1);
        pos.push_back(r);
      }
      const int64_t T = B;
      const std::vector<float> kc = randn(size_t(blocks * bs * row), 90), vc = randn(kc.size(), 91);
      const auto cache_of = [&](const std::vector<float>& v) {
        if (cache == DType::F32) return f32(v, {blocks, bs, Hkv, hd});
        std::vector<uint16_t> bits(v.size());
        for (size_t i = 0; i < v.size(); ++i) bits[i] = f32_to_bf16(v[i]);
        return upload(bits, {blocks, bs, Hkv, hd}, DType::BF16);
      };
      const auto bytes_of = [&](const Tensor& t) {
        std::vector<uint8_t> v(t.nbytes());
        be().download(t, v.data());
        return v;
      };
      const Tensor qg = f32(randn(size_t(T * Hq * 2 * hd), 92), {T, Hq, 2 * hd});
      const std::vector<float> k_raw = randn(size_t(T * row), 93);
      const Tensor v = f32(randn(size_t(T * row), 94), {T, Hkv, hd});
      const QkNormRope r{weight(randn(size_t(hd), 95, 0.5f), {hd}, DType::BF16),
                         weight(randn(size_t(hd), 96, 0.5f), {hd}, DType::BF16), 1e-6f, i32(pos), c.rot, 1e7};
      Tensor kc1 = cache_of(kc), vc1 = cache_of(vc), kc3 = cache_of(kc), vc3 = cache_of(vc);
      Tensor q = be().alloc({T, Hq, hd}, DType::F32), gate = be().alloc({T, Hq, hd}, DType::F32);
      Tensor k = f32(k_raw, {T, Hkv, hd}), fused = be().alloc({T, Hq, hd}, DType::F32);
      ops().gated_attention(qg, r, q, gate, k, v, kc1, vc1, layout(h), fused);
      Tensor k3 = f32(k_raw, {T, Hkv, hd}), three = be().alloc({T, Hq, hd}, DType::F32);
      ops().qk_norm_rope(qg, r.q_norm, r.k_norm, r.eps, r.positions, r.rot, r.theta, q, gate, k3);
      ops().attention(q, k3, v, kc3, vc3, layout(h), three);
      ops().mul_sigmoid(three, gate);
      EXPECT_EQ(floats(fused), floats(three));
      EXPECT_EQ(bytes_of(kc1), bytes_of(kc3));
      EXPECT_EQ(bytes_of(vc1), bytes_of(vc3));
    }
}

// The chunked delta rule with bf16 matrix products: both kernels' products in bf16 over bf16 rows and
// scratch (within 2^-8 an operand, as flash-linear-attention computes it; T's inverse in 3xTF32),
// against the CPU's recurrent form in fp32 on the same rows. The outputs' errors are printed
// (2.6e-3 - 4.1e-3 relative L2 on an H100, session 46; 1.7e-3 - 2.1e-3 with the solve kernel's
// products in TF32); a wrong fragment or chunk would be O(1). The rows in bf16 as the model gives
// them under bf16 products (delta_rule_rows_dtype), and in fp32 (converted for the solve kernel).
TEST_P(CudaBf16Products, DeltaNetWithBf16ProductsMatchesTheRecurrence) {
  EXPECT_EQ(ops().delta_rule_rows_dtype(), DType::BF16);
  for (const DType rows : {DType::BF16, DType::F32}) {
    SCOPED_TRACE(dtype_name(rows));
    check_deltanet_at_qwen_head_dims(1e-2, rows);
  }
}

// The same at other head dims (the kernels compiled for any dims): a key dim padded to the tensor
// cores' 16 steps, rows of no whole 8-byte pieces (loaded one element at a time), value dims that
// end inside a 16-column step; sequences of one row beside one, two and three chunks.
TEST_P(CudaBf16Products, DeltaNetWithBf16ProductsAtOtherHeadDims) {
  for (const DeltaRuleDims d : {DeltaRuleDims{2, 4, 16, 16}, DeltaRuleDims{2, 4, 12, 10}, DeltaRuleDims{1, 2, 64, 40}}) {
    SCOPED_TRACE(testing::Message() << "dk=" << d.dk << " dv=" << d.dv);
    DeltaNetCase c;
    c.d = d;
    c.rows = DType::BF16;
    HostLayout h;
    h.state_slots = {3, 0, 6, 1, 4};
    for (const int n : {1, 70, 64, 150, 2}) h.cu.push_back(h.cu.back() + n);
    check_deltanet_pass(c, h, 8, 70, 1e-2);
  }
}

// Qwen3-Next-80B's heads (16 key, 32 value heads of 128) with prefills beside a decode row: on an
// H100 or H200 (132 SMs) two prefills take the state kernel's 64-column blocks (each warp half of
// the chunk's rows in step 1 and half of the keys in step 2) and three its 128-column blocks (one
// part: every row and key a warp); the other bf16 tests' few heads take 32-column blocks.
TEST_P(CudaBf16Products, DeltaNetWithBf16ProductsOverMoreStateBlocksThanSms) {
  DeltaNetCase c;
  c.d = DeltaRuleDims{16, 32, 128, 128};
  c.rows = DType::BF16;
  for (const std::vector<int>& rows : {std::vector<int>{130, 1, 64, 75}, std::vector<int>{1, 200, 65}}) {
    SCOPED_TRACE(testing::Message() << rows.size() << " sequences");
    HostLayout h;
    h.state_slots = {2, 0, 3, 1};
    h.state_slots.resize(rows.size());
    for (const int n : rows) h.cu.push_back(h.cu.back() + n);
    check_deltanet_pass(c, h, 5, 90, 1e-2);
  }
}

// Few rows (decode, 3 - 32) of block-scaled FP8 weights on the FP8 tensor cores: x quantized per row
// and 128-block of k (amax / 448, nearest e4m3; the division in float, as the kernel does it), fp32
// sums of the exact e4m3 products, each block's sum times its two scales. Reference in double from
// the same quantized x and the stored weights: what is left is fp32 accumulation. N crosses a
// 128-row block and ends inside a 16-row slice; K covers one, three and sixteen 128-blocks (four
// warps with uneven shares, some with none); T one, two and four tiles of 8 x rows, whole and not.
TEST_P(CudaBf16Products, FewRowFp8ProductsMultiplyTheQuantizedRows) {
  const int64_t N = 200;
  for (const int64_t K : {128, 384, 2048})
    for (const int64_t T : {3, 5, 8, 9, 16, 17, 32}) {  // (1 - 2 rows take the CUDA cores' few-row kernels)
      SCOPED_TRACE("K=" + std::to_string(K) + " T=" + std::to_string(T));
      const BlockScaledHost wq = block_scaled_host(randn(size_t(N * K), 80, 0.2f), N, K);
      const std::vector<float> xv = randn(size_t(T * K), 81 + uint32_t(T));
      std::vector<float> xq(xv.size());
      for (int64_t t = 0; t < T; ++t)
        for (int64_t b = 0; b < K; b += kScaleBlock) {
          float amax = 0;
          for (int64_t k = b; k < b + kScaleBlock; ++k) amax = std::max(amax, std::abs(xv[size_t(t * K + k)]));
          const float sc = amax > 0 ? amax / 448.0f : 1.0f;
          for (int64_t k = b; k < b + kScaleBlock; ++k)
            xq[size_t(t * K + k)] = fp8e4m3_to_f32(f32_to_e4m3(xv[size_t(t * K + k)] / sc)) * sc;
        }
      const Tensor x = f32(xv, {T, K}), w = be().to_device(wq.tensor);
      Tensor y = be().alloc({T, N}, DType::F32);
      be().start_op_timing();
      ops().matmul(x, w, y);
      const std::vector<OpTime> times = be().stop_op_timing();
      ASSERT_EQ(times.size(), 1u);
      EXPECT_EQ(times[0].op, "matmul gemv (FP8 tensor cores)") << "the tensor-core path was taken";
      EXPECT_LT(worst_relative_to_products(floats(y), xq, wq.stored, T, K, N), 1e-5);
    }
}

// Few rows (3 - 32) of bf16 weights on the bf16 tensor cores: x rounded to bf16 (as the many-row
// path's cuBLAS products take it), fp32 sums. Reference in double from the rounded x and the
// weights; K of one 32-k step (three warps with none), three (uneven shares) and 64; T one, two
// and four tiles of 8 x rows, whole and not. A wide product (N > 1024) of more than 8 rows goes to
// cuBLAS instead (the few-row path would read T fp32 x rows for every 16 weight rows).
TEST_P(CudaBf16Products, FewRowBf16ProductsMultiplyTheRoundedRows) {
  const auto expect_product = [&](int64_t T, int64_t K, int64_t N, const char* op) {
    SCOPED_TRACE("K=" + std::to_string(K) + " T=" + std::to_string(T) + " N=" + std::to_string(N));
    const std::vector<float> wv = randn(size_t(N * K), 84, 0.2f), xv = randn(size_t(T * K), 85 + uint32_t(T));
    const Tensor x = f32(xv, {T, K}), w = weight(wv, {N, K}, DType::BF16);
    Tensor y = be().alloc({T, N}, DType::F32);
    be().start_op_timing();
    ops().matmul(x, w, y);
    const std::vector<OpTime> times = be().stop_op_timing();
    ASSERT_EQ(times.size(), 1u);
    EXPECT_EQ(times[0].op, op);
    EXPECT_LT(worst_relative_to_products(floats(y), stored_as(xv, DType::BF16), stored_as(wv, DType::BF16), T, K, N),
              1e-5);
  };
  for (const int64_t K : {32, 96, 2048})
    for (const int64_t T : {3, 5, 8, 12, 16, 25, 32}) expect_product(T, K, 200, "matmul gemv (bf16 tensor cores)");
  expect_product(8, 64, 1040, "matmul gemv (bf16 tensor cores)");
  expect_product(9, 64, 1040, "matmul gemm (cuBLAS bf16)");
}

// The same paths through matmul_many (FP8 beside bf16 targets: one launch to 32 rows) and
// swiglu_down (silu(gate) * up quantized or rounded, the row gate at the store) give what matmul
// and the composed ops give, bit for bit. At 40 rows matmul_many makes one product a target and
// converts x once a form: cuBLASLt's quantized x (the FP8 target of 48 rows), then the bf16 x that
// the FP8 target of 200 rows (dequantized for cuBLAS) rounds and the bf16 targets reuse.
TEST_P(CudaBf16Products, TensorCoreProductsOfManyTargetsAndSwigluEqualTheirParts) {
  const int64_t K = 512;
  for (const int64_t T : {1, 3, 8, 13, 32, 40}) {
    SCOPED_TRACE("T=" + std::to_string(T));
    const std::vector<int64_t> Ns{48, 130, 1, 200};
    std::vector<Tensor> w, y, each;
    for (size_t i = 0; i < Ns.size(); ++i) {
      const std::vector<float> v = randn(size_t(Ns[i] * K), 90 + uint32_t(i), 0.2f);
      w.push_back(i == 1 || i == 2 ? weight(v, {Ns[i], K}, DType::BF16)
                                   : be().to_device(block_scaled_host(v, Ns[i], K).tensor));
      y.push_back(be().alloc({T, Ns[i]}, DType::F32));
      each.push_back(be().alloc({T, Ns[i]}, DType::F32));
    }
    const Tensor x = f32(randn(size_t(T * K), 95), {T, K});
    ops().matmul_many(x, w, y);
    for (size_t i = 0; i < Ns.size(); ++i) {
      ops().matmul(x, w[i], each[i]);
      EXPECT_EQ(floats(y[i]), floats(each[i])) << "output " << i;
    }
    const int64_t H = 200;
    const std::vector<float> dv = randn(size_t(H * K), 96, 0.2f);
    for (const DType dt : {DType::F8_E4M3_B128, DType::BF16}) {
      SCOPED_TRACE(dtype_name(dt));
      const Tensor down = dt == DType::BF16 ? weight(dv, {H, K}, dt) : be().to_device(block_scaled_host(dv, H, K).tensor);
      const std::vector<float> gv = randn(size_t(T * K), 97);
      const Tensor up = f32(randn(size_t(T * K), 98), {T, K}), row_gate = f32(randn(size_t(T), 99), {T, 1});
      Tensor g1 = f32(gv, {T, K}), g2 = f32(gv, {T, K});
      Tensor want = be().alloc({T, H}, DType::F32), got = be().alloc({T, H}, DType::F32);
      ops().silu_mul(g1, up, g1);
      ops().matmul(g1, down, want);
      ops().scale_rows_sigmoid(want, row_gate);
      ops().swiglu_down(g2, up, down, row_gate, got);
      EXPECT_EQ(floats(got), floats(want));
    }
  }
}

// matmul_add_norm, then matmul_many_normed, at batch-1 decode take two launches, the norm split over
// them (no norm kernel); from two rows matmul, add_rms_norm and matmul_many, bit for bit. The outputs
// are those of the three ops within fp32 rounding (the squares summed in another order, the factor
// applied to the sums). An FP8 model's shapes (its DeltaNet output projection and MoE projections).
TEST_P(CudaBf16Products, MatmulAddNormSplitsTheNormOverOneRowProducts) {
  const int64_t K = 4096, H = 2048;
  const Tensor w_out = be().to_device(block_scaled_host(randn(size_t(H * K), 110, 0.05f), H, K).tensor);
  const std::vector<int64_t> Ns{512, 512, 512, 1};
  std::vector<Tensor> w;
  for (size_t i = 0; i < Ns.size(); ++i) {
    const std::vector<float> v = randn(size_t(Ns[i] * H), 111 + uint32_t(i), 0.2f);
    w.push_back(i == 0 || i == 3 ? weight(v, {Ns[i], H}, DType::BF16)
                                 : be().to_device(block_scaled_host(v, Ns[i], H).tensor));
  }
  const Tensor norm = weight(randn(size_t(H), 115, 0.1f), {H}, DType::BF16);
  for (const int64_t T : {1, 2}) {
    SCOPED_TRACE("T=" + std::to_string(T));
    const Tensor o = f32(randn(size_t(T * K), 116), {T, K});
    const std::vector<float> xv = randn(size_t(T * H), 117);
    Tensor x = f32(xv, {T, H}), d = be().alloc({T, H}, DType::F32), h = be().alloc({T, H}, DType::F32);
    Tensor x2 = f32(xv, {T, H}), d2 = be().alloc({T, H}, DType::F32), h2 = be().alloc({T, H}, DType::F32);
    std::vector<Tensor> y, want;
    for (const int64_t N : Ns) {
      y.push_back(be().alloc({T, N}, DType::F32));
      want.push_back(be().alloc({T, N}, DType::F32));
    }
    const Tensor sums = be().alloc({T, ops().norm_parts(H)}, DType::F32);
    be().start_op_timing();
    const PendingNorm n = ops().matmul_add_norm(o, w_out, d, AddNorm{x, norm, 1e-6f, h, sums});
    ops().matmul_many_normed(n, h, w, y);
    std::vector<std::string> names;
    for (const OpTime& t : be().stop_op_timing()) names.push_back(t.op);
    std::sort(names.begin(), names.end());  // (the timer lists its ops by name)
    if (T == 1)
      EXPECT_EQ(names, (std::vector<std::string>{"matmul gemv (the residual add and norm's sums at its store)",
                                                 "matmul gemv (times the row's RMS factor)"}));
    else EXPECT_EQ(names, (std::vector<std::string>{"add_rms_norm", "matmul gemv"}));
    ops().matmul(o, w_out, d2);
    ops().add_rms_norm(x2, d2, norm, 1e-6f, h2);
    ops().matmul_many(h2, w, want);
    if (T > 1) {  // the same kernels: the same bits
      EXPECT_EQ(floats(x), floats(x2));
      EXPECT_EQ(floats(h), floats(h2));
      for (size_t i = 0; i < Ns.size(); ++i) EXPECT_EQ(floats(y[i]), floats(want[i])) << "output " << i;
      continue;
    }
    EXPECT_TRUE(all_near(floats(x), floats(x2), 1e-6, 1e-6));
    EXPECT_TRUE(all_near(floats(h), floats(h2), 1e-6, 1e-5));
    for (size_t i = 0; i < Ns.size(); ++i) EXPECT_TRUE(all_near(floats(y[i]), floats(want[i]), 1e-4, 1e-4)) << i;
  }
}

// moe_routed_add_norm at one token: moe_routed's last blocks add out into the residual stream and
// start the next norm as they store (a PendingNorm of 8 partial sums), which matmul_many_normed
// finishes in its one-row products (no norm kernel between them) or, asked for the rows alone, in
// a kernel of its own; against moe_routed, add_rms_norm and matmul_many within fp32 rounding (the
// squares summed in another order). At two tokens the norm is finished: the same bits as those ops.
// The 80B model's shapes (FP8 experts; its DeltaNet's FP8 and bf16 input projections).
TEST_P(CudaBf16Products, RoutedExpertsStartTheNextNormAtOneToken) {
  const int64_t H = 2048, I = 512, E = 16, k = 10;
  CudaBackend& cb = dynamic_cast<CudaBackend&>(be());
  std::mt19937 rng(120);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const RandomExperts made = random_experts(cb, DType::F8_E4M3_B128, E, H, I, 0.1f, rng, nd);
  const std::vector<Tensor> w{be().to_device(block_scaled_host(randn(size_t(1024 * H), 121, 0.2f), 1024, H).tensor),
                              weight(randn(size_t(32 * H), 122, 0.2f), {32, H}, DType::BF16)};
  const Tensor norm = weight(randn(size_t(H), 123, 0.1f), {H}, DType::BF16);
  const float eps = 1e-6f;
  for (const int64_t T : {1, 2}) {
    SCOPED_TRACE("T=" + std::to_string(T));
    const auto [ids, cw] = random_choices(T, k, E, rng, [] { return 0.1f; });
    const Tensor x = f32(randn(size_t(T * H), 124), {T, H}), idd = i32(ids, {T, k}), wd = f32(cw, {T, k});
    const std::vector<float> res0 = randn(size_t(T * H), 125), out0 = randn(size_t(T * H), 126);
    Tensor res = f32(res0, {T, H}), out = f32(out0, {T, H}), h = be().alloc({T, H}, DType::F32);
    Tensor sums = be().alloc({T, ops().norm_parts(H)}, DType::F32), none;
    Tensor res2 = f32(res0, {T, H}), out2 = f32(out0, {T, H}), h2 = be().alloc({T, H}, DType::F32);
    std::vector<Tensor> y, want;
    for (const Tensor& wi : w) {
      y.push_back(be().alloc({T, wi.dim(0)}, DType::F32));
      want.push_back(be().alloc({T, wi.dim(0)}, DType::F32));
    }
    ASSERT_TRUE(ops().moe_routed_fits(x, idd, made.experts, nullptr));
    be().start_op_timing();
    const PendingNorm n = ops().moe_routed_add_norm(x, idd, wd, made.experts, nullptr, out, AddNorm{res, norm, eps, h, sums});
    ops().matmul_many_normed(n, none, w, y);
    std::vector<std::string> names;
    for (const OpTime& t : be().stop_op_timing()) names.push_back(t.op);
    std::sort(names.begin(), names.end());  // (the timer lists its ops by name)
    ops().moe_routed(x, idd, wd, made.experts, out2);
    ops().add_rms_norm(res2, out2, norm, eps, h2);
    ops().matmul_many(h2, w, want);
    if (T > 1) {
      EXPECT_EQ(n.parts, 0);
      EXPECT_EQ(names, (std::vector<std::string>{"add_rms_norm", "matmul gemv", "moe_routed"}));
      EXPECT_EQ(floats(res), floats(res2));
      EXPECT_EQ(floats(h), floats(h2));
      for (size_t i = 0; i < w.size(); ++i) EXPECT_EQ(floats(y[i]), floats(want[i])) << "output " << i;
      continue;
    }
    EXPECT_EQ(n.parts, 8);
    EXPECT_EQ(names, (std::vector<std::string>{"matmul gemv (times the row's RMS factor)",
                                               "moe_routed (the residual add and norm's sums at its store)"}));
    EXPECT_TRUE(all_near(floats(res), floats(res2), 1e-6, 1e-6));
    for (size_t i = 0; i < w.size(); ++i) EXPECT_TRUE(all_near(floats(y[i]), floats(want[i]), 1e-4, 1e-4)) << i;
    Tensor rows = be().alloc({T, H}, DType::F32);
    ops().matmul_many_normed(n, rows, {}, {});  // the rows alone: a kernel of their own
    EXPECT_TRUE(all_near(floats(rows), floats(h2), 1e-6, 1e-5));
  }
}

// A MoE layer's shared expert in moe_routed's pass (moe_routed_add_norm with it: a cluster a token
// more, the shared expert each token's first choice, its weight the sigmoid of its gate's logit):
// out is not read (NaN there adds nothing), the residual stream gets the shared expert's rows plus
// the choices' against the sums in double over the weights as stored, and h is the norm of that
// row. The 80B model's shapes (FP8, the shared expert as wide as a routed one) at 1-3 tokens, one
// choice of no expert and one of weight 0, a gate logit far below 0; a shared expert of another
// width is not taken.
TEST_P(CudaBf16Products, SharedExpertInTheRoutedPassEqualsTheSumsOfItsProducts) {
  const int64_t H = 2048, I = 512, E = 16, k = 10;
  CudaBackend& cb = dynamic_cast<CudaBackend&>(be());
  std::mt19937 rng(130);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const RandomExperts made = random_experts(cb, DType::F8_E4M3_B128, E + 1, H, I, 0.1f, rng, nd);
  const std::span<const SwigluWeights> routed(made.experts.data(), size_t(E));
  const std::vector<float> nw = randn(size_t(H), 131, 0.1f);
  const Tensor norm = f32(nw, {H});
  const float eps = 1e-6f;
  for (const int64_t T : {1, 2, 3}) {
    SCOPED_TRACE("T=" + std::to_string(T));
    auto [ids, cw] = random_choices(T, k, E, rng, [&] { return 0.05f + std::abs(nd(rng)) / 8; });
    ids[1] = -1, cw[1] = 0.0f;  // a padding row's choice
    cw[2] = 0.0f;               // a choice of weight 0
    const std::vector<float> logits = {0.3f, -30.0f, 1.5f}, x = randn(size_t(T * H), 132), res0 = randn(size_t(T * H), 133);
    const Tensor xd = f32(x, {T, H}), idd = i32(ids, {T, k}), wd = f32(cw, {T, k});
    const SharedExpert shared{made.experts[size_t(E)], f32(std::vector<float>(logits.begin(), logits.begin() + T), {T, 1})};
    Tensor res = f32(res0, {T, H}), out = f32(std::vector<float>(size_t(T * H), NAN), {T, H});
    Tensor h = be().alloc({T, H}, DType::F32), sums = be().alloc({T, ops().norm_parts(H)}, DType::F32);
    ASSERT_TRUE(ops().moe_routed_fits(xd, idd, routed, &shared));
    be().start_op_timing();
    const PendingNorm n = ops().moe_routed_add_norm(xd, idd, wd, routed, &shared, out, AddNorm{res, norm, eps, h, sums});
    if (n.parts > 0) ops().matmul_many_normed(n, h, {}, {});  // (one token: the norm's second half)
    std::vector<std::string> names;
    for (const OpTime& t : be().stop_op_timing()) names.push_back(t.op);
    EXPECT_TRUE(std::any_of(names.begin(), names.end(), [](const std::string& op) {
      return op.rfind("moe_routed with the shared expert", 0) == 0;
    })) << "one pass with the shared expert in it";
    const std::vector<float> got = floats(res), hv = floats(h);
    double worst = 0, worst_h = 0;
    for (int64_t t = 0; t < T; ++t) {
      std::vector<double> want(res0.begin() + t * H, res0.begin() + (t + 1) * H), scale(size_t(H), 1.0);
      add_expert_in_double(made, int32_t(E), 1.0 / (1.0 + std::exp(-double(logits[size_t(t)]))), &x[size_t(t * H)], H, I,
                           want, scale);
      for (int64_t j = 0; j < k; ++j) {
        const int32_t e = ids[size_t(t * k + j)];
        if (e >= 0 && cw[size_t(t * k + j)] != 0) add_expert_in_double(made, e, cw[size_t(t * k + j)], &x[size_t(t * H)], H, I, want, scale);
      }
      double ss = 0;
      for (int64_t c = 0; c < H; ++c) {
        worst = std::max(worst, std::abs(got[size_t(t * H + c)] - want[size_t(c)]) / scale[size_t(c)]);
        ss += double(got[size_t(t * H + c)]) * got[size_t(t * H + c)];
      }
      const double r = 1.0 / std::sqrt(ss / double(H) + eps);
      for (int64_t c = 0; c < H; ++c) {
        const double wh = got[size_t(t * H + c)] * r * (1.0 + nw[size_t(c)]);
        worst_h = std::max(worst_h, std::abs(hv[size_t(t * H + c)] - wh) / (1.0 + std::abs(wh)));
      }
    }
    EXPECT_LT(worst, 1e-5) << "relative to the sum of |products| (+ |res| ~ 1)";
    EXPECT_LT(worst_h, 1e-5) << "h: the norm of the row";
  }
  // A shared expert of another width than the routed ones': the model computes it beside.
  const RandomExperts narrow = random_experts(cb, DType::F8_E4M3_B128, 1, H, I / 2, 0.1f, rng, nd);
  const SharedExpert other{narrow.experts[0], f32({0.0f}, {1, 1})};
  EXPECT_FALSE(ops().moe_routed_fits(f32(randn(size_t(H), 134), {1, H}), i32(std::vector<int32_t>(size_t(k), 0), {1, k}),
                                     routed, &other));
}

// The graphs a backend holds are counted with the device memory their instantiation took (bench
// reports both): a key captured again replaces its graph, drop_graphs() frees them all.
TEST(CudaBackend, HeldGraphsAreCountedWithTheirMemory) {
  if (!cuda_available()) GTEST_SKIP() << "skipped: no CUDA device";
  CudaBackend be(0);
  Tensor a = be.alloc({1 << 16}, DType::F32), b = be.alloc({1 << 16}, DType::F32);
  auto capture = [&](int64_t key, int copies) {
    be.begin_capture();
    for (int i = 0; i < copies; ++i) be.ops().copy(i % 2 ? b : a, i % 2 ? a : b);
    be.end_capture(key);
  };
  capture(1, 1);
  capture(2, 2000);
  EXPECT_EQ(be.counters().graphs, 2);
  const int64_t bytes = be.counters().graph_bytes;
  capture(1, 1);  // replaces key 1's graph
  EXPECT_EQ(be.counters().graphs, 2);
  std::printf("two graphs of 1 and 2,000 copies took %lld bytes as they were instantiated\n", (long long)bytes);
  be.drop_graphs();
  EXPECT_EQ(be.counters().graphs, 0);
  EXPECT_EQ(be.counters().graph_bytes, 0);
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

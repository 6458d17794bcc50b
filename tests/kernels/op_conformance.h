#pragma once
// What every backend must compute: one parameterised suite over the backend contract (backend.h,
// workspace.h, every op of ops.h). Inputs are made on the host and uploaded, outputs downloaded
// and compared with naive references written here (double precision where it matters; the
// tolerance is stated at each check), never with a backend's own code. The DeltaNet state ops are
// checked against the single-sequence cpu:: kernels run one sequence at a time, an independent
// path (so a test binary that includes this header links ballast_kernels_cpu).
//
// A backend's test file includes this header once and instantiates it:
//   INSTANTIATE_TEST_SUITE_P(Cpu, OpConformance, ::testing::Values(BackendCase{"threads1", ...}),
//                            backend_case_name);
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "ballast/core/dtype.h"
#include "ballast/core/error.h"
#include "ballast/eplb/dispatch.h"
#include "ballast/kernels/backend.h"
#include "ballast/kernels/cpu/causal_conv1d.h"
#include "ballast/kernels/cpu/gated_delta_rule.h"
#include "ballast/kernels/ops.h"
#include "ballast/kernels/random_fill.h"
#include "ballast/kernels/sampling.h"
#include "ballast/kernels/workspace.h"
#include "support/expect_error.h"

namespace ballast::kernels::conformance {

struct BackendCase {
  std::string name;  // the test-name suffix, e.g. "threads3"
  std::function<std::unique_ptr<Backend>()> make;
  // Why this backend cannot run here (e.g. "no CUDA device"); empty or unset: it can.
  std::function<std::string()> unavailable = {};
};

inline std::string backend_case_name(const ::testing::TestParamInfo<BackendCase>& info) { return info.param.name; }
inline void PrintTo(const BackendCase& c, std::ostream* os) { *os << c.name; }

// --- host-side helpers ---

inline std::vector<float> randn(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, scale);
  std::vector<float> v(n);
  for (auto& e : v) e = nd(rng);
  return v;
}

inline std::vector<float> uniform_floats(size_t n, uint32_t seed, float lo, float hi) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> ud(lo, hi);
  std::vector<float> v(n);
  for (auto& e : v) e = ud(rng);
  return v;
}

// The values `v` become when stored in `dtype` (what a backend reads back from a weight).
inline std::vector<float> stored_as(const std::vector<float>& v, DType dtype) {
  std::vector<float> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    switch (dtype) {
      case DType::F32: r[i] = v[i]; break;
      case DType::BF16: r[i] = bf16_to_f32(f32_to_bf16(v[i])); break;
      case DType::F16: r[i] = f16_to_f32(f32_to_f16(v[i])); break;
      default: ADD_FAILURE() << "stored_as: unsupported dtype " << dtype_name(dtype); break;
    }
  }
  return r;
}

// A host tensor of `v` stored in `dtype` (F32, BF16 or F16), as a checkpoint holds a weight.
inline Tensor host_tensor(const std::vector<float>& v, std::vector<int64_t> shape, DType dtype) {
  Tensor t = Tensor::zeros(std::move(shape), dtype);
  EXPECT_EQ(size_t(t.numel()), v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    if (dtype == DType::F32) t.data<float>()[i] = v[i];
    else if (dtype == DType::BF16) t.data<uint16_t>()[i] = f32_to_bf16(v[i]);
    else if (dtype == DType::F16) t.data<uint16_t>()[i] = f32_to_f16(v[i]);
    else ADD_FAILURE() << "host_tensor: unsupported dtype " << dtype_name(dtype);
  }
  return t;
}

// The e4m3 value nearest to v (ties to the even code), by search: the test's own rounding.
inline uint8_t nearest_e4m3(float v) {
  uint8_t best = 0;
  double best_err = INFINITY;
  for (int c = 0; c < 256; ++c) {
    const float f = fp8e4m3_to_f32(uint8_t(c));
    if (std::isnan(f)) continue;
    const double err = std::abs(double(f) - double(v));
    if (err < best_err || (err == best_err && (c & 1) == 0)) best = uint8_t(c), best_err = err;
  }
  return best;
}

// A weight [R, C] in Qwen's fine-grained FP8 as its releases make it (per 128 x 128 block,
// partial at the edges: scale = amax / 448, elements = nearest e4m3 of v / scale), and the values
// it stands for (element * scale), which references compute with.
struct BlockScaledHost {
  Tensor tensor;              // F8_E4M3_B128 on the host
  std::vector<float> stored;  // [R, C]: e4m3 * scale, in fp32
};
inline BlockScaledHost block_scaled_host(const std::vector<float>& v, int64_t R, int64_t C) {
  const int64_t SR = scale_blocks(R), SC = scale_blocks(C);
  Tensor q = Tensor::zeros({R, C}, DType::F8_E4M3), s = Tensor::zeros({SR, SC}, DType::F32);
  std::vector<float> stored(size_t(R * C));
  for (int64_t br = 0; br < SR; ++br)
    for (int64_t bc = 0; bc < SC; ++bc) {
      float amax = 0;
      for (int64_t r = br * kScaleBlock; r < std::min(R, (br + 1) * kScaleBlock); ++r)
        for (int64_t c = bc * kScaleBlock; c < std::min(C, (bc + 1) * kScaleBlock); ++c)
          amax = std::max(amax, std::abs(v[size_t(r * C + c)]));
      const float scale = amax > 0 ? amax / 448.0f : 1.0f;
      s.data<float>()[br * SC + bc] = scale;
      for (int64_t r = br * kScaleBlock; r < std::min(R, (br + 1) * kScaleBlock); ++r)
        for (int64_t c = bc * kScaleBlock; c < std::min(C, (bc + 1) * kScaleBlock); ++c) {
          const uint8_t e = nearest_e4m3(v[size_t(r * C + c)] / scale);
          q.data<uint8_t>()[r * C + c] = e;
          stored[size_t(r * C + c)] = fp8e4m3_to_f32(e) * scale;
        }
    }
  return {Tensor::block_scaled(q, s), std::move(stored)};
}

// max |a - b| / (atol + rtol |b|) <= 1, with the first offender reported.
inline ::testing::AssertionResult all_near(const std::vector<float>& got, const std::vector<double>& want, double atol,
                                           double rtol = 0.0) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << "size " << got.size() << " != " << want.size();
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::abs(double(got[i]) - want[i]);
    if (!(err <= atol + rtol * std::abs(want[i])))
      return ::testing::AssertionFailure() << "at " << i << ": got " << got[i] << ", want " << want[i] << " (error "
                                           << err << ", atol " << atol << ", rtol " << rtol << ")";
  }
  return ::testing::AssertionSuccess();
}
inline ::testing::AssertionResult all_near(const std::vector<float>& got, const std::vector<float>& want, double atol,
                                           double rtol = 0.0) {
  return all_near(got, std::vector<double>(want.begin(), want.end()), atol, rtol);
}

// y = x @ w^T in double (x [T, K], w [N, K] as stored) and the largest sum |x||w| of an output:
// fp32 accumulation error is a few ulps of that scale.
struct ReferenceProducts {
  std::vector<double> y;
  double scale = 0;
};
template <typename X>
ReferenceProducts reference_products(const std::vector<X>& x, const std::vector<float>& w, int64_t T, int64_t N,
                                     int64_t K) {
  ReferenceProducts r{std::vector<double>(size_t(T * N)), 0.0};
  for (int64_t t = 0; t < T; ++t)
    for (int64_t n = 0; n < N; ++n) {
      double s = 0, a = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double p = double(x[size_t(t * K + k)]) * w[size_t(n * K + k)];
        s += p, a += std::abs(p);
      }
      r.y[size_t(t * N + n)] = s;
      r.scale = std::max(r.scale, a);
    }
  return r;
}

// ||a - b|| / ||b||.
inline double rel_l2(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return a.size() != b.size() ? INFINITY : std::sqrt(num / std::max(den, 1e-300));
}

inline double silu_d(double x) { return x / (1.0 + std::exp(-x)); }
inline double sigmoid_d(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// A pass's sequences on the host, made into a SeqLayout by OpConformance::layout().
struct HostLayout {
  std::vector<int32_t> cu{0};
  std::vector<int32_t> kv_lens, block_tables, slot_mapping, state_slots, snapshot_slots;
  int width = 0, snapshot_width = 0, block_size = 0;
  int num_seqs() const { return int(cu.size()) - 1; }
  // Sequence b verifies drafts (its first snapshot slot is given).
  bool verifying(int b) const { return snapshot_width > 0 && snapshot_slots[size_t(b * snapshot_width)] >= 0; }
  // fn(b, t, len) for each new row t of each sequence b: row i of b's n new rows sees b's cache rows
  // [0, len), len = kv_len - n + i + 1 (causal attention's reach).
  template <typename F>
  void each_new_row(F fn) const {
    for (int b = 0; b < num_seqs(); ++b) {
      const int n = cu[size_t(b) + 1] - cu[size_t(b)], kv = kv_lens[size_t(b)];
      for (int i = 0; i < n; ++i) fn(b, int64_t(cu[size_t(b)]) + i, int64_t(kv - n + i + 1));
    }
  }
};

// The truncated sampling distribution, computed independently of sampling.h, in double.
inline std::vector<double> reference_distribution(const std::vector<float>& logits, double temperature, double top_p,
                                                  int top_k) {
  const size_t V = logits.size();
  std::vector<double> p(V);
  const double mx = *std::max_element(logits.begin(), logits.end());
  double sum = 0;
  for (size_t i = 0; i < V; ++i) sum += (p[i] = std::exp((logits[i] - mx) / temperature));
  for (auto& e : p) e /= sum;
  std::vector<size_t> order(V);
  std::iota(order.begin(), order.end(), size_t(0));
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return p[a] > p[b]; });
  size_t keep = top_k > 0 ? std::min(V, size_t(top_k)) : V;
  double mass = 0;
  for (size_t i = 0; i < keep; ++i)
    if ((mass += p[order[i]]) >= top_p) {
      keep = i + 1;
      break;
    }
  std::vector<double> out(V, 0.0);
  double kept = 0;
  for (size_t i = 0; i < keep; ++i) kept += p[order[i]];
  for (size_t i = 0; i < keep; ++i) out[order[i]] = p[order[i]] / kept;
  return out;
}

struct DeltaNetCase {
  DeltaRuleDims d{2, 4, 16, 16};
  int kc = 4;
  DType rows = DType::F32;  // the conv's out and the delta rule's qkv (Ops::delta_rule_rows_dtype)
  int64_t C() const { return 2 * int64_t(d.Hk) * d.dk + int64_t(d.Hv) * d.dv; }
  int64_t conv_state() const { return C() * (kc - 1); }
  int64_t rule_state() const { return int64_t(d.Hv) * d.dk * d.dv; }
};

// A placement of E = 8 experts on G = 4 ranks of K = 3 slots (4 redundant replicas).
struct Placement {
  int G = 4, K = 3, E = 8;
  std::vector<int32_t> row{0, 1, 2, 3, 4, 0, 5, 6, 1, 7, 0, 3};
};

class OpConformance : public ::testing::TestWithParam<BackendCase> {
 protected:
  void SetUp() override {
    if (GetParam().unavailable)
      if (const std::string why = GetParam().unavailable(); !why.empty()) GTEST_SKIP() << "skipped: " << why;
    backend_ = GetParam().make();
  }

  Backend& be() { return *backend_; }
  Ops& ops() { return backend_->ops(); }
  // (Defined beside the grouped experts' tests.)
  void check_block_scaled_fp8_experts(int64_t H, int64_t I, int64_t E, bool bf16_first,
                                      std::initializer_list<int64_t> tokens);

  template <typename T>
  Tensor upload(const std::vector<T>& v, std::vector<int64_t> shape, DType dtype) {
    Tensor t = be().alloc(std::move(shape), dtype);
    EXPECT_EQ(t.nbytes(), v.size() * sizeof(T)) << "upload: " << t.shape_str();
    be().upload(v.data(), t);
    return t;
  }
  Tensor f32(const std::vector<float>& v, std::vector<int64_t> shape) { return upload(v, std::move(shape), DType::F32); }
  Tensor i32(const std::vector<int32_t>& v, std::vector<int64_t> shape) {
    return upload(v, std::move(shape), DType::I32);
  }
  Tensor i32(const std::vector<int32_t>& v) { return i32(v, {int64_t(v.size())}); }
  Tensor i64(const std::vector<int64_t>& v) { return upload(v, {int64_t(v.size())}, DType::I64); }
  // A weight as the model gets it: a host tensor in `dtype`, made readable by the device.
  Tensor weight(const std::vector<float>& v, std::vector<int64_t> shape, DType dtype) {
    return be().to_device(host_tensor(v, std::move(shape), dtype));
  }

  std::vector<float> floats(const Tensor& t) {
    std::vector<float> v(size_t(t.numel()));
    EXPECT_EQ(t.dtype(), DType::F32);
    be().download(t, v.data());
    return v;
  }
  std::vector<int32_t> ints(const Tensor& t) {
    std::vector<int32_t> v(size_t(t.numel()));
    EXPECT_EQ(t.dtype(), DType::I32);
    be().download(t, v.data());
    return v;
  }

  SeqLayout layout(const HostLayout& h) {
    SeqLayout l;
    l.num_seqs = h.num_seqs();
    l.num_tokens = h.cu.back();
    l.block_size = h.block_size;
    l.prefill_seqs = 0;
    for (int b = 0; b < l.num_seqs; ++b) {
      const int n = h.cu[size_t(b) + 1] - h.cu[size_t(b)];
      l.max_query_len = std::max(l.max_query_len, n);
      if (!h.kv_lens.empty()) l.max_kv_len = std::max(l.max_kv_len, h.kv_lens[size_t(b)]);
      l.prefill_seqs += n > 1 && !h.verifying(b);
    }
    l.cu_seqlens = i32(h.cu);
    if (!h.kv_lens.empty()) l.kv_lens = i32(h.kv_lens);
    if (h.width > 0) l.block_tables = i32(h.block_tables, {l.num_seqs, h.width});
    l.slot_mapping = i32(h.slot_mapping);
    if (!h.state_slots.empty()) l.state_slots = i32(h.state_slots);
    if (h.snapshot_width > 0) l.snapshot_slots = i32(h.snapshot_slots, {l.num_seqs, h.snapshot_width});
    return l;
  }

  // The same layout with its block tables as rows of a larger table (a table per entry a cache
  // holds, on the device: StateCache::block_tables), sequence b at row 2 (B - b) - 1 and every
  // other row -1, named by table_rows.
  SeqLayout with_table_rows(const HostLayout& h) {
    SeqLayout l = layout(h);
    const int B = h.num_seqs(), R = 2 * B + 1;
    std::vector<int32_t> big(size_t(R * h.width), -1), rows(static_cast<size_t>(B));
    for (int b = 0; b < B; ++b) {
      rows[size_t(b)] = 2 * (B - b) - 1;
      std::copy_n(h.block_tables.begin() + b * h.width, h.width, big.begin() + rows[size_t(b)] * h.width);
    }
    l.block_tables = i32(big, {R, h.width});
    l.table_rows = i32(rows);
    return l;
  }

  SamplingRows sampling_rows(const std::vector<float>& temperature, const std::vector<float>& top_p,
                             const std::vector<int32_t>& top_k, const std::vector<int64_t>& seed,
                             const std::vector<int32_t>& position) {
    const int64_t R = int64_t(temperature.size());
    return {f32(temperature, {R}), f32(top_p, {R}), i32(top_k), i64(seed), i32(position)};
  }

  // The dispatch tables of `pl` for `rank`, as the model uploads them.
  DispatchTables dispatch_tables(const Placement& pl, eplb::Dispatch policy, int rank, int64_t pass) {
    DispatchTables t;
    t.policy = policy;
    t.rank = rank;
    t.ranks = pl.G;
    t.slots_per_rank = pl.K;
    t.layer = 5;
    t.phy2log = i32(pl.row);
    const auto table = eplb::static_table(pl.row, pl.G, 0, pl.E);
    t.static_slot = i32(std::vector<int32_t>(table.begin() + rank * pl.E, table.begin() + (rank + 1) * pl.E));
    const auto rep = eplb::replicas_of(pl.row, pl.E);
    size_t rmax = 0;
    for (const auto& r : rep) rmax = std::max(rmax, r.size());
    std::vector<int32_t> replicas(size_t(pl.E) * rmax, -1), count(size_t(pl.E));
    for (int e = 0; e < pl.E; ++e) {
      count[size_t(e)] = int32_t(rep[size_t(e)].size());
      std::copy(rep[size_t(e)].begin(), rep[size_t(e)].end(), replicas.begin() + e * int64_t(rmax));
    }
    t.replicas = i32(replicas, {pl.E, int64_t(rmax)});
    t.replica_count = i32(count);
    t.pass_seed = i64({pass});
    return t;
  }

  // rule_tol: the delta rule's relative L2 bar (outputs and states).
  void check_deltanet_pass(const DeltaNetCase& c, const HostLayout& h, int64_t slots, uint32_t seed,
                           double rule_tol = 1e-5);
  // The heads of Qwen3-Next (dk = dv = 128, two value heads a key head): CUDA's state kernel
  // takes them in four slices of 32 columns here; sequences of one row, one chunk, a short last
  // chunk, and four chunks.
  void check_deltanet_at_qwen_head_dims(double rule_tol = 1e-5, DType rows_dtype = DType::F32) {
    DeltaNetCase c;
    c.d = DeltaRuleDims{2, 4, 128, 128};
    c.rows = rows_dtype;
    HostLayout h;
    const std::vector<int> rows{1, 64, 3, 250, 70};
    h.state_slots = {4, 0, 2, 5, 1};
    for (int n : rows) h.cu.push_back(h.cu.back() + n);
    check_deltanet_pass(c, h, 6, 80, rule_tol);
  }

 private:
  std::unique_ptr<Backend> backend_;
};

// ============================================================================================
// Backend memory and the workspace
// ============================================================================================

TEST_P(OpConformance, BackendMemoryIsCountedAndRoundTrips) {
  EXPECT_FALSE(be().describe().empty());
  const Counters c0 = be().counters();
  Tensor t = be().alloc({3, 5}, DType::F32);
  ASSERT_TRUE(t.defined());
  EXPECT_EQ(t.device(), be().device());
  EXPECT_EQ(t.shape(), (std::vector<int64_t>{3, 5}));
  EXPECT_EQ(be().counters().allocations, c0.allocations + 1);
  EXPECT_GE(be().counters().bytes_allocated, c0.bytes_allocated + 60);

  std::vector<float> h(15);
  std::iota(h.begin(), h.end(), 1.0f);
  be().upload(h.data(), t);
  h.assign(15, -1.0f);  // the host buffer may be reused once upload returns
  EXPECT_EQ(be().counters().uploads, c0.uploads + 1);
  EXPECT_EQ(be().counters().bytes_uploaded, c0.bytes_uploaded + 60);
  std::vector<float> back(15);
  be().download(t, back.data());
  EXPECT_EQ(be().counters().downloads, c0.downloads + 1);
  EXPECT_EQ(be().counters().bytes_downloaded, c0.bytes_downloaded + 60);
  for (size_t i = 0; i < back.size(); ++i) EXPECT_EQ(back[i], float(i + 1));

  // Every dtype holds its bytes.
  std::vector<int64_t> big{int64_t(1) << 40, -3, 7};
  Tensor t64 = i64(big);
  std::vector<int64_t> big_back(3);
  be().download(t64, big_back.data());
  EXPECT_EQ(big_back, big);

  // Empty tensors are defined and move nothing.
  Tensor e = be().alloc({0, 4}, DType::I32);
  EXPECT_TRUE(e.defined());
  EXPECT_EQ(e.numel(), 0);
  int32_t dummy = 42;
  be().upload(&dummy, e);
  be().download(e, &dummy);
  EXPECT_EQ(dummy, 42);

  // A host weight reads back the same through to_device.
  const std::vector<float> wv = randn(10, 1);
  Tensor w = be().to_device(host_tensor(wv, {2, 5}, DType::BF16));
  EXPECT_EQ(w.dtype(), DType::BF16);
  EXPECT_EQ(w.shape(), (std::vector<int64_t>{2, 5}));
  std::vector<uint16_t> wb(10);
  be().download(w, wb.data());
  for (size_t i = 0; i < wb.size(); ++i) EXPECT_EQ(wb[i], f32_to_bf16(wv[i]));
  be().synchronize();
}

TEST_P(OpConformance, WorkspaceReusesOneBufferAtFixedAddresses) {
  Workspace ws(be());
  const std::vector<int64_t> sizes{1000, 3, 0, 70000, 17, 256, 4096};
  // One pass: takes in a fixed order; returns their addresses, checking alignment and that the
  // tensors are distinct memory (each gets its own pattern and reads it back).
  auto pass = [&](int scale) {
    ws.reset();
    std::vector<uintptr_t> at;
    std::vector<Tensor> taken;
    for (size_t i = 0; i < sizes.size(); ++i) {
      Tensor t = ws.take({sizes[i] * scale}, i % 2 ? DType::I32 : DType::F32);
      EXPECT_TRUE(t.defined());
      EXPECT_EQ(t.device(), be().device());
      EXPECT_EQ(t.numel(), sizes[i] * scale);
      EXPECT_EQ(reinterpret_cast<uintptr_t>(t.raw()) % 256, 0u) << "take " << i << " is not 256-byte aligned";
      at.push_back(reinterpret_cast<uintptr_t>(t.raw()));
      std::vector<int32_t> pattern(size_t(t.numel()), int32_t(i * 1000 + scale));
      be().upload(pattern.data(), t);
      taken.push_back(t);
    }
    for (size_t i = 0; i < taken.size(); ++i) {
      std::vector<int32_t> back(size_t(taken[i].numel()));
      be().download(taken[i], back.data());
      EXPECT_TRUE(std::all_of(back.begin(), back.end(), [&](int32_t v) { return v == int32_t(i * 1000 + scale); }))
          << "take " << i << " overlaps another";
    }
    return at;
  };
  const int64_t a0 = be().counters().allocations;
  pass(1);
  EXPECT_GT(be().counters().allocations, a0) << "the first pass allocates";
  const auto second = pass(1);  // after an outgrown first pass, reset() made one buffer
  EXPECT_GE(ws.capacity(), ws.high_water());
  const int64_t a2 = be().counters().allocations;
  const int64_t bytes2 = be().counters().bytes_allocated;
  EXPECT_EQ(pass(1), second) << "the same takes get the same addresses";
  EXPECT_EQ(pass(1), second);
  EXPECT_EQ(be().counters().allocations, a2) << "steady state allocates nothing";
  EXPECT_EQ(be().counters().bytes_allocated, bytes2);
  const size_t hw = ws.high_water();
  size_t expect_hw = 0;
  for (int64_t s : sizes) expect_hw += size_t(std::max<int64_t>(s * 4, 1) + 255) / 256 * 256;
  EXPECT_EQ(hw, expect_hw) << "high water counts every take, rounded to 256 bytes";

  // A larger pass grows the buffer (counted), then is steady again; smaller passes fit.
  pass(3);
  EXPECT_GT(be().counters().allocations, a2);
  EXPECT_GT(ws.high_water(), hw);
  const auto big = pass(3);
  const int64_t a3 = be().counters().allocations;
  EXPECT_EQ(pass(3), big);
  pass(1);
  EXPECT_EQ(pass(3), big);
  EXPECT_EQ(be().counters().allocations, a3);
}

TEST_P(OpConformance, WorkspaceFirstPassHoldsLittleMoreThanItTakes) {
  // 65 takes of 40 KB: where each new block was as large as all before, the 65th take opened a
  // block as large as the 64 before it (2x the pass at its end); grown by quarters, ~1.13x.
  Workspace ws(be());
  for (int i = 0; i < 65; ++i) ws.take({10000});
  EXPECT_LE(double(ws.capacity()), 1.25 * double(ws.high_water()))
      << ws.capacity() << " bytes held for " << ws.high_water() << " taken";
  ws.reset();
  EXPECT_GE(ws.capacity(), ws.high_water());
  EXPECT_LE(ws.capacity(), ws.high_water() + 1024) << "after the pass, one buffer of what it took";

  // A first pass of layers, each in a scope: the blocks one layer outgrew serve the next layer's
  // takes (the deepest layer's scratch at most, not the sum over the layers).
  Workspace layers(be());
  std::vector<uintptr_t> first, last;
  for (int l = 0; l < 8; ++l) {
    Workspace::Scope scope(layers);
    for (int i = 0; i < 65; ++i) {
      const Tensor t = layers.take({10000});
      (l == 0 ? first : last).push_back(reinterpret_cast<uintptr_t>(t.raw()));
    }
    if (l > 0) {
      EXPECT_EQ(last, first) << "layer " << l << " takes what layer 0 gave back";
    }
    last.clear();
  }
  EXPECT_LE(double(layers.capacity()), 1.25 * double(layers.high_water()))
      << layers.capacity() << " bytes held for " << layers.high_water() << " taken";
}

// ============================================================================================
// Rows and elementwise
// ============================================================================================

TEST_P(OpConformance, Embedding) {
  const int64_t V = 11, H = 6;
  const std::vector<float> table = randn(size_t(V * H), 2);
  const std::vector<int32_t> ids{3, 0, 10, 3, 7};
  for (DType dt : {DType::F32, DType::BF16}) {
    const std::vector<float> stored = stored_as(table, dt);
    Tensor out = be().alloc({5, H}, DType::F32);
    ops().embedding(i32(ids), weight(table, {V, H}, dt), out);
    std::vector<float> want;
    for (int32_t id : ids) want.insert(want.end(), stored.begin() + id * H, stored.begin() + (id + 1) * H);
    EXPECT_TRUE(all_near(floats(out), want, 0.0)) << dtype_name(dt);
  }
}

TEST_P(OpConformance, MatmulInEveryWeightDtype) {
  const int64_t K = 70, N = 130;  // N spans several blocks of 64 weight rows, K is no multiple of 16
  const std::vector<float> wv = randn(size_t(N * K), 3, 0.2f);
  for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
    const std::vector<float> ws = stored_as(wv, dt);
    Tensor w = weight(wv, {N, K}, dt);
    for (int64_t T : {0, 1, 5, 40}) {
      const std::vector<float> x = randn(size_t(T * K), 4 + uint32_t(T));
      Tensor y = be().alloc({T, N}, DType::F32);
      ops().matmul(f32(x, {T, K}), w, y);
      const ReferenceProducts want = reference_products(x, ws, T, N, K);
      // Tolerance: 1e-6 of the largest sum of |products| (fp32 accumulation over K = 70).
      EXPECT_TRUE(all_near(floats(y), want.y, 1e-6 * std::max(want.scale, 1.0))) << dtype_name(dt) << " T=" << T;
    }
  }
}

TEST_P(OpConformance, MatmulManyEqualsEachMatmul) {
  // The projections of one input: every output exactly as its own matmul would write it, with
  // outputs of 1 to 130 columns, K vector-friendly or not, weight dtypes alike or mixed (F32 beside
  // BF16; block-scaled FP8 beside BF16, as an FP8 model's projections are). (CUDA's tensor-core
  // products, where matmul_many converts x once a form, are CudaBf16Products' test of many targets.)
  enum Mix { kSame, kF32, kFp8 };
  for (int64_t K : {64, 70, 512})
    for (Mix mixed : {kSame, kF32, kFp8})
      for (int64_t T : {0, 1, 3, 8, 12}) {
        const std::vector<int64_t> Ns{130, 1, 33, 64};
        std::vector<Tensor> w, y, each;
        for (size_t i = 0; i < Ns.size(); ++i) {
          const std::vector<float> v = randn(size_t(Ns[i] * K), 20 + uint32_t(i), 0.2f);
          if (mixed == kFp8 && (i == 0 || i == 3)) w.push_back(be().to_device(block_scaled_host(v, Ns[i], K).tensor));
          else w.push_back(weight(v, {Ns[i], K}, mixed == kF32 && i == 2 ? DType::F32 : DType::BF16));
          y.push_back(be().alloc({T, Ns[i]}, DType::F32));
          each.push_back(be().alloc({T, Ns[i]}, DType::F32));
        }
        const Tensor x = f32(randn(size_t(T * K), 30 + uint32_t(T)), {T, K});
        ops().matmul_many(x, w, y);
        for (size_t i = 0; i < Ns.size(); ++i) {
          ops().matmul(x, w[i], each[i]);
          EXPECT_EQ(floats(y[i]), floats(each[i])) << "K=" << K << " mixed=" << mixed << " T=" << T << " output " << i;
        }
      }
  const Tensor x = f32(randn(8, 1), {1, 8});
  const Tensor w1[] = {weight(randn(16, 2), {2, 8}, DType::F32)};
  Tensor y2[] = {be().alloc({1, 2}, DType::F32), be().alloc({1, 2}, DType::F32)};
  test::expect_error([&] { ops().matmul_many(x, w1, y2); }, {"matmul_many", "1 weights for 2 outputs"});
  Tensor wrong[] = {be().alloc({1, 3}, DType::F32)};
  test::expect_error([&] { ops().matmul_many(x, w1, wrong); }, {"matmul"});
}

// swiglu_down is silu_mul, matmul and scale_rows_sigmoid in one op: bit for bit what the three
// write (CUDA's few-row products apply the row gate as they store, and at one or two rows form
// silu(gate) * up as they load: the same floats, sums in the same order), for few and many rows,
// every weight dtype, K vector-friendly or not, with and without the row gate.
TEST_P(OpConformance, SwigluDownEqualsSiluMulMatmulAndRowGate) {
  const int64_t N = 130;
  for (int64_t K : {64, 70})
    for (DType dt : {DType::F32, DType::BF16, DType::F16, DType::F8_E4M3_B128})
      for (int64_t T : {1, 2, 5, 8, 12})
        for (bool gated : {false, true}) {
          SCOPED_TRACE(std::string(dtype_name(dt)) + " K=" + std::to_string(K) + " T=" + std::to_string(T) +
                       (gated ? " gated" : ""));
          const std::vector<float> wv = randn(size_t(N * K), 40, 0.2f);
          const Tensor w = dt == DType::F8_E4M3_B128 ? be().to_device(block_scaled_host(wv, N, K).tensor)
                                                     : weight(wv, {N, K}, dt);
          const std::vector<float> gv = randn(size_t(T * K), 41), uv = randn(size_t(T * K), 42);
          const Tensor up = f32(uv, {T, K});
          const Tensor row_gate = gated ? f32(randn(size_t(T), 43), {T, 1}) : Tensor();
          Tensor g1 = f32(gv, {T, K}), g2 = f32(gv, {T, K});
          Tensor want = be().alloc({T, N}, DType::F32), got = be().alloc({T, N}, DType::F32);
          ops().silu_mul(g1, up, g1);
          ops().matmul(g1, w, want);
          if (gated) ops().scale_rows_sigmoid(want, row_gate);
          ops().swiglu_down(g2, up, w, row_gate, got);
          EXPECT_EQ(floats(got), floats(want));
        }
  const Tensor w = weight(randn(32, 50), {4, 8}, DType::F32);
  Tensor g = be().alloc({2, 8}, DType::F32), u = be().alloc({2, 7}, DType::F32), out = be().alloc({2, 4}, DType::F32);
  test::expect_error([&] { ops().swiglu_down(g, u, w, Tensor(), out); }, {"swiglu_down", "gate", "up"});
  Tensor u2 = be().alloc({2, 8}, DType::F32), rg = be().alloc({3, 1}, DType::F32);
  test::expect_error([&] { ops().swiglu_down(g, u2, w, rg, out); }, {"swiglu_down", "row_gate"});
}

// Side work (Ops::side) may run beside the ops issued after it until join_side(). Beside each
// other, products on both orders write what each writes alone: a few rows of block-scaled FP8 (on
// CUDA they take the ops' scratch: the side has its own) and many rows of bf16 (cuBLAS: one
// workspace, so the main order's call waits for the side). After the join, what the side wrote last
// is seen, also in a graph whose capture ended with side work out (the backend joins it). Side work
// issued inside side work runs in place.
TEST_P(OpConformance, SideWorkRunsBesideAndIsSeenAfterItsJoin) {
  const int64_t K = 512, N = 1024;
  const std::vector<float> wv = randn(size_t(N * K), 50, 0.2f);
  const Tensor w8 = be().to_device(block_scaled_host(wv, N, K).tensor), wb = weight(wv, {N, K}, DType::BF16);
  for (int64_t T : {4, 64}) {
    SCOPED_TRACE("T=" + std::to_string(T));
    const Tensor& w = T == 4 ? w8 : wb;
    const Tensor xs = f32(randn(size_t(T * K), 51), {T, K}), xm = f32(randn(size_t(T * K), 52), {T, K});
    Tensor ys_alone = be().alloc({T, N}, DType::F32), ym_alone = be().alloc({T, N}, DType::F32);
    ops().matmul(xs, w, ys_alone);
    ops().matmul(xm, w, ym_alone);
    const std::vector<float> want_s = floats(ys_alone), want_m = floats(ym_alone);
    Tensor tmp = be().alloc({T, N}, DType::F32), ys = be().alloc({T, N}, DType::F32);
    Tensor ym = be().alloc({T, N}, DType::F32), nested = be().alloc({T, N}, DType::F32);
    Tensor seen = be().alloc({T, N}, DType::F32);
    // Issued as a pass is (no wait between), then downloaded: `seen` is copied from `ys` right
    // after the join, while the side's products (long, for a copy) may still run without it.
    auto pass = [&] {
      ops().zero(ys);
      ops().side([&] {
        for (int i = 0; i < 16; ++i) ops().matmul(xs, w, tmp);
        ops().side([&] { ops().matmul(xm, w, nested); });
        ops().copy(tmp, ys);
      });
      ops().matmul(xm, w, ym);
      ops().join_side();
      ops().copy(ys, seen);
    };
    pass();
    EXPECT_TRUE(all_near(floats(seen), want_s, 1e-5, 1e-5));
    EXPECT_TRUE(all_near(floats(ym), want_m, 1e-5, 1e-5));
    EXPECT_TRUE(all_near(floats(nested), want_m, 1e-5, 1e-5));
    if (!be().can_capture()) continue;
    ops().zero(seen);
    be().begin_capture();
    pass();
    ops().side([&] { ops().copy(ys, tmp); });  // out when the capture ends
    be().end_capture(7);
    be().synchronize();
    ASSERT_TRUE(be().replay(7));
    EXPECT_TRUE(all_near(floats(seen), want_s, 1e-5, 1e-5));
    EXPECT_TRUE(all_near(floats(tmp), want_s, 1e-5, 1e-5));
    be().drop_graphs();
  }
}

// Qwen's fine-grained FP8 (F8_E4M3_B128): each weight element is its e4m3 value times its 128 x
// 128 block's scale, summed in fp32; the activations stay F32. N and K are no multiples of 128, so
// the blocks at the bottom and right edges are partial, and the rows cross several blocks of 64.
TEST_P(OpConformance, MatmulWithBlockScaledFp8Weights) {
  const int64_t K = 200, N = 300;
  const BlockScaledHost wq = block_scaled_host(randn(size_t(N * K), 31, 0.2f), N, K);
  const Tensor w = be().to_device(wq.tensor);
  for (int64_t T : {0, 1, 5, 40}) {
    const std::vector<float> x = randn(size_t(T * K), 32 + uint32_t(T));
    Tensor y = be().alloc({T, N}, DType::F32);
    ops().matmul(f32(x, {T, K}), w, y);
    const ReferenceProducts want = reference_products(x, wq.stored, T, N, K);
    // fp32 accumulation over K = 200 (and a scale multiply per block): 2e-6 of sum |x||w|.
    EXPECT_TRUE(all_near(floats(y), want.y, 2e-6 * std::max(want.scale, 1.0))) << "T=" << T;
  }
}

// Block scales travel with their weight and are checked: a weight whose scales have the wrong
// shape is refused by matmul, and ops that take a weight but no block scales refuse FP8 ones.
TEST_P(OpConformance, BlockScaledWeightsAreCheckedAndOnlyProductsTakeThem) {
  const int64_t N = 130, K = 20;
  const BlockScaledHost wq = block_scaled_host(randn(size_t(N * K), 33), N, K);
  Tensor x = f32(randn(size_t(2 * K), 34), {2, K}), y = be().alloc({2, N}, DType::F32);
  // Scales of a [130, 20] weight are [2, 1]; a [1, 1] set (one block assumed) is refused.
  const Tensor one = Tensor::zeros({1, 1}, DType::F32);
  Tensor elements = wq.tensor.elements();
  EXPECT_THROW(Tensor::block_scaled(elements, one), Error);
  Tensor table = be().to_device(wq.tensor);
  Tensor out = be().alloc({1, K}, DType::F32);
  test::expect_error([&] { ops().embedding(i32({1}), table, out); }, {"embedding", "F8_E4M3_B128"});
  Tensor h = f32(randn(size_t(N), 35), {1, N});
  test::expect_error([&] { ops().rms_norm(h, be().to_device(block_scaled_host(randn(size_t(N * 1), 36), 1, N).tensor), 1e-6f, h); },
                     {"rms_norm"});
  // A view cut inside a 128-row block would need half a block's scale: refused.
  EXPECT_THROW(wq.tensor.rows(0, 64), Error);
  const Tensor lower = wq.tensor.rows(128, 130);  // a whole (partial) last block
  EXPECT_EQ(lower.scales().dim(0), 1);
  ops().matmul(x, table, y);
  const std::vector<float> full = floats(y);
  Tensor y2 = be().alloc({2, 2}, DType::F32);
  ops().matmul(x, be().to_device(lower), y2);
  const std::vector<float> part = floats(y2);
  for (int t = 0; t < 2; ++t)
    for (int n = 0; n < 2; ++n) EXPECT_EQ(part[size_t(t * 2 + n)], full[size_t(t * N + 128 + n)]) << t << " " << n;
}

TEST_P(OpConformance, FillUniformIsTheSameOnEveryBackend) {
  const int64_t n = 3 * 1000 + 7;  // not a multiple of any vector width
  for (DType dt : {DType::F32, DType::BF16, DType::F16, DType::F8_E4M3}) {
    Tensor t = be().alloc({3, n / 3 + 1}, dt);
    ops().fill_uniform(t, 42, 0.05f);
    std::vector<uint8_t> got(t.nbytes());
    be().download(t, got.data());
    std::vector<float> vals(size_t(t.numel()));
    to_f32(got.data(), dt, vals.data(), vals.size());
    double mean = 0;
    for (int64_t i = 0; i < t.numel(); ++i) {
      const float v = uniform_weight(42, uint64_t(i), 0.05f);
      const float want = dt == DType::F32    ? v
                         : dt == DType::BF16 ? bf16_to_f32(f32_to_bf16(v))
                         : dt == DType::F16  ? f16_to_f32(f32_to_f16(v))
                                             : fp8e4m3_to_f32(f32_to_e4m3(v));
      ASSERT_EQ(vals[size_t(i)], want) << dtype_name(dt) << " element " << i;
      ASSERT_LE(std::abs(vals[size_t(i)]), 0.05f * (1 + (dt == DType::F8_E4M3 ? 1.0f / 16 : 1.0f / 128)))
          << "within the scale, up to rounding";
      mean += vals[size_t(i)];
    }
    EXPECT_LT(std::abs(mean / double(t.numel())), 0.005) << "centred";
  }
  Tensor other = be().alloc({64}, DType::F32);
  ops().fill_uniform(other, 43, 1.0f);
  EXPECT_NE(floats(other)[0], uniform_weight(42, 0, 1.0f)) << "the seed matters";
  Tensor ints = be().alloc({4}, DType::I32);
  test::expect_error([&] { ops().fill_uniform(ints, 1, 1.0f); }, {"fill_uniform", "F32, BF16, F16 or F8_E4M3"});
}

TEST_P(OpConformance, OpTimingCountsEveryOpOnce) {
  Tensor a = f32(randn(64, 1), {8, 8}), b = f32(randn(64, 2), {8, 8});
  ops().add(a, b);  // not timed: timing is off
  be().start_op_timing();
  ops().add(a, b);
  ops().add(a, b);
  ops().zero(b);
  const std::vector<OpTime> times = be().stop_op_timing();
  std::map<std::string, OpTime> by_op;
  for (const OpTime& t : times) by_op[t.op] = t;
  ASSERT_EQ(by_op.size(), 2u);
  EXPECT_EQ(by_op["add"].calls, 2);
  EXPECT_EQ(by_op["zero"].calls, 1);
  EXPECT_GE(by_op["add"].seconds, 0.0);
  for (size_t i = 1; i < times.size(); ++i) EXPECT_GE(times[i - 1].seconds, times[i].seconds) << "by decreasing time";
  ops().add(a, b);
  EXPECT_TRUE(be().stop_op_timing().empty()) << "off again";
}

TEST_P(OpConformance, RmsNormInPlaceAndNot) {
  const int64_t R = 4, D = 33;
  const float eps = 1e-6f;
  std::vector<float> x = randn(size_t(R * D), 5);
  for (int64_t i = 0; i < D; ++i) x[size_t(i)] *= 1e-3f;  // a small row: eps matters there
  const std::vector<float> w = randn(size_t(D), 6, 0.1f);
  std::vector<double> want(x.size());
  for (int64_t r = 0; r < R; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < D; ++i) ss += double(x[size_t(r * D + i)]) * x[size_t(r * D + i)];
    const double inv = 1.0 / std::sqrt(ss / D + eps);
    for (int64_t i = 0; i < D; ++i) want[size_t(r * D + i)] = x[size_t(r * D + i)] * inv * (1.0 + w[size_t(i)]);
  }
  Tensor xd = f32(x, {R, D}), y = be().alloc({R, D}, DType::F32);
  ops().rms_norm(xd, f32(w, {D}), eps, y);
  EXPECT_TRUE(all_near(floats(y), want, 1e-6, 1e-5));
  ops().rms_norm(xd, f32(w, {D}), eps, xd);
  EXPECT_TRUE(all_near(floats(xd), want, 1e-6, 1e-5)) << "in place";
}

TEST_P(OpConformance, AddRmsNormAddsThenNorms) {
  // x += d, then y = rms_norm(x): rows short (a warp each) and long (a block each).
  const float eps = 1e-6f;
  for (int64_t D : {33, 2100}) {
    const int64_t R = 3;
    const std::vector<float> x = randn(size_t(R * D), 40), d = randn(size_t(R * D), 41), w = randn(size_t(D), 42, 0.1f);
    std::vector<float> sum(x.size());
    for (size_t i = 0; i < x.size(); ++i) sum[i] = x[i] + d[i];
    std::vector<double> want(x.size());
    for (int64_t r = 0; r < R; ++r) {
      double ss = 0;
      for (int64_t i = 0; i < D; ++i) ss += double(sum[size_t(r * D + i)]) * sum[size_t(r * D + i)];
      const double inv = 1.0 / std::sqrt(ss / double(D) + eps);
      for (int64_t i = 0; i < D; ++i) want[size_t(r * D + i)] = sum[size_t(r * D + i)] * inv * (1.0 + w[size_t(i)]);
    }
    Tensor xd = f32(x, {R, D}), y = be().alloc({R, D}, DType::F32);
    ops().add_rms_norm(xd, f32(d, {R, D}), f32(w, {D}), eps, y);
    EXPECT_EQ(floats(xd), sum) << "D=" << D << ": x holds the sum (one fp32 add each: exact)";
    EXPECT_TRUE(all_near(floats(y), want, 1e-6, 1e-5)) << "D=" << D;
    test::expect_error([&] { ops().add_rms_norm(xd, f32(d, {R, D}), f32(w, {D}), eps, xd); },
                       {"add_rms_norm", "overlaps"});
  }
}

// A norm left finished (add_norm_finished: add_rms_norm over an AddNorm, as the MoE runners end a
// layer where their last op cannot start it) is read by matmul_many_normed as the rows it holds: h
// a copy of them (none where h is the rows themselves), each product that of the rows. Pending
// norms are CUDA's (its backend tests); the checks name what is wrong with either.
TEST_P(OpConformance, MatmulManyNormedReadsAFinishedNorm) {
  const int64_t T = 3, H = 40;
  const float eps = 1e-6f;
  const std::vector<float> xv = randn(size_t(T * H), 130), dv = randn(size_t(T * H), 131);
  const Tensor w = f32(randn(size_t(H), 132, 0.1f), {H}), d = f32(dv, {T, H});
  const std::vector<Tensor> proj{weight(randn(size_t(24 * H), 133, 0.2f), {24, H}, DType::BF16),
                                 f32(randn(size_t(5 * H), 134, 0.2f), {5, H})};
  Tensor x = f32(xv, {T, H}), h = be().alloc({T, H}, DType::F32), sums = be().alloc({T, ops().norm_parts(H)}, DType::F32);
  const PendingNorm n = add_norm_finished(ops(), AddNorm{x, w, eps, h, sums}, d);
  EXPECT_EQ(n.parts, 0);
  EXPECT_EQ(n.s.raw(), h.raw());
  Tensor x2 = f32(xv, {T, H}), h2 = be().alloc({T, H}, DType::F32);
  ops().add_rms_norm(x2, d, w, eps, h2);
  EXPECT_EQ(floats(x), floats(x2));
  EXPECT_EQ(floats(h), floats(h2));
  std::vector<Tensor> y, want;
  for (const Tensor& p : proj) {
    y.push_back(be().alloc({T, p.dim(0)}, DType::F32));
    want.push_back(be().alloc({T, p.dim(0)}, DType::F32));
  }
  Tensor copy = be().alloc({T, H}, DType::F32), none;
  ops().matmul_many_normed(n, copy, proj, y);
  ops().matmul_many(h2, proj, want);
  EXPECT_EQ(floats(copy), floats(h2));
  for (size_t i = 0; i < proj.size(); ++i) EXPECT_EQ(floats(y[i]), floats(want[i])) << "product " << i;
  ops().matmul_many_normed(n, h, {}, {});  // the rows themselves: nothing to do
  EXPECT_EQ(floats(h), floats(h2));

  PendingNorm short_sums{h, be().alloc({T, 1}, DType::F32), 2, eps};
  test::expect_error([&] { ops().matmul_many_normed(short_sums, none, proj, y); },
                     {"matmul_many_normed", "2 partial sums"});
  PendingNorm pending{h, be().alloc({T, 2}, DType::F32), 2, eps};
  test::expect_error([&] { ops().matmul_many_normed(pending, h, proj, y); }, {"matmul_many_normed", "apart from"});
  Tensor wrong = be().alloc({T, 7}, DType::F32);
  test::expect_error([&] { ops().matmul_many_normed(n, none, std::span(&proj[0], 1), std::span(&wrong, 1)); },
                     {"matmul"});
  test::expect_error([&] { add_norm_finished(ops(), AddNorm{x, w, eps, x, sums}, d); }, {"add_rms_norm", "overlaps"});
}

// matmul_add_norm, then matmul_many_normed, is matmul, add_rms_norm and matmul_many: x holds x + o @
// w_out^T, h its norm, each product that of h, all within fp32 rounding of a double reference (CUDA
// splits the norm over its one-row products: the output projection's blocks sum the squares as they
// store, the next products apply the row's factor; CudaBackend's test checks that it does). Rows 1
// (split where the rows are whole vector steps), 2, 5 and 40, K and H multiples of 16 or not, the
// norm's weights F32 or BF16, every projection BF16, F32, or block-scaled FP8 beside BF16.
TEST_P(OpConformance, MatmulAddNormThenMatmulManyNormedProjectsAddsNormsAndProjects) {
  const float eps = 1e-6f;
  enum Mix { kBf16, kF32, kFp8 };
  const std::vector<int64_t> Ns{130, 1, 33, 64};
  for (const auto& [K, H] : {std::pair<int64_t, int64_t>{64, 96}, {70, 100}, {512, 2048}})
    for (DType ndt : {DType::F32, DType::BF16})
      for (Mix mix : {kBf16, kF32, kFp8}) {
        const auto weight_of = [&](const std::vector<float>& v, int64_t rows, int64_t cols, bool fp8,
                                   std::vector<float>& stored) {
          if (fp8) {
            BlockScaledHost b = block_scaled_host(v, rows, cols);
            stored = std::move(b.stored);
            return be().to_device(b.tensor);
          }
          const DType dt = mix == kF32 ? DType::F32 : DType::BF16;
          stored = stored_as(v, dt);
          return weight(v, {rows, cols}, dt);
        };
        std::vector<float> wos;
        const Tensor w_out = weight_of(randn(size_t(H * K), 80, 0.1f), H, K, mix == kFp8, wos);
        std::vector<Tensor> w;
        std::vector<std::vector<float>> stored(Ns.size());
        for (size_t i = 0; i < Ns.size(); ++i)
          w.push_back(weight_of(randn(size_t(Ns[i] * H), 81 + uint32_t(i), 0.2f), Ns[i], H,
                                mix == kFp8 && (i == 0 || i == 3), stored[i]));
        const std::vector<float> nv = randn(size_t(H), 86, 0.1f), ns = stored_as(nv, ndt);
        const Tensor norm = weight(nv, {H}, ndt);
        for (int64_t T : {1, 2, 5, 40}) {
          SCOPED_TRACE("K=" + std::to_string(K) + " H=" + std::to_string(H) + " norm " +
                       std::string(dtype_name(ndt)) + " mix=" + std::to_string(mix) + " T=" + std::to_string(T));
          const std::vector<float> ov = randn(size_t(T * K), 87 + uint32_t(T)), xv = randn(size_t(T * H), 88);
          std::vector<double> sum = reference_products(ov, wos, T, H, K).y, h(xv.size());
          for (int64_t t = 0; t < T; ++t) {
            double ss = 0;
            for (int64_t n = 0; n < H; ++n) {
              sum[size_t(t * H + n)] += xv[size_t(t * H + n)];
              ss += sum[size_t(t * H + n)] * sum[size_t(t * H + n)];
            }
            const double inv = 1.0 / std::sqrt(ss / double(H) + eps);
            for (int64_t n = 0; n < H; ++n) h[size_t(t * H + n)] = sum[size_t(t * H + n)] * inv * (1.0 + ns[size_t(n)]);
          }
          Tensor x = f32(xv, {T, H}), d = be().alloc({T, H}, DType::F32), hd = be().alloc({T, H}, DType::F32);
          const Tensor sums = be().alloc({T, ops().norm_parts(H)}, DType::F32);
          std::vector<Tensor> y;
          for (const int64_t N : Ns) y.push_back(be().alloc({T, N}, DType::F32));
          const PendingNorm n = ops().matmul_add_norm(f32(ov, {T, K}), w_out, d, AddNorm{x, norm, eps, hd, sums});
          ops().matmul_many_normed(n, hd, w, y);
          EXPECT_TRUE(all_near(floats(x), sum, 1e-5, 1e-5));
          EXPECT_TRUE(all_near(floats(hd), h, 1e-5, 1e-5));
          for (size_t i = 0; i < Ns.size(); ++i) {
            const ReferenceProducts want = reference_products(h, stored[i], T, Ns[i], H);
            EXPECT_TRUE(all_near(floats(y[i]), want.y, 1e-5 * std::max(want.scale, 1.0))) << "output " << i;
          }
        }
      }
  const int64_t T = 1, K = 16, H = 32;
  const Tensor o = f32(randn(size_t(T * K), 89), {T, K}), w_out = weight(randn(size_t(H * K), 90), {H, K}, DType::F32);
  const Tensor norm = f32(randn(size_t(H), 91, 0.1f), {H}), w1[] = {weight(randn(size_t(H * 3), 92), {3, H}, DType::F32)};
  Tensor x = f32(randn(size_t(T * H), 93), {T, H}), d = be().alloc({T, H}, DType::F32), h = be().alloc({T, H}, DType::F32);
  const Tensor sums = be().alloc({T, ops().norm_parts(H)}, DType::F32);
  test::expect_error([&] { ops().matmul_add_norm(o, w_out, x, AddNorm{x, norm, 1e-6f, h, sums}); },
                     {"matmul_add_norm", "overlap"});
  test::expect_error([&] { ops().matmul_add_norm(o, w_out, d, AddNorm{x, norm, 1e-6f, h, be().alloc({2, 1}, DType::F32)}); },
                     {"matmul_add_norm", "sums"});
  Tensor y1[] = {be().alloc({T, 3}, DType::F32)}, wrong[] = {be().alloc({T, 4}, DType::F32)};
  const PendingNorm n = ops().matmul_add_norm(o, w_out, d, AddNorm{x, norm, 1e-6f, h, sums});
  ops().matmul_many_normed(n, h, w1, y1);
  test::expect_error([&] { ops().matmul_many_normed(n, h, w1, wrong); }, {"matmul"});
}

TEST_P(OpConformance, AddCopyZero) {
  const std::vector<float> a = randn(50, 7), b = randn(50, 8);
  Tensor y = f32(a, {5, 10});
  ops().add(y, f32(b, {5, 10}));
  std::vector<float> sum(50);
  for (size_t i = 0; i < 50; ++i) sum[i] = a[i] + b[i];
  EXPECT_EQ(floats(y), sum);  // one fp32 add each: exact

  // copy moves bytes: any dtype, any shape of the same size.
  const std::vector<int32_t> ids{5, -1, 1 << 30, 7, 0, 3};
  Tensor dst = be().alloc({3, 2}, DType::I32);
  ops().copy(i32(ids), dst);
  EXPECT_EQ(ints(dst), ids);

  ops().zero(dst);
  EXPECT_EQ(ints(dst), std::vector<int32_t>(6, 0));
  ops().zero(y);
  EXPECT_EQ(floats(y), std::vector<float>(50, 0.0f));
  test::expect_error([&] { ops().copy(i32(ids), y); }, {"copy"});
}

TEST_P(OpConformance, ConcatSplitAndGates) {
  const int64_t T = 3, A = 4, B = 5;
  const std::vector<float> a = randn(size_t(T * A), 9), b = randn(size_t(T * B), 10);
  Tensor out = be().alloc({T, A + B}, DType::F32);
  ops().concat_cols(f32(a, {T, A}), f32(b, {T, B}), out);
  std::vector<float> want;
  for (int64_t t = 0; t < T; ++t) {
    want.insert(want.end(), a.begin() + t * A, a.begin() + (t + 1) * A);
    want.insert(want.end(), b.begin() + t * B, b.begin() + (t + 1) * B);
  }
  EXPECT_EQ(floats(out), want);

  // silu_mul (out aliasing gate), mul_sigmoid, scale_rows_sigmoid.
  const std::vector<float> g = randn(24, 12, 2.0f), u = randn(24, 13);
  Tensor gd = f32(g, {4, 6});
  ops().silu_mul(gd, f32(u, {4, 6}), gd);
  std::vector<double> w1(24), w2(24);
  for (size_t i = 0; i < 24; ++i) {
    w1[i] = silu_d(g[i]) * u[i];
    w2[i] = double(u[i]) * sigmoid_d(g[i]);
  }
  EXPECT_TRUE(all_near(floats(gd), w1, 1e-6, 1e-5)) << "silu_mul";
  Tensor ud = f32(u, {4, 6});
  ops().mul_sigmoid(ud, f32(g, {4, 6}));
  EXPECT_TRUE(all_near(floats(ud), w2, 1e-6, 1e-5)) << "mul_sigmoid";
  const std::vector<float> s = randn(4, 14, 2.0f);
  for (const int64_t D : {6, 4}) {  // rows of no whole float4s and of one
    const int64_t n = 4 * D;
    Tensor ys = f32(std::vector<float>(u.begin(), u.begin() + n), {4, D});
    ops().scale_rows_sigmoid(ys, f32(s, {4, 1}));
    std::vector<double> want(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) want[size_t(i)] = double(u[size_t(i)]) * sigmoid_d(s[size_t(i / D)]);
    EXPECT_TRUE(all_near(floats(ys), want, 1e-6, 1e-5)) << "scale_rows_sigmoid, D " << D;
  }
}

TEST_P(OpConformance, GatherAndScatterRows) {
  const int64_t M = 6, D = 5;
  const std::vector<float> x = randn(size_t(M * D), 15);
  // F32 rows, row_div 2 (rows name choices of k = 2 per token); rows < 0 (group_by's unsorted
  // tail) give zeros, whatever out held.
  const std::vector<int32_t> rows{11, 0, -1, 4, 5, 4, -1};
  Tensor out = f32(std::vector<float>(size_t(7 * D), 3.0f), {7, D});
  ops().gather_rows(f32(x, {M, D}), i32(rows), 2, out);
  std::vector<float> want;
  for (int32_t r : rows) {
    if (r < 0) want.insert(want.end(), size_t(D), 0.0f);
    else want.insert(want.end(), x.begin() + (r / 2) * D, x.begin() + (r / 2 + 1) * D);
  }
  EXPECT_EQ(floats(out), want);

  // Any dtype: I32 rows of 3, and BF16 rows (a row is x's first dimension).
  const std::vector<int32_t> xi{1, 2, 3, 4, 5, 6, 7, 8, 9};
  Tensor oi = be().alloc({2, 3}, DType::I32);
  ops().gather_rows(i32(xi, {3, 3}), i32({2, 0}), 1, oi);
  EXPECT_EQ(ints(oi), (std::vector<int32_t>{7, 8, 9, 1, 2, 3}));
  const std::vector<float> xb = randn(12, 16);
  Tensor ob = be().alloc({2, 2, 3}, DType::BF16);
  ops().gather_rows(be().to_device(host_tensor(xb, {2, 2, 3}, DType::BF16)), i32({1, 0}), 1, ob);
  std::vector<uint16_t> bb(12);
  be().download(ob, bb.data());
  for (size_t i = 0; i < 12; ++i) EXPECT_EQ(bb[i], f32_to_bf16(xb[(i + 6) % 12]));

  // scatter_rows: out[rows[i]] = x[i]; other rows untouched.
  Tensor so = f32(std::vector<float>(size_t(M * D), 9.0f), {M, D});
  ops().scatter_rows(f32(std::vector<float>(x.begin(), x.begin() + 3 * D), {3, D}), i32({4, 1, 2}), so);
  std::vector<float> sw(size_t(M * D), 9.0f);
  const int32_t dst[3] = {4, 1, 2};
  for (int i = 0; i < 3; ++i) std::copy(x.begin() + i * D, x.begin() + (i + 1) * D, sw.begin() + dst[i] * D);
  EXPECT_EQ(floats(so), sw);
}

// One head of qk_norm_rope in double: x[hd] normed (weights w of dtype wdt, zero-centred), then
// NeoX RoPE on the first rot dims at position pos, by the angle in fp32 (as the model's reference has it).
inline std::vector<double> reference_qk_head(const float* x, const std::vector<float>& w, DType wdt, int64_t hd,
                                             int rot, double theta, float eps, int32_t pos) {
  double ss = 0;
  for (int64_t i = 0; i < hd; ++i) ss += double(x[i]) * x[i];
  std::vector<double> y(static_cast<size_t>(hd));
  for (int64_t i = 0; i < hd; ++i) {
    const double wi = wdt == DType::BF16 ? double(bf16_to_f32(f32_to_bf16(w[size_t(i)]))) : double(w[size_t(i)]);
    y[size_t(i)] = double(x[i]) / std::sqrt(ss / double(hd) + eps) * (1.0 + wi);
  }
  for (int i = 0; i < rot / 2; ++i) {
    const double ang = double(float(pos) * float(1.0 / std::pow(theta, double(2 * i) / rot)));
    const double a = y[size_t(i)], b = y[size_t(i + rot / 2)];
    y[size_t(i)] = a * std::cos(ang) - b * std::sin(ang);
    y[size_t(i + rot / 2)] = b * std::cos(ang) + a * std::sin(ang);
  }
  return y;
}

TEST_P(OpConformance, QkNormRopeNormsRotatesAndSplitsEachHead) {
  // Heads of 8 dims rotating 6 (pairs that cross no warp-width boundary), 40 rotating 40 (pairs
  // across lanes) and the models' 256 rotating 64; bf16 and fp32 norm weights; positions past 0.
  const int64_t T = 4, Hq = 3, Hkv = 2;
  const double theta = 10000.0;
  const float eps = 1e-6f;
  const std::vector<int32_t> pos{0, 1, 17, 300};
  for (const auto& shape : {std::tuple{int64_t(8), 6, DType::F32}, std::tuple{int64_t(40), 40, DType::BF16},
                            std::tuple{int64_t(256), 64, DType::BF16}}) {
    const int64_t hd = std::get<0>(shape);  // (plain names: lambdas below capture them)
    const int rot = std::get<1>(shape);
    const DType wdt = std::get<2>(shape);
    const std::vector<float> qg = randn(size_t(T * Hq * 2 * hd), 17), kx = randn(size_t(T * Hkv * hd), 18);
    const std::vector<float> qw = randn(size_t(hd), 19, 0.5f), kw = randn(size_t(hd), 20, 0.5f);
    Tensor q = be().alloc({T, Hq, hd}, DType::F32), gate = be().alloc({T, Hq, hd}, DType::F32);
    Tensor k = f32(kx, {T, Hkv, hd});
    ops().qk_norm_rope(f32(qg, {T, Hq, 2 * hd}), weight(qw, {hd}, wdt), weight(kw, {hd}, wdt), eps, i32(pos), rot, theta,
                       q, gate, k);
    auto want_head = [&](const float* x, const std::vector<float>& w, int64_t t) {
      return reference_qk_head(x, w, wdt, hd, rot, theta, eps, pos[size_t(t)]);
    };
    std::vector<double> wq, wk;
    std::vector<float> wg;
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t h = 0; h < Hq; ++h) {
        const float* src = qg.data() + (t * Hq + h) * 2 * hd;
        const std::vector<double> y = want_head(src, qw, t);
        wq.insert(wq.end(), y.begin(), y.end());
        wg.insert(wg.end(), src + hd, src + 2 * hd);
      }
      for (int64_t h = 0; h < Hkv; ++h) {
        const std::vector<double> y = want_head(kx.data() + (t * Hkv + h) * hd, kw, t);
        wk.insert(wk.end(), y.begin(), y.end());
      }
    }
    EXPECT_TRUE(all_near(floats(q), wq, 1e-5, 1e-5)) << "q, hd " << hd;
    EXPECT_TRUE(all_near(floats(k), wk, 1e-5, 1e-5)) << "k, hd " << hd;
    EXPECT_EQ(floats(gate), wg) << "gate, hd " << hd;
  }
}

TEST_P(OpConformance, DeltaGatesAndGatedRmsNorm) {
  const int64_t T = 3, Hv = 4;
  const std::vector<float> b = randn(size_t(T * Hv), 18, 2.0f), a = randn(size_t(T * Hv), 19, 3.0f);
  std::vector<float> a_big = a;
  a_big[0] = 30.0f;  // softplus of a large input is the input
  const std::vector<float> A_log = randn(size_t(Hv), 20), dt = randn(size_t(Hv), 21);
  Tensor beta = be().alloc({T, Hv}, DType::F32), g = be().alloc({T, Hv}, DType::F32);
  ops().delta_gates(f32(b, {T, Hv}), f32(a_big, {T, Hv}), f32(A_log, {Hv}), f32(dt, {Hv}), beta, g);
  std::vector<double> wb(size_t(T * Hv)), wg(size_t(T * Hv));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < Hv; ++h) {
      const size_t i = size_t(t * Hv + h);
      wb[i] = sigmoid_d(b[i]);
      wg[i] = -std::exp(double(A_log[size_t(h)])) * std::log1p(std::exp(double(a_big[i]) + dt[size_t(h)]));
    }
  EXPECT_TRUE(all_near(floats(beta), wb, 1e-6, 1e-5));
  EXPECT_TRUE(all_near(floats(g), wg, 1e-6, 1e-5));

  const int64_t R = 5, dv = 16;
  const float eps = 1e-6f;
  const std::vector<float> x = randn(size_t(R * dv), 22), z = randn(size_t(R * dv), 23), w = randn(size_t(dv), 24);
  std::vector<double> want(x.size());
  for (int64_t r = 0; r < R; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < dv; ++i) ss += double(x[size_t(r * dv + i)]) * x[size_t(r * dv + i)];
    const double inv = 1.0 / std::sqrt(ss / dv + eps);
    for (int64_t i = 0; i < dv; ++i) {
      const size_t k = size_t(r * dv + i);
      want[k] = w[size_t(i)] * x[k] * inv * silu_d(z[k]);
    }
  }
  Tensor xd = f32(x, {R, dv});
  ops().gated_rms_norm(xd, f32(z, {R, dv}), f32(w, {dv}), eps, xd);  // y aliasing x
  EXPECT_TRUE(all_near(floats(xd), want, 1e-6, 1e-5));
}

// ============================================================================================
// Attention over paged caches
// ============================================================================================

// Causal softmax attention of one query row (hd floats at q) over a sequence's rows [0, len) of
// keys and values (rows of `row` floats, the head's hd at offset `at`), in double, into out[hd];
// pv_abs (if given): sum_s p_s |v_s| / sum_s p_s of each element, the scale of an error in the p_s.
inline void reference_attention_row(const float* q, const std::vector<float>& keys, const std::vector<float>& values,
                                    int64_t len, int64_t row, int64_t at, int64_t hd, double* out,
                                    double* pv_abs = nullptr) {
  std::vector<double> sc(static_cast<size_t>(len));
  double mx = -INFINITY;
  for (int64_t s = 0; s < len; ++s) {
    double d = 0;
    for (int64_t j = 0; j < hd; ++j) d += double(q[j]) * keys[size_t(s * row + at + j)];
    sc[size_t(s)] = d / std::sqrt(double(hd));
    mx = std::max(mx, sc[size_t(s)]);
  }
  double sum = 0;
  for (auto& e : sc) sum += (e = std::exp(e - mx));
  for (int64_t j = 0; j < hd; ++j) {
    double o = 0, a = 0;
    for (int64_t s = 0; s < len; ++s) {
      const double v = values[size_t(s * row + at + j)];
      o += sc[size_t(s)] * v;
      a += sc[size_t(s)] * std::abs(v);
    }
    out[j] = o / sum;
    if (pv_abs) pv_abs[j] = a / sum;
  }
}

// Sequences' rows in paged caches, for the attention tests: block tables of W entries (the last a
// spare -1) drawn from a shuffled pool of blocks (a sequence's blocks neither contiguous nor
// ordered), the host's copy of the caches (garbage where no row is: a backend must not read it) and
// each sequence's rows in order. Seeds: garbage `seed` and seed + 1, sequence b's prior rows seed +
// 10 + b (K) and seed + 20 + b (V, times v_scale).
struct PagedCaches {
  int64_t bs, row, W, blocks;
  std::vector<int32_t> tables;
  std::vector<float> kc, vc;
  std::vector<std::vector<float>> keys, values;

  PagedCaches(const std::vector<int>& prior, int max_len, int64_t bs_, int64_t row_, uint32_t shuffle_seed,
              uint32_t seed, float v_scale = 1.0f)
      : bs(bs_), row(row_), W((max_len + bs_ - 1) / bs_ + 1), blocks(int64_t(prior.size()) * W + 5) {
    const int B = int(prior.size());
    std::vector<int32_t> pool_ids(static_cast<size_t>(blocks));
    std::iota(pool_ids.begin(), pool_ids.end(), 0);
    std::shuffle(pool_ids.begin(), pool_ids.end(), std::mt19937(shuffle_seed));
    tables.assign(size_t(B * W), -1);
    for (int b = 0; b < B; ++b)
      for (int64_t j = 0; j + 1 < W; ++j) tables[size_t(b * W + j)] = pool_ids[size_t(b * (W - 1) + j)];
    kc = randn(size_t(blocks * bs * row), seed, 100.0f);
    vc = randn(kc.size(), seed + 1, 100.0f);
    keys.resize(size_t(B));
    values.resize(size_t(B));
    for (int b = 0; b < B; ++b) {
      const std::vector<float> k = randn(size_t(prior[size_t(b)] * row), seed + 10 + uint32_t(b));
      const std::vector<float> v = randn(size_t(prior[size_t(b)] * row), seed + 20 + uint32_t(b), v_scale);
      for (int r = 0; r < prior[size_t(b)]; ++r) append(b, k.data() + r * row, v.data() + r * row);
    }
  }
  // The row of the flat caches holding sequence b's row r.
  int64_t cache_row(int b, int r) const { return int64_t(tables[size_t(b * W + r / bs)]) * bs + r % bs; }
  int rows(int b) const { return int(keys[size_t(b)].size() / size_t(row)); }
  // A pass of n[b] new rows a sequence after the rows it holds: their slots, kv_lens, the tables
  // (the rows themselves go in with append()).
  HostLayout pass(const std::vector<int>& n) const {
    HostLayout h;
    h.block_size = int(bs);
    h.width = int(W);
    h.block_tables = tables;
    for (size_t b = 0; b < n.size(); ++b) {
      for (int i = 0; i < n[b]; ++i) h.slot_mapping.push_back(int32_t(cache_row(int(b), rows(int(b)) + i)));
      h.cu.push_back(h.cu.back() + n[b]);
      h.kv_lens.push_back(rows(int(b)) + n[b]);
    }
    return h;
  }
  // K and V rows (row elements each) after sequence b's rows, in the host's caches too.
  void append(int b, const float* k, const float* v) {
    const int64_t at = cache_row(b, rows(b)) * row;
    keys[size_t(b)].insert(keys[size_t(b)].end(), k, k + row);
    values[size_t(b)].insert(values[size_t(b)].end(), v, v + row);
    std::copy_n(k, row, kc.begin() + at);
    std::copy_n(v, row, vc.begin() + at);
  }
};

struct AttentionCase {
  int64_t Hq, Hkv, hd;
  int block_size;
  int grow = 1;  // the sequences' lengths times this (CUDA: 8 makes prefill tiles of 128 rows, and two of them)
};

TEST_P(OpConformance, PagedAttentionMatchesDenseCausalSoftmax) {
  // Head dims of 64, 128 and 256 take CUDA's tensor-core prefill kernel, the others its tiled one.
  for (const AttentionCase ac : {AttentionCase{4, 2, 16, 4}, AttentionCase{3, 3, 8, 16}, AttentionCase{6, 1, 16, 16},
                                 AttentionCase{2, 2, 8, 4}, AttentionCase{4, 1, 256, 16, 8},
                                 AttentionCase{2, 2, 64, 16, 8}, AttentionCase{2, 1, 128, 4, 3}}) {
    SCOPED_TRACE("Hq=" + std::to_string(ac.Hq) + " Hkv=" + std::to_string(ac.Hkv) + " hd=" + std::to_string(ac.hd) +
                 " block_size=" + std::to_string(ac.block_size) + " grow=" + std::to_string(ac.grow));
    const int64_t Hq = ac.Hq, Hkv = ac.Hkv, hd = ac.hd, bs = ac.block_size;
    const int64_t row = Hkv * hd;
    // Four sequences; each pass appends `new_rows` to what a sequence holds. Pass 0 starts some
    // sequences with rows already cached (prefix), pass 1 is decode (and one 3-row verify).
    const int k = ac.grow;
    const std::vector<int> prior{0, 12 * k, 3 * k, 30 * k};
    const std::vector<std::vector<int>> passes{{5 * k, 1, 17 * k, 9 * k}, {1, 3, 1, 1}};
    const int B = 4;
    PagedCaches pc(prior, 41 * k, bs, row, uint32_t(bs * 7 + Hq), 30);
    Tensor k_cache = f32(pc.kc, {pc.blocks, bs, Hkv, hd}), v_cache = f32(pc.vc, {pc.blocks, bs, Hkv, hd});
    for (size_t p = 0; p < passes.size(); ++p) {
      const HostLayout h = pc.pass(passes[p]);
      std::vector<float> k_new, v_new;
      for (int b = 0; b < B; ++b) {
        const int n = passes[p][size_t(b)];
        const std::vector<float> kn = randn(size_t(n * row), uint32_t(100 + p * 10 + b));
        const std::vector<float> vn = randn(size_t(n * row), uint32_t(200 + p * 10 + b));
        k_new.insert(k_new.end(), kn.begin(), kn.end());
        v_new.insert(v_new.end(), vn.begin(), vn.end());
        for (int i = 0; i < n; ++i) pc.append(b, kn.data() + i * row, vn.data() + i * row);
      }
      const int64_t T = h.cu.back();
      const std::vector<float> q = randn(size_t(T * Hq * hd), uint32_t(300 + p));
      Tensor out = be().alloc({T, Hq, hd}, DType::F32);
      ops().attention(f32(q, {T, Hq, hd}), f32(k_new, {T, Hkv, hd}), f32(v_new, {T, Hkv, hd}), k_cache, v_cache,
                      layout(h), out);
      // Dense reference over each row's causal reach.
      std::vector<double> want(size_t(T * Hq * hd));
      h.each_new_row([&](int b, int64_t t, int64_t len) {
        for (int64_t hq = 0; hq < Hq; ++hq)
          reference_attention_row(q.data() + (t * Hq + hq) * hd, pc.keys[size_t(b)], pc.values[size_t(b)], len, row,
                                  hq / (Hq / Hkv) * hd, hd, want.data() + (t * Hq + hq) * hd);
      });
      EXPECT_TRUE(all_near(floats(out), want, 2e-5, 1e-4)) << "pass " << p;
      // The new rows landed at slot_mapping; nothing else in the caches changed.
      EXPECT_EQ(floats(k_cache), pc.kc) << "pass " << p;
      EXPECT_EQ(floats(v_cache), pc.vc) << "pass " << p;
      // The tables as rows of a larger one (table_rows): the same outputs, bit for bit (the new
      // rows written again where they are).
      Tensor by_rows = be().alloc({T, Hq, hd}, DType::F32);
      ops().attention(f32(q, {T, Hq, hd}), f32(k_new, {T, Hkv, hd}), f32(v_new, {T, Hkv, hd}), k_cache, v_cache,
                      with_table_rows(h), by_rows);
      EXPECT_EQ(floats(by_rows), floats(out)) << "pass " << p << " through table_rows";
      EXPECT_EQ(floats(k_cache), pc.kc) << "pass " << p;
    }
  }
}

// Gated attention from its projections against its parts' double references: the heads normed and
// rotated (reference_qk_head), causal softmax attention over the paged caches whose new rows hold K
// so normed and rotated, times sigmoid(gate). Four sequences through a pass of prefills and decode
// (the three ops on CUDA) and a decode pass (one row a sequence: CUDA's fused rows kernel, its rows
// split), then a decode pass of 136 sequences (CUDA: rows x heads fill the GPU, no splits); q heads
// per KV head 4, 3 and 2; heads of 256 rotating 64 (the models'), 40 rotating 40 and 8 rotating 6.
TEST_P(OpConformance, GatedAttentionNormsRotatesAttendsAndGates) {
  struct Case {
    int64_t Hq, Hkv, hd;
    int rot;
    DType wdt;
  };
  const double theta = 1e7;
  const float eps = 1e-6f;
  const int bs = 16;
  for (const Case c : {Case{8, 2, 256, 64, DType::BF16}, Case{6, 2, 40, 40, DType::F32}, Case{4, 2, 8, 6, DType::BF16}}) {
    const int64_t Hq = c.Hq, Hkv = c.Hkv, hd = c.hd, row = Hkv * hd;
    const std::vector<float> qw = randn(size_t(hd), 60, 0.5f), kw = randn(size_t(hd), 61, 0.5f);
    const QkNormRope r0{weight(qw, {hd}, c.wdt), weight(kw, {hd}, c.wdt), eps, Tensor(), c.rot, theta};
    const auto run = [&](const std::vector<int>& prior, const std::vector<std::vector<int>>& passes) {
      const int B = int(prior.size());
      int max_len = 0;
      for (int b = 0; b < B; ++b) {
        int len = prior[size_t(b)];
        for (const auto& p : passes) len += p[size_t(b)];
        max_len = std::max(max_len, len);
      }
      PagedCaches pc(prior, max_len, bs, row, uint32_t(B + hd), 70, 2.0f);
      Tensor k_cache = f32(pc.kc, {pc.blocks, bs, Hkv, hd}), v_cache = f32(pc.vc, {pc.blocks, bs, Hkv, hd});
      std::vector<size_t> new_slots;  // every pass's so far
      for (size_t p = 0; p < passes.size(); ++p) {
        SCOPED_TRACE("hd=" + std::to_string(hd) + " B=" + std::to_string(B) + " pass " + std::to_string(p));
        const HostLayout h = pc.pass(passes[p]);
        std::vector<int32_t> pos;
        for (int b = 0; b < B; ++b)
          for (int i = 0; i < passes[p][size_t(b)]; ++i) pos.push_back(pc.rows(b) + i);
        const int64_t T = h.cu.back();
        const std::vector<float> qg = randn(size_t(T * Hq * 2 * hd), uint32_t(400 + p + B));
        const std::vector<float> k_raw = randn(size_t(T * row), uint32_t(500 + p + B));
        const std::vector<float> v_new = randn(size_t(T * row), uint32_t(600 + p + B), 2.0f);
        // The new rows' K as the reference norms and rotates it, appended to each sequence's rows.
        for (int b = 0; b < B; ++b)
          for (int64_t t = h.cu[size_t(b)]; t < h.cu[size_t(b) + 1]; ++t) {
            std::vector<float> kr;
            for (int64_t kh = 0; kh < Hkv; ++kh)
              for (const double e : reference_qk_head(k_raw.data() + (t * Hkv + kh) * hd, kw, c.wdt, hd, c.rot, theta,
                                                      eps, pos[size_t(t)]))
                kr.push_back(float(e));
            pc.append(b, kr.data(), v_new.data() + t * row);
            new_slots.push_back(size_t(h.slot_mapping[size_t(t)]));
          }
        Tensor q = be().alloc({T, Hq, hd}, DType::F32), gate = be().alloc({T, Hq, hd}, DType::F32);
        Tensor k = f32(k_raw, {T, Hkv, hd}), out = be().alloc({T, Hq, hd}, DType::F32);
        QkNormRope r = r0;
        r.positions = i32(pos);
        ops().gated_attention(f32(qg, {T, Hq, 2 * hd}), r, q, gate, k, f32(v_new, {T, Hkv, hd}), k_cache, v_cache,
                              layout(h), out);
        std::vector<double> want(size_t(T * Hq * hd));
        h.each_new_row([&](int b, int64_t t, int64_t len) {
          for (int64_t hq = 0; hq < Hq; ++hq) {
            const float* src = qg.data() + (t * Hq + hq) * 2 * hd;
            const std::vector<double> qd = reference_qk_head(src, qw, c.wdt, hd, c.rot, theta, eps, pos[size_t(t)]);
            const std::vector<float> qf(qd.begin(), qd.end());
            double* o = want.data() + (t * Hq + hq) * hd;
            reference_attention_row(qf.data(), pc.keys[size_t(b)], pc.values[size_t(b)], len, row, hq / (Hq / Hkv) * hd,
                                    hd, o);
            for (int64_t e = 0; e < hd; ++e) o[e] /= 1.0 + std::exp(-double(src[hd + e]));
          }
        });
        EXPECT_TRUE(all_near(floats(out), want, 2e-5, 1e-4));
        // The new rows' K (within the norm's rounding) and V at their slots; nothing else changed.
        std::vector<float> got_k = floats(k_cache);
        for (const size_t slot : new_slots) {
          const std::vector<float> g(got_k.begin() + int64_t(slot) * row, got_k.begin() + int64_t(slot + 1) * row),
              w(pc.kc.begin() + int64_t(slot) * row, pc.kc.begin() + int64_t(slot + 1) * row);
          EXPECT_TRUE(all_near(g, w, 1e-5, 1e-5)) << "K at slot " << slot;
          std::copy(w.begin(), w.end(), got_k.begin() + int64_t(slot) * row);
        }
        EXPECT_EQ(got_k, pc.kc);
        EXPECT_EQ(floats(v_cache), pc.vc);
        // The tables as rows of a larger one (table_rows): the same outputs, bit for bit.
        Tensor q2 = be().alloc({T, Hq, hd}, DType::F32), gate2 = be().alloc({T, Hq, hd}, DType::F32);
        Tensor k2 = f32(k_raw, {T, Hkv, hd}), by_rows = be().alloc({T, Hq, hd}, DType::F32);
        ops().gated_attention(f32(qg, {T, Hq, 2 * hd}), r, q2, gate2, k2, f32(v_new, {T, Hkv, hd}), k_cache, v_cache,
                              with_table_rows(h), by_rows);
        EXPECT_EQ(floats(by_rows), floats(out)) << "through table_rows";
      }
    };
    run({0, 12, 3, 300}, {{5, 1, 17, 1}, {1, 1, 1, 1}});
    std::vector<int> many(136);
    for (size_t b = 0; b < many.size(); ++b) many[b] = int(b % 9);
    run(many, {std::vector<int>(many.size(), 1)});
  }
}

// The caches' dtype: F32 or BF16 and both alike (op_checks), and BF16 only on a backend that keeps
// its caches so (Backend::kv_cache_dtype: the CPU and fp32 products keep F32); each a clear error.
TEST_P(OpConformance, AttentionCachesOfAnotherDtypeAreClearErrors) {
  const int64_t hd = 8;
  HostLayout h;
  h.block_size = 4;
  h.width = 1;
  h.block_tables = {0};
  h.cu = {0, 1};
  h.kv_lens = {1};
  h.slot_mapping = {0};
  const Tensor q = f32(randn(size_t(hd), 1), {1, 1, hd}), k = f32(randn(size_t(hd), 2), {1, 1, hd}),
               v = f32(randn(size_t(hd), 3), {1, 1, hd});
  Tensor out = be().alloc({1, 1, hd}, DType::F32);
  Tensor f32_cache = be().alloc({1, 4, 1, hd}, DType::F32), bf16_cache = be().alloc({1, 4, 1, hd}, DType::BF16),
         i32_cache = be().alloc({1, 4, 1, hd}, DType::I32);
  test::expect_error([&] { ops().attention(q, k, v, f32_cache, bf16_cache, layout(h), out); },
                     {"attention", "F32", "BF16", "expected F32 or BF16, both alike"});
  test::expect_error([&] { ops().attention(q, k, v, i32_cache, i32_cache, layout(h), out); },
                     {"attention", "I32", "expected F32 or BF16"});
  Tensor k2 = be().alloc({1, 4, 1, hd}, DType::BF16);
  if (be().kv_cache_dtype() == DType::F32)
    test::expect_error([&] { ops().attention(q, k, v, k2, bf16_cache, layout(h), out); }, {"attention", "F32"});
  Tensor k3 = be().alloc({1, 4, 1, hd}, be().kv_cache_dtype()), v3 = be().alloc({1, 4, 1, hd}, be().kv_cache_dtype());
  ops().attention(q, k, v, k3, v3, layout(h), out);  // the backend's own caches serve
  const std::vector<float> got = floats(out), vv = randn(size_t(hd), 3);
  for (int64_t j = 0; j < hd; ++j)  // one row attends to itself: its V (rounded in a bf16 cache)
    EXPECT_NEAR(got[size_t(j)], vv[size_t(j)], 1e-2 * std::abs(vv[size_t(j)]) + 1e-6);
}

// ============================================================================================
// Gated DeltaNet over state pools
// ============================================================================================

// The reference: the single-sequence cpu:: kernels (conv, and the recurrent form of the delta
// rule), one sequence at a time, on host copies of the pools. snapshots: per sequence, the
// snapshot slots of a verifying sequence (empty: not verifying).
struct DeltaNetReference {
  std::vector<float> conv_out, rule_out, conv_states, rule_states;
};

inline DeltaNetReference deltanet_reference(const DeltaNetCase& c, const HostLayout& h, const std::vector<float>& x,
                                            const std::vector<float>& weight, const std::vector<float>& qkv,
                                            const std::vector<float>& g, const std::vector<float>& beta,
                                            std::vector<float> conv_states, std::vector<float> rule_states) {
  const int64_t C = c.C(), T = h.cu.back(), kd = int64_t(c.d.Hk) * c.d.dk, vd = int64_t(c.d.Hv) * c.d.dv;
  DeltaNetReference r;
  r.conv_out.assign(size_t(T * C), 0.0f);
  r.rule_out.assign(size_t(T * vd), 0.0f);
  for (int b = 0; b < h.num_seqs(); ++b) {
    const int64_t t0 = h.cu[size_t(b)], n = h.cu[size_t(b) + 1] - t0;
    const bool verifying = h.verifying(b);
    // Row by row when verifying (each state kept in its snapshot), else all rows at once.
    const int64_t step = verifying ? 1 : std::max<int64_t>(n, 1);
    int32_t from = h.state_slots[size_t(b)];
    for (int64_t i = 0; i < n; i += step) {
      const int32_t to = verifying ? h.snapshot_slots[size_t(b * h.snapshot_width + i)] : from;
      if (to != from) {
        std::copy_n(conv_states.begin() + from * c.conv_state(), c.conv_state(),
                    conv_states.begin() + to * c.conv_state());
        std::copy_n(rule_states.begin() + from * c.rule_state(), c.rule_state(),
                    rule_states.begin() + to * c.rule_state());
      }
      cpu::causal_conv1d_silu(x.data() + (t0 + i) * C, C, int(step), int(C), weight.data(), c.kc,
                              conv_states.data() + to * c.conv_state(), r.conv_out.data() + (t0 + i) * C, C, nullptr);
      const cpu::DeltaRuleShape s{int(step), c.d.Hk, c.d.Hv, c.d.dk, c.d.dv};
      const float* q = qkv.data() + (t0 + i) * C;
      cpu::gated_delta_rule_recurrent(s, q, C, q + kd, C, q + 2 * kd, C, g.data() + (t0 + i) * c.d.Hv,
                                      beta.data() + (t0 + i) * c.d.Hv, rule_states.data() + to * c.rule_state(),
                                      r.rule_out.data() + (t0 + i) * vd, vd, nullptr);
      from = to;
    }
  }
  r.conv_states = std::move(conv_states);
  r.rule_states = std::move(rule_states);
  return r;
}

// Runs both ops on `h` (the delta rule's qkv is its own input, not the conv's output, so that
// each op is checked alone) and compares outputs and every slot of both pools.
inline void OpConformance::check_deltanet_pass(const DeltaNetCase& c, const HostLayout& h, int64_t slots,
                                               uint32_t seed, double rule_tol) {
  const int64_t C = c.C(), T = h.cu.back(), vd = int64_t(c.d.Hv) * c.d.dv, Hv = c.d.Hv;
  const std::vector<float> x = randn(size_t(T * C), seed), weight = randn(size_t(C * c.kc), seed + 1, 0.5f);
  const std::vector<float> qkv = stored_as(randn(size_t(T * C), seed + 2), c.rows);  // the reference's too
  const std::vector<float> g = uniform_floats(size_t(T * Hv), seed + 3, -2.0f, -0.01f);
  const std::vector<float> beta = uniform_floats(size_t(T * Hv), seed + 4, 0.05f, 0.95f);
  const std::vector<float> cs0 = randn(size_t(slots * c.conv_state()), seed + 5);
  const std::vector<float> rs0 = randn(size_t(slots * c.rule_state()), seed + 6, 0.1f);
  const DeltaNetReference want = deltanet_reference(c, h, x, weight, qkv, g, beta, cs0, rs0);

  const SeqLayout sl = layout(h);
  Tensor conv_states = f32(cs0, {slots, C, c.kc - 1});
  Tensor rule_states = f32(rs0, {slots, Hv, c.d.dk, c.d.dv});
  Tensor conv_out = be().alloc({T, C}, c.rows), rule_out = be().alloc({T, Hv, c.d.dv}, DType::F32);
  Tensor rows = f32(qkv, {T, C});
  if (c.rows == DType::BF16) {
    std::vector<uint16_t> q16(qkv.size());
    for (size_t i = 0; i < qkv.size(); ++i) q16[i] = f32_to_bf16(qkv[i]);
    rows = upload(q16, {T, C}, DType::BF16);
  }
  ops().causal_conv1d_silu(f32(x, {T, C}), f32(weight, {C, c.kc}), conv_states, sl, conv_out);
  ops().gated_delta_rule(rows, f32(g, {T, Hv}), f32(beta, {T, Hv}), c.d, rule_states, sl, rule_out);
  // Conv: a sum of kc products, then SiLU; its states are copies of inputs (exact). In bf16 the
  // sum rounded once: within one bf16 step (2^-7 relative) of the reference's fp32 rounded.
  if (c.rows == DType::BF16) {
    std::vector<uint16_t> o16(size_t(T * C));
    be().download(conv_out, o16.data());
    std::vector<float> got(o16.size());
    for (size_t i = 0; i < o16.size(); ++i) got[i] = bf16_to_f32(o16[i]);
    EXPECT_TRUE(all_near(got, stored_as(want.conv_out, DType::BF16), 1e-5, 1.0 / 128)) << "conv out (bf16)";
  } else {
    EXPECT_TRUE(all_near(floats(conv_out), want.conv_out, 1e-5, 1e-5)) << "conv out";
  }
  EXPECT_EQ(floats(conv_states), want.conv_states) << "conv states (every slot)";
  // Delta rule: per sequence, relative L2 error (the chunked and recurrent forms agree to ~1e-6).
  const std::vector<float> got_out = floats(rule_out), got_states = floats(rule_states);
  for (int b = 0; b < h.num_seqs(); ++b) {
    const size_t r0 = size_t(h.cu[size_t(b)] * vd), r1 = size_t(h.cu[size_t(b) + 1] * vd);
    const double e = rel_l2(std::vector<float>(got_out.begin() + r0, got_out.begin() + r1),
                            std::vector<float>(want.rule_out.begin() + r0, want.rule_out.begin() + r1));
    EXPECT_LT(e, rule_tol) << "delta rule out of sequence " << b;
    if (rule_tol > 1e-5) std::printf("delta rule out of sequence %d: rel. L2 %.3g\n", b, e);
  }
  for (int64_t s = 0; s < slots; ++s) {
    const auto at = [&](const std::vector<float>& v) {
      return std::vector<float>(v.begin() + s * c.rule_state(), v.begin() + (s + 1) * c.rule_state());
    };
    const std::vector<float> ref = at(want.rule_states), got = at(got_states);
    if (ref == at(rs0))
      EXPECT_EQ(got, ref) << "slot " << s << " must be left as it was";
    else
      EXPECT_LT(rel_l2(got, ref), rule_tol) << "delta rule state of slot " << s;
  }
}

TEST_P(OpConformance, DeltaNetOverStatePoolsWithMixedSequences) {
  const DeltaNetCase c;
  // Sequences of 1 row (decode) and more than 64 (several chunks of the chunked form), in slots
  // scattered over a pool with unused slots.
  HostLayout h;
  const std::vector<int> rows{1, 70, 3, 1, 130, 2, 1};
  h.state_slots = {7, 2, 9, 0, 5, 3, 10};
  for (int n : rows) h.cu.push_back(h.cu.back() + n);
  check_deltanet_pass(c, h, 12, 60);
}

TEST_P(OpConformance, DeltaNetAtQwenHeadDimsWithManyChunks) { check_deltanet_at_qwen_head_dims(); }

// Qwen3-Next-80B's heads (16 key, 32 value heads of 128) and prefills beside a decode row: CUDA's
// state kernel takes the narrowest slices whose blocks fit on the SMs at once, so on an H200 (132
// SMs, one block an SM with fp32 products) three prefills take 128 columns a block (3 x 32 x 4
// blocks of 32 are more than the SMs) and two take 64 (2 x 32 x 2 blocks).
TEST_P(OpConformance, DeltaNetPrefillsOverMoreStateBlocksThanSms) {
  DeltaNetCase c;
  c.d = DeltaRuleDims{16, 32, 128, 128};
  for (const std::vector<int>& rows : {std::vector<int>{130, 1, 64, 75}, std::vector<int>{1, 200, 65}}) {
    SCOPED_TRACE(testing::Message() << rows.size() << " sequences");
    HostLayout h;
    h.state_slots = {2, 0, 3, 1};
    h.state_slots.resize(rows.size());
    for (int n : rows) h.cu.push_back(h.cu.back() + n);
    check_deltanet_pass(c, h, 5, 90);
  }
}

// Head dims whose rows are no whole float4s (dv = 10: CUDA's chunk solve loads its rows without
// cp.async) and a key dim that is no multiple of 8 (padded for the tensor cores).
TEST_P(OpConformance, DeltaNetWithRowsOfNoWholeFloat4s) {
  DeltaNetCase c;
  c.d = DeltaRuleDims{2, 4, 12, 10};
  HostLayout h;
  const std::vector<int> rows{70, 1, 9};
  h.state_slots = {1, 3, 0};
  for (int n : rows) h.cu.push_back(h.cu.back() + n);
  check_deltanet_pass(c, h, 4, 95);
}

// The conv's rows in bf16 (what the model gives a backend whose delta_rule_rows_dtype is BF16): the
// conv's out rounded once, the delta rule reading them as they are (the reference takes the same
// rounded rows), beside decode rows and verifying ones, at Qwen's head dims and at dims whose bf16
// rows are no whole 8-byte pieces (dv = 10).
TEST_P(OpConformance, DeltaNetWithBf16Rows) {
  DeltaNetCase c;
  c.rows = DType::BF16;
  HostLayout h;
  h.state_slots = {7, 2, 9, 0, 5};
  h.snapshot_width = 3;
  h.snapshot_slots = {-1, -1, -1, -1, -1, -1, 10, 11, 12, -1, -1, -1, -1, -1, -1};
  for (int n : {1, 70, 3, 130, 2}) h.cu.push_back(h.cu.back() + n);
  check_deltanet_pass(c, h, 13, 61);
  c.d = DeltaRuleDims{2, 4, 12, 10};
  check_deltanet_pass(c, h, 13, 62);
  check_deltanet_at_qwen_head_dims(1e-5, DType::BF16);
}

TEST_P(OpConformance, DeltaNetSnapshotModeKeepsEveryRowsState) {
  const DeltaNetCase c;
  // Sequence 0 verifies 4 rows, 2 is a plain decode row, 1 verifies 1 row, 3 a plain 3-row pass.
  HostLayout h;
  const std::vector<int> rows{4, 1, 1, 3};
  h.state_slots = {3, 7, 5, 0};
  h.snapshot_width = 4;
  h.snapshot_slots = {10, 11, 12, 13,  //
                      14, -1, -1, -1,  //
                      -1, -1, -1, -1,  //
                      -1, 8, 9, 15};   // entry [b][0] < 0: not verifying, the rest is ignored
  for (int n : rows) h.cu.push_back(h.cu.back() + n);
  check_deltanet_pass(c, h, 16, 70);
  // The own slots of the verifying sequences stay as they were: the reference leaves them, and
  // check_deltanet_pass holds every unchanged slot to equality.
}

// ============================================================================================
// Mixture of experts
// ============================================================================================

TEST_P(OpConformance, TopkSoftmaxWithTiesAndNormalisation) {
  const int64_t T = 6, E = 10;
  // Logits on a grid of 0.25: values tie exactly or differ clearly.
  std::mt19937 rng(80);
  std::uniform_int_distribution<int> grid(-8, 8);
  std::vector<float> logits(size_t(T * E));
  for (auto& l : logits) l = float(grid(rng)) * 0.25f;
  // A row's experts by logit, larger first, the lower id first among equals (the op's order).
  auto ranked = [](const float* l, int64_t n) {
    std::vector<int32_t> order(static_cast<size_t>(n));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return l[a] > l[b]; });
    return order;
  };
  for (int64_t e = 0; e < E; ++e) logits[size_t(e)] = 1.0f;                  // row 0: all tied
  for (int64_t e = 0; e < E; ++e) logits[size_t(E + e)] = e % 3 ? 0.5f : 2.0f;  // row 1: ties among leaders
  for (int k : {1, 3, 10})
    for (bool normalize : {false, true}) {
      Tensor ids = be().alloc({T, k}, DType::I32), w = be().alloc({T, k}, DType::F32);
      ops().topk_softmax(f32(logits, {T, E}), k, normalize, Tensor(), ids, w);
      std::vector<int32_t> want_ids;
      std::vector<double> want_w;
      for (int64_t t = 0; t < T; ++t) {
        const float* l = logits.data() + t * E;
        const std::vector<int32_t> order = ranked(l, E);
        double mx = *std::max_element(l, l + E), sum = 0, ksum = 0;
        for (int64_t e = 0; e < E; ++e) sum += std::exp(double(l[e]) - mx);
        for (int j = 0; j < k; ++j) ksum += std::exp(double(l[order[size_t(j)]]) - mx) / sum;
        for (int j = 0; j < k; ++j) {
          const double p = std::exp(double(l[order[size_t(j)]]) - mx) / sum;
          want_ids.push_back(order[size_t(j)]);
          want_w.push_back(normalize ? p / ksum : p);
        }
      }
      EXPECT_EQ(ints(ids), want_ids) << "k=" << k << " normalize=" << normalize;
      EXPECT_TRUE(all_near(floats(w), want_w, 1e-6, 1e-5)) << "k=" << k << " normalize=" << normalize;

      // The rows routed says are not routed (a graph's padding) get no expert; the others as before.
      const std::vector<int32_t> routed{1, 0, 1, 1, 0, 0};
      Tensor rids = be().alloc({T, k}, DType::I32), rw = be().alloc({T, k}, DType::F32);
      ops().topk_softmax(f32(logits, {T, E}), k, normalize, i32(routed), rids, rw);
      for (int64_t t = 0; t < T; ++t)
        for (int j = 0; j < k; ++j) {
          const size_t i = size_t(t * k + j);
          if (!routed[size_t(t)]) want_ids[i] = -1, want_w[i] = 0.0;
        }
      EXPECT_EQ(ints(rids), want_ids) << "routed, k=" << k << " normalize=" << normalize;
      EXPECT_TRUE(all_near(floats(rw), want_w, 1e-6, 1e-5)) << "routed, k=" << k << " normalize=" << normalize;
      for (float v : floats(rw)) EXPECT_FALSE(std::signbit(v)) << "routed: weights of no expert are +0";
    }

  // The models' 512 experts and a backend's widest rows (1,000: a lane holds ~32), on a coarse grid
  // so that many tie, also experts that lanes hold apart (the lower id wins across lanes too); few
  // rows (decode) and many (a prefill: CUDA ranks them another way).
  for (const int64_t Tw : {int64_t(3), int64_t(300)})
    for (const int64_t Ew : {int64_t(512), int64_t(1000)})
      for (int k : {10, 32}) {
        std::uniform_int_distribution<int> coarse(-3, 3);
        std::vector<float> lw(size_t(Tw * Ew));
        for (auto& l : lw) l = float(coarse(rng)) * 0.5f;
        Tensor ids = be().alloc({Tw, k}, DType::I32), w = be().alloc({Tw, k}, DType::F32);
        ops().topk_softmax(f32(lw, {Tw, Ew}), k, true, Tensor(), ids, w);
        std::vector<int32_t> want;
        for (int64_t t = 0; t < Tw; ++t) {
          const std::vector<int32_t> order = ranked(lw.data() + t * Ew, Ew);
          want.insert(want.end(), order.begin(), order.begin() + k);
        }
        EXPECT_EQ(ints(ids), want) << "T=" << Tw << " E=" << Ew << " k=" << k;
        const std::vector<float> wv = floats(w);
        for (int64_t t = 0; t < Tw; ++t)
          EXPECT_NEAR(std::accumulate(wv.begin() + t * k, wv.begin() + (t + 1) * k, 0.0), 1.0, 1e-5) << "E=" << Ew;
      }
}

TEST_P(OpConformance, DispatchStaticRandomAndBalanced) {
  const Placement pl;
  const auto rep = eplb::replicas_of(pl.row, pl.E);
  // Every rank's routed choices: skewed towards experts 0 and 3, which have replicas.
  std::vector<std::vector<int32_t>> ids(size_t(pl.G));
  std::vector<int32_t> counts(size_t(pl.G * pl.E), 0);
  std::mt19937 rng(90);
  std::discrete_distribution<int> pick({30, 5, 4, 20, 3, 6, 2, 5});
  for (int g = 0; g < pl.G; ++g) {
    for (int i = 0; i < 40 + 13 * g; ++i) ids[size_t(g)].push_back(int32_t(pick(rng)));
    // Choices of no expert (rows a graph only pads with): slot -1 under every policy, counted nowhere.
    for (int i = 5; i < int(ids[size_t(g)].size()); i += 11 + g) ids[size_t(g)][size_t(i)] = -1;
    for (int32_t e : ids[size_t(g)])
      if (e >= 0) ++counts[size_t(g * pl.E + e)];
  }
  Tensor counts_by_rank = i32(counts, {pl.G, pl.E});
  const auto run = [&](const DispatchTables& t, const std::vector<int32_t>& v) {
    Tensor slots = be().alloc({int64_t(v.size())}, DType::I32);
    ops().dispatch(t, i32(v), counts_by_rank, slots);
    return ints(slots);
  };

  // static: a lookup of the rank's table.
  const auto table = eplb::static_table(pl.row, pl.G, 0, pl.E);
  for (int g = 0; g < pl.G; ++g) {
    const auto slots = run(dispatch_tables(pl, eplb::Dispatch::static_, g, 0), ids[size_t(g)]);
    for (size_t i = 0; i < slots.size(); ++i) {
      const int32_t e = ids[size_t(g)][i];
      EXPECT_EQ(slots[i], e < 0 ? -1 : table[size_t(g * pl.E + e)]) << "static, rank " << g << " choice " << i;
    }
  }

  // random: the hash of (pass, layer, rank, choice) picks among the expert's replicas.
  for (int g = 0; g < pl.G; ++g)
    for (int64_t pass : {0, 1, 12345}) {
      const DispatchTables t = dispatch_tables(pl, eplb::Dispatch::random, g, pass);
      const auto slots = run(t, ids[size_t(g)]);
      EXPECT_EQ(run(t, ids[size_t(g)]), slots) << "random is deterministic";
      const uint64_t seed = uint64_t(pass) * 1000003u + uint64_t(t.layer);
      for (size_t i = 0; i < slots.size(); ++i) {
        if (ids[size_t(g)][i] < 0) {
          EXPECT_EQ(slots[i], -1) << "random, rank " << g << " choice " << i;
          continue;
        }
        const auto& c = rep[size_t(ids[size_t(g)][i])];
        EXPECT_EQ(slots[i], c[mix64(seed ^ mix64(uint64_t(g) << 40 ^ uint64_t(i))) % c.size()])
            << "random, rank " << g << " pass " << pass << " choice " << i;
      }
    }
  // ... and spreads one expert's many choices over its replicas.
  {
    const std::vector<int32_t> many(3000, 0);  // expert 0 has 3 replicas
    const auto slots = run(dispatch_tables(pl, eplb::Dispatch::random, 1, 7), many);
    std::map<int32_t, int> per;
    for (int32_t s : slots) ++per[s];
    ASSERT_EQ(per.size(), 3u);
    for (const auto& [s, n] : per) EXPECT_NEAR(n, 1000, 150) << "slot " << s;
  }

  // balanced: summed over ranks, each slot gets exactly dispatch_balanced's quota; every choice
  // goes to a replica of its expert.
  std::vector<double> total(size_t(pl.E), 0.0);
  for (int g = 0; g < pl.G; ++g)
    for (int e = 0; e < pl.E; ++e) total[size_t(e)] += counts[size_t(g * pl.E + e)];
  const std::vector<double> quota = eplb::dispatch_balanced(pl.row, pl.G, total.data(), pl.E);
  std::vector<double> load(pl.row.size(), 0.0);
  for (int g = 0; g < pl.G; ++g) {
    const auto slots = run(dispatch_tables(pl, eplb::Dispatch::balanced, g, 0), ids[size_t(g)]);
    for (size_t i = 0; i < slots.size(); ++i) {
      if (ids[size_t(g)][i] < 0) {
        EXPECT_EQ(slots[i], -1) << "balanced, rank " << g << " choice " << i;
        continue;
      }
      ASSERT_TRUE(slots[i] >= 0 && size_t(slots[i]) < pl.row.size()) << "balanced slot " << slots[i];
      EXPECT_EQ(pl.row[size_t(slots[i])], ids[size_t(g)][i]) << "balanced, rank " << g << " choice " << i;
      load[size_t(slots[i])] += 1.0;
    }
  }
  EXPECT_EQ(load, quota);
}

TEST_P(OpConformance, HistogramSkipsNegativeKeysAndAccumulates) {
  const std::vector<int32_t> keys{3, -1, 0, 3, 5, -1, 3, 0};
  Tensor counts = i32({1, 0, 0, 10, 0, 0});
  ops().histogram(i32(keys), counts);
  EXPECT_EQ(ints(counts), (std::vector<int32_t>{3, 0, 0, 13, 0, 1}));
}

TEST_P(OpConformance, GroupByIsAStableCountingSort) {
  // keys [N] with skipped entries; group = (key / div) % groups. A backend may take another path for
  // few keys and few groups (CUDA: one block) than for many: the random cases reach both.
  auto expect_sorted = [&](const std::vector<int32_t>& keys, int div, int groups, int n_valid) {
    const int64_t N = int64_t(keys.size());
    const int64_t n = n_valid < 0 ? N : n_valid;
    Tensor valid = n_valid < 0 ? Tensor() : i32({4, 0, n_valid - 4});  // e.g. recv_counts of 3 ranks
    Tensor perm = be().alloc({N}, DType::I32), counts = be().alloc({groups}, DType::I32);
    Tensor offsets = be().alloc({groups + 1}, DType::I32), inverse = be().alloc({N}, DType::I32);
    ops().group_by(i32(keys), valid, div, groups, perm, counts, offsets, inverse);
    std::vector<int32_t> want_perm, want_counts(size_t(groups), 0), want_offsets{0}, want_inverse(size_t(N), -1);
    std::vector<std::vector<int32_t>> members(static_cast<size_t>(groups));
    for (int64_t i = 0; i < n; ++i)
      if (keys[size_t(i)] >= 0) members[size_t((keys[size_t(i)] / div) % groups)].push_back(int32_t(i));
    for (int g = 0; g < groups; ++g) {
      for (int32_t i : members[size_t(g)]) {
        want_inverse[size_t(i)] = int32_t(want_perm.size());
        want_perm.push_back(i);
        ++want_counts[size_t(g)];
      }
      want_offsets.push_back(int32_t(want_perm.size()));
    }
    const std::string where = fmt::format("N {} groups {} div {} valid {}", N, groups, div, n_valid);
    const std::vector<int32_t> got = ints(perm);
    EXPECT_EQ(std::vector<int32_t>(got.begin(), got.begin() + long(want_perm.size())), want_perm) << where;
    EXPECT_EQ(std::vector<int32_t>(got.begin() + long(want_perm.size()), got.end()),
              std::vector<int32_t>(size_t(N) - want_perm.size(), -1))
        << where;
    EXPECT_EQ(ints(counts), want_counts) << where;
    EXPECT_EQ(ints(offsets), want_offsets) << where;
    EXPECT_EQ(ints(inverse), want_inverse) << where;
    // Without inverse.
    Tensor no_inverse;
    ops().group_by(i32(keys), valid, div, groups, perm, counts, offsets, no_inverse);
    EXPECT_EQ(ints(offsets), want_offsets) << where;
    EXPECT_EQ(ints(perm), got) << where;
  };
  const std::vector<int32_t> keys{7, 2, -1, 11, 0, 5, 7, 3, -1, 1, 10, 6};
  for (int div : {1, 3})
    for (int n_valid : {-1, 9}) expect_sorted(keys, div, 4, n_valid);  // -1: `valid` undefined
  std::mt19937 rng(11);
  auto random_keys = [&](int64_t N, int range) {
    std::vector<int32_t> k(static_cast<size_t>(N));
    for (auto& v : k) v = int32_t(rng() % uint32_t(range + 1)) - 1;  // -1: skipped
    return k;
  };
  for (auto [N, groups] : {std::pair<int64_t, int>{1000, 512}, {1024, 7}, {1025, 512}, {3000, 37}, {300, 5000}})
    for (int n_valid : {-1, int(N) - 5}) expect_sorted(random_keys(N, 2 * groups), 2, groups, n_valid);
}

TEST_P(OpConformance, GatherRoutedReadsTheCountsOnTheDevice) {
  // Three sources' rows (F32 rows of 5 and of 8 floats: byte and 16-byte copies), each with its send
  // counts; rank `me` receives its span of each, by source, and the rest of out keeps its bytes.
  for (int64_t width : {5, 8}) {
    const std::vector<std::vector<int32_t>> counts{{2, 3, 0}, {0, 0, 4}, {1, 4, 2}};
    std::vector<std::vector<float>> rows(3);
    std::vector<RoutedRows> sources;
    for (int s = 0; s < 3; ++s) {
      int64_t held = 0;
      for (int32_t c : counts[size_t(s)]) held += c;
      held += s;  // a source may hold more rows than it sends
      rows[size_t(s)] = randn(size_t(held * width), uint32_t(40 + s));
      sources.push_back({f32(rows[size_t(s)], {held, width}), i32(counts[size_t(s)])});
    }
    for (int me = 0; me < 3; ++me) {
      const int64_t room = 12;
      std::vector<float> want(size_t(room * width), -7.0f);
      Tensor out = f32(want, {room, width}), recv_counts = i32({-1, -1, -1});
      ops().gather_routed(sources, me, out, recv_counts);
      std::vector<int32_t> want_counts;
      size_t at = 0;
      for (int s = 0; s < 3; ++s) {
        int64_t skip = 0;
        for (int d = 0; d < me; ++d) skip += counts[size_t(s)][size_t(d)];
        const int64_t n = counts[size_t(s)][size_t(me)];
        std::copy_n(rows[size_t(s)].begin() + skip * width, n * width, want.begin() + long(at));
        at += size_t(n * width);
        want_counts.push_back(int32_t(n));
      }
      EXPECT_EQ(floats(out), want) << "width " << width << " rank " << me;
      EXPECT_EQ(ints(recv_counts), want_counts) << "width " << width << " rank " << me;
    }
  }
  // Any dtype: bf16 rows of 3 move as bytes.
  const std::vector<uint16_t> halves{1, 2, 3, 4, 5, 6, 7, 8, 9};
  Tensor h = upload(halves, {3, 3}, DType::BF16), out = upload(std::vector<uint16_t>(6, 0), {2, 3}, DType::BF16);
  const std::vector<RoutedRows> one{{h, i32({1, 2})}, {h, i32({0, 0})}};
  Tensor rc = i32({0, 0});
  ops().gather_routed(one, 1, out, rc);
  std::vector<uint16_t> got(6);
  be().download(out, got.data());
  EXPECT_EQ(got, (std::vector<uint16_t>{4, 5, 6, 7, 8, 9}));
  EXPECT_EQ(ints(rc), (std::vector<int32_t>{2, 0}));
  // Counts are data: reaching past a source's rows or out's is the op's error (on a backend that
  // cannot read them on the host, at its next wait); shapes fail at once.
  const std::vector<RoutedRows> past{{h, i32({1, 3})}, {h, i32({0, 0})}};
  test::expect_error(
      [&] {
        ops().gather_routed(past, 1, out, rc);
        be().synchronize();
      },
      {"gather_routed", "source 0", "row 4", "3 rows"});
  Tensor small = upload(std::vector<uint16_t>(3, 0), {1, 3}, DType::BF16);
  test::expect_error(
      [&] {
        ops().gather_routed(one, 1, small, rc);
        be().synchronize();
      },
      {"gather_routed", "reach row 2 of out, which holds 1"});
  Tensor f = be().alloc({2, 3}, DType::F32);
  test::expect_error([&] { ops().gather_routed(one, 1, f, rc); }, {"gather_routed", "not rows of out"});
  test::expect_error([&] { ops().gather_routed(one, 1, out, const_cast<Tensor&>(one[1].counts)); },
                     {"gather_routed", "recv_counts is source 1's counts"});
}

struct MoeCase {
  int64_t T, k, E;  // tokens, choices per token, groups (experts)
};

TEST_P(OpConformance, MoeExpertsAndCombineMatchNaiveSwiglu) {
  const int64_t H = 24, I = 16;
  // Decode-like (many groups of one or two rows), prefill-like (few groups of many rows), mixed.
  for (const MoeCase mc : {MoeCase{2, 8, 16}, MoeCase{150, 2, 3}, MoeCase{9, 3, 5}}) {
    SCOPED_TRACE("T=" + std::to_string(mc.T) + " k=" + std::to_string(mc.k) + " E=" + std::to_string(mc.E));
    const int64_t T = mc.T, k = mc.k, E = mc.E, N = T * k;
    std::vector<SwigluWeights> experts;
    std::vector<std::vector<float>> gate(static_cast<size_t>(E)), up(static_cast<size_t>(E)), down(static_cast<size_t>(E));  // as stored
    for (int64_t e = 0; e < E; ++e) {
      const DType dt = e % 2 ? DType::BF16 : DType::F32;
      const auto g = randn(size_t(I * H), uint32_t(400 + e), 0.3f), u = randn(size_t(I * H), uint32_t(500 + e), 0.3f);
      const auto d = randn(size_t(H * I), uint32_t(600 + e), 0.3f);
      gate[size_t(e)] = stored_as(g, dt);
      up[size_t(e)] = stored_as(u, dt);
      down[size_t(e)] = stored_as(d, dt);
      experts.push_back({weight(g, {I, H}, dt), weight(u, {I, H}, dt), weight(d, {H, I}, dt)});
    }
    // Each token's k distinct experts; every 7th choice is dropped (key -1).
    std::vector<int32_t> keys(static_cast<size_t>(N));
    std::mt19937 rng(uint32_t(700 + T));
    for (int64_t t = 0; t < T; ++t) {
      std::vector<int32_t> e(static_cast<size_t>(E));
      std::iota(e.begin(), e.end(), 0);
      std::shuffle(e.begin(), e.end(), rng);
      for (int64_t j = 0; j < k; ++j) keys[size_t(t * k + j)] = (t * k + j) % 7 == 3 ? -1 : e[size_t(j)];
    }
    const std::vector<float> x = randn(size_t(T * H), uint32_t(800 + T));
    Tensor perm = be().alloc({N}, DType::I32), counts = be().alloc({E}, DType::I32);
    Tensor offsets = be().alloc({E + 1}, DType::I32), none;
    ops().group_by(i32(keys), none, 1, int(E), perm, counts, offsets, none);
    Tensor y = f32(std::vector<float>(size_t(N * H), 7.0f), {N, H});
    ops().moe_experts(f32(x, {T, H}), perm, offsets, int(k), experts, y);
    std::vector<double> want(size_t(N * H), 7.0);  // rows not listed keep their contents
    for (int64_t i = 0; i < N; ++i) {
      const int32_t e = keys[size_t(i)];
      if (e < 0) continue;
      const float* xr = x.data() + (i / k) * H;
      std::vector<double> a(static_cast<size_t>(I));
      for (int64_t r = 0; r < I; ++r) {
        double gs = 0, us = 0;
        for (int64_t c = 0; c < H; ++c) {
          gs += double(gate[size_t(e)][size_t(r * H + c)]) * xr[c];
          us += double(up[size_t(e)][size_t(r * H + c)]) * xr[c];
        }
        a[size_t(r)] = silu_d(gs) * us;
      }
      for (int64_t c = 0; c < H; ++c) {
        double s = 0;
        for (int64_t r = 0; r < I; ++r) s += double(down[size_t(e)][size_t(c * I + r)]) * a[size_t(r)];
        want[size_t(i * H + c)] = s;
      }
    }
    const std::vector<float> got_y = floats(y);
    EXPECT_TRUE(all_near(got_y, want, 2e-5, 1e-4)) << "moe_experts";

    // combine: out[t] += sum_j w[t, j] y[t*k + j] (rows undefined), dropped choices weigh 0.
    std::vector<float> w = uniform_floats(size_t(N), uint32_t(900 + T), 0.1f, 1.0f);
    for (int64_t i = 0; i < N; ++i)
      if (keys[size_t(i)] < 0) w[size_t(i)] = 0.0f;
    const std::vector<float> out0 = randn(size_t(T * H), uint32_t(950 + T));
    Tensor out = f32(out0, {T, H});
    ops().moe_combine(y, Tensor(), f32(w, {T, k}), out);
    std::vector<double> want_out(out0.begin(), out0.end());
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < k; ++j)
        for (int64_t c = 0; c < H; ++c)
          want_out[size_t(t * H + c)] += double(w[size_t(t * k + j)]) * got_y[size_t((t * k + j) * H + c)];
    EXPECT_TRUE(all_near(floats(out), want_out, 1e-5, 1e-5)) << "moe_combine";

    // combine through explicit rows: y's rows in reverse order.
    std::vector<int32_t> rows(static_cast<size_t>(N));
    std::vector<float> y_rev(size_t(N * H));
    for (int64_t i = 0; i < N; ++i) {
      rows[size_t(i)] = int32_t(N - 1 - i);
      std::copy_n(got_y.begin() + i * H, H, y_rev.begin() + (N - 1 - i) * H);
    }
    Tensor out2 = f32(out0, {T, H});
    ops().moe_combine(f32(y_rev, {N, H}), i32(rows), f32(w, {T, k}), out2);
    EXPECT_TRUE(all_near(floats(out2), want_out, 1e-5, 1e-5)) << "moe_combine with rows";

    // A choice of weight 0 is not read: its rows entry (-1, as group_by's inverse gives a choice of
    // no expert) and its y row (NaN here) leave out as the others make it.
    std::vector<float> y_nan = y_rev;
    for (int64_t i = 0; i < N; ++i)
      if (w[size_t(i)] == 0.0f) {
        std::fill_n(y_nan.begin() + rows[size_t(i)] * H, H, std::nanf(""));
        rows[size_t(i)] = -1;
      }
    Tensor out3 = f32(out0, {T, H});
    ops().moe_combine(f32(y_nan, {N, H}), i32(rows), f32(w, {T, k}), out3);
    EXPECT_TRUE(all_near(floats(out3), want_out, 1e-5, 1e-5)) << "moe_combine skips choices of weight 0";
  }
}

// The grouped experts with FP8 experts against a double-precision SwiGLU of their stored values;
// with bf16_first, expert 0 is bf16 (one call with both dtypes). Two choices a token, spread over
// the E experts.
inline void OpConformance::check_block_scaled_fp8_experts(int64_t H, int64_t I, int64_t E, bool bf16_first,
                                                          std::initializer_list<int64_t> tokens) {
  std::vector<SwigluWeights> experts;
  std::vector<BlockScaledHost> g, u, d;
  for (int64_t e = 0; e < E; ++e) {
    const auto gv = randn(size_t(I * H), uint32_t(1400 + e), 0.1f), uv = randn(size_t(I * H), uint32_t(1500 + e), 0.1f);
    const auto dv = randn(size_t(H * I), uint32_t(1600 + e), 0.1f);
    if (e == 0 && bf16_first) {  // bf16: what its references read is the bf16 value
      g.push_back({Tensor(), stored_as(gv, DType::BF16)});
      u.push_back({Tensor(), stored_as(uv, DType::BF16)});
      d.push_back({Tensor(), stored_as(dv, DType::BF16)});
      experts.push_back({weight(gv, {I, H}, DType::BF16), weight(uv, {I, H}, DType::BF16),
                         weight(dv, {H, I}, DType::BF16)});
      continue;
    }
    g.push_back(block_scaled_host(gv, I, H));
    u.push_back(block_scaled_host(uv, I, H));
    d.push_back(block_scaled_host(dv, H, I));
    experts.push_back({be().to_device(g.back().tensor), be().to_device(u.back().tensor), be().to_device(d.back().tensor)});
  }
  for (int64_t T : tokens) {
    SCOPED_TRACE("T=" + std::to_string(T));
    const int64_t k = 2, N = T * k;
    std::vector<int32_t> keys(static_cast<size_t>(N));
    for (int64_t i = 0; i < N; ++i) keys[size_t(i)] = int32_t((i * 7 + i / k) % E);
    const std::vector<float> x = randn(size_t(T * H), uint32_t(1700 + T));
    Tensor perm = be().alloc({N}, DType::I32), counts = be().alloc({E}, DType::I32);
    Tensor offsets = be().alloc({E + 1}, DType::I32), none;
    ops().group_by(i32(keys), none, 1, int(E), perm, counts, offsets, none);
    Tensor y = be().alloc({N, H}, DType::F32);
    ops().moe_experts(f32(x, {T, H}), perm, offsets, int(k), experts, y);
    std::vector<double> want(size_t(N * H));
    for (int64_t i = 0; i < N; ++i) {
      const size_t e = size_t(keys[size_t(i)]);
      const float* xr = x.data() + (i / k) * H;
      std::vector<double> a(static_cast<size_t>(I));
      for (int64_t r = 0; r < I; ++r) {
        double gs = 0, us = 0;
        for (int64_t c = 0; c < H; ++c) {
          gs += double(g[e].stored[size_t(r * H + c)]) * xr[c];
          us += double(u[e].stored[size_t(r * H + c)]) * xr[c];
        }
        a[size_t(r)] = silu_d(gs) * us;
      }
      for (int64_t c = 0; c < H; ++c) {
        double sum = 0;
        for (int64_t r = 0; r < I; ++r) sum += double(d[e].stored[size_t(c * I + r)]) * a[size_t(r)];
        want[size_t(i * H + c)] = sum;
      }
    }
    EXPECT_TRUE(all_near(floats(y), want, 2e-5, 1e-4));
  }
}

// FP8 experts of several 128 x 128 blocks, partial at the edges (H = 136, I = 130), beside a bf16 one
// in the same call, for a decode-like pass (one row per group) and a prefill-like one (many rows).
TEST_P(OpConformance, MoeExpertsWithBlockScaledFp8Experts) {
  check_block_scaled_fp8_experts(136, 130, 3, /*bf16_first=*/true, {1, 40});
}

// Every expert FP8 with rows of whole 16-byte steps (what the released models have: the CUDA
// backend then takes kernels made for FP8 alone), partial 128-blocks at the edges (H = 144, I =
// 160), decode-like passes of 1, 2 and 8 tokens and a prefill-like one.
TEST_P(OpConformance, MoeExpertsWithOnlyBlockScaledFp8Experts) {
  check_block_scaled_fp8_experts(144, 160, 5, /*bf16_first=*/false, {1, 2, 8, 40});
}

// ============================================================================================
// Sampling and verification
// ============================================================================================

TEST_P(OpConformance, SampleGreedyIsArgmaxWithOneHotProbs) {
  const int64_t V = 7;
  const std::vector<float> logits{0, 3, 1, 3, -1, 2, 0,  //  tie: the lower id
                                  5, 1, 1, 1, 1, 1, 1,   //
                                  -2, -2, -2, -2, -2, -2, -1};
  const int64_t R = 3;
  const SamplingRows rows = sampling_rows({0.0f, 0.0f, -1.0f}, {1, 1, 1}, {0, 0, 0}, {1, 2, 3}, {0, 0, 0});
  Tensor ids = be().alloc({R}, DType::I32), probs = be().alloc({R, V}, DType::F32), none;
  ops().sample(f32(logits, {R, V}), rows, Draw::target, ids, probs);
  EXPECT_EQ(ints(ids), (std::vector<int32_t>{1, 0, 6}));
  std::vector<float> one_hot(size_t(R * V), 0.0f);
  one_hot[1] = one_hot[size_t(V)] = one_hot[size_t(2 * V + 6)] = 1.0f;
  EXPECT_EQ(floats(probs), one_hot);
  ops().sample(f32(logits, {R, V}), rows, Draw::target, ids, none);
  EXPECT_EQ(ints(ids), (std::vector<int32_t>{1, 0, 6}));

  // Rows of a vocabulary's width (CUDA streams rows of 16-byte alignment as vectors; W is odd, so
  // rows 1 and 3 are not): the maximum twice (the lower id wins, in different lanes and rounds),
  // in the last element, NaN first (it wins, as the CPU's scan keeps it) and NaN elsewhere (never).
  const int64_t W = 151937;
  std::vector<float> wide = randn(size_t(4 * W), 77);
  wide[size_t(100001)] = wide[size_t(120002)] = wide[size_t(140000)] = 9.0f;
  wide[size_t(2 * W - 1)] = 9.0f;
  wide[size_t(2 * W)] = std::nanf("");
  wide[size_t(2 * W + 5)] = 9.0f;
  wide[size_t(3 * W + 7)] = std::nanf("");
  wide[size_t(3 * W + 50000)] = 9.0f;
  const SamplingRows greedy = sampling_rows({0, 0, 0, 0}, {1, 1, 1, 1}, {0, 0, 0, 0}, {1, 2, 3, 4}, {0, 0, 0, 0});
  Tensor wide_ids = be().alloc({4}, DType::I32);
  ops().sample(f32(wide, {4, W}), greedy, Draw::target, wide_ids, none);
  EXPECT_EQ(ints(wide_ids), (std::vector<int32_t>{100001, int32_t(W - 1), 0, 50000}));
}

TEST_P(OpConformance, SampleDrawsWhatTheSamplingMathGives) {
  const int64_t V = 50, R = 12;
  const std::vector<float> logits = randn(size_t(R * V), 1000, 2.0f);
  std::vector<float> temperature, top_p;
  std::vector<int32_t> top_k, position;
  std::vector<int64_t> seed;
  for (int64_t r = 0; r < R; ++r) {
    temperature.push_back(r % 4 == 3 ? 0.0f : 0.5f + 0.3f * float(r % 3));
    top_p.push_back(r % 2 ? 0.8f : 1.0f);
    top_k.push_back(r % 3 == 1 ? 5 : 0);
    seed.push_back(int64_t(1000 + r * 7919));
    position.push_back(int32_t(r * 3 + 1));
  }
  const SamplingRows rows = sampling_rows(temperature, top_p, top_k, seed, position);
  for (Draw stream : {Draw::target, Draw::draft}) {
    Tensor ids = be().alloc({R}, DType::I32), probs = be().alloc({R, V}, DType::F32), none;
    ops().sample(f32(logits, {R, V}), rows, stream, ids, probs);
    const std::vector<int32_t> got = ints(ids);
    const std::vector<float> got_p = floats(probs);
    for (int64_t r = 0; r < R; ++r) {
      const std::span<const float> row(logits.data() + r * V, size_t(V));
      const std::vector<float> p =
          distribution(row, temperature[size_t(r)], top_p[size_t(r)], top_k[size_t(r)]);
      const int32_t want = temperature[size_t(r)] <= 0
                               ? argmax(row)
                               : kernels::sample(p, uniform(uint64_t(seed[size_t(r)]), position[size_t(r)], stream));
      EXPECT_EQ(got[size_t(r)], want) << "row " << r;
      EXPECT_TRUE(all_near(std::vector<float>(got_p.begin() + r * V, got_p.begin() + (r + 1) * V), p, 1e-6))
          << "probs of row " << r;
    }
    ops().sample(f32(logits, {R, V}), rows, stream, ids, none);
    EXPECT_EQ(ints(ids), got) << "the same draws without probs";
  }
}

TEST_P(OpConformance, SampledFrequenciesFollowTheTruncatedDistribution) {
  const int64_t V = 8, R = 40000;
  const std::vector<float> one{1.0f, 2.5f, 0.3f, 2.0f, -1.0f, 1.8f, 0.0f, 2.2f};
  struct Setting {
    float temperature, top_p;
    int top_k;
  };
  for (const Setting s : {Setting{1.0f, 1.0f, 0}, Setting{0.8f, 1.0f, 4}, Setting{1.2f, 0.7f, 0},
                          Setting{1.0f, 0.9f, 3}}) {
    std::vector<float> logits;
    std::vector<int64_t> seed(static_cast<size_t>(R));
    for (int64_t r = 0; r < R; ++r) {
      logits.insert(logits.end(), one.begin(), one.end());
      seed[size_t(r)] = r;  // one draw from each of R sequences
    }
    const SamplingRows rows = sampling_rows(std::vector<float>(size_t(R), s.temperature),
                                            std::vector<float>(size_t(R), s.top_p),
                                            std::vector<int32_t>(size_t(R), s.top_k), seed,
                                            std::vector<int32_t>(size_t(R), 9));
    Tensor ids = be().alloc({R}, DType::I32), none;
    ops().sample(f32(logits, {R, V}), rows, Draw::target, ids, none);
    std::vector<double> freq(size_t(V), 0.0);
    for (int32_t id : ints(ids)) freq[size_t(id)] += 1.0 / double(R);
    const std::vector<double> p = reference_distribution(one, s.temperature, s.top_p, s.top_k);
    for (int64_t v = 0; v < V; ++v) {
      // 5 standard deviations of a frequency of R draws (at most 0.0125).
      EXPECT_NEAR(freq[size_t(v)], p[size_t(v)], 5 * std::sqrt(0.25 / double(R)))
          << "token " << v << " T=" << s.temperature << " top_p=" << s.top_p << " top_k=" << s.top_k;
      if (p[size_t(v)] == 0.0) {
        EXPECT_EQ(freq[size_t(v)], 0.0) << "token " << v << " is outside the nucleus";
      }
    }
  }
}

TEST_P(OpConformance, VerifyDraftsGreedyAcceptsUntilTheFirstMismatch) {
  const int64_t B = 4, S = 3, V = 10;
  // Target row r's argmax is argmaxes[r].
  const std::vector<int32_t> argmaxes{2, 5, 7, 1,   // all drafts accepted, bonus 1
                                      4, 4, 0, 9,   // d_2 != 4: one accepted, correction 4
                                      6, 3, 3, 3,   // d_1 != 6: none accepted
                                      8, 1, 2, 0};  // d_3 != 2: two accepted
  const std::vector<int32_t> drafts{2, 5, 7,  //
                                    4, 3, 0,  //
                                    5, 3, 3,  //
                                    8, 1, 9};
  std::vector<float> logits = randn(size_t(B * (S + 1) * V), 1100);
  for (size_t r = 0; r < argmaxes.size(); ++r) logits[r * V + size_t(argmaxes[r])] = 10.0f;
  const int64_t R = B * (S + 1);
  const SamplingRows rows = sampling_rows(std::vector<float>(size_t(R), 0.0f), std::vector<float>(size_t(R), 1.0f),
                                          std::vector<int32_t>(size_t(R), 0), std::vector<int64_t>(size_t(R), 5),
                                          std::vector<int32_t>(size_t(R), 0));
  Tensor out = be().alloc({B, S + 2}, DType::I32), none;
  ops().verify_drafts(f32(logits, {R, V}), i32(drafts, {B, S}), none, rows, out);
  EXPECT_EQ(ints(out), (std::vector<int32_t>{3, 2, 5, 7, 1,     //
                                             1, 4, 4, -1, -1,   //
                                             0, 6, -1, -1, -1,  //
                                             2, 8, 1, 2, -1}));

  // No drafts: the target's own token.
  Tensor out0 = be().alloc({B, 2}, DType::I32);
  std::vector<float> first;
  for (int64_t b = 0; b < B; ++b) first.insert(first.end(), logits.begin() + b * (S + 1) * V, logits.begin() + (b * (S + 1) + 1) * V);
  const SamplingRows rows0 = sampling_rows(std::vector<float>(size_t(B), 0.0f), std::vector<float>(size_t(B), 1.0f),
                                           std::vector<int32_t>(size_t(B), 0), std::vector<int64_t>(size_t(B), 5),
                                           std::vector<int32_t>(size_t(B), 0));
  ops().verify_drafts(f32(first, {B, V}), i32({}, {B, 0}), none, rows0, out0);
  EXPECT_EQ(ints(out0), (std::vector<int32_t>{0, 2, 0, 4, 0, 6, 0, 8}));
}

// The first draft step's inputs from verdicts: each sequence's tokens after its verified rows
// (past the kept ones, its last token again) and the row of its last kept token.
TEST_P(OpConformance, DraftInputsShiftTheVerdictsTokensAndPickTheLastKeptRow) {
  const int64_t B = 4, S = 3;
  const std::vector<int32_t> verdicts{3, 2, 5, 7, 1,     //
                                      1, 4, 4, -1, -1,   //
                                      0, 6, -1, -1, -1,  //
                                      2, 8, 1, 2, -1};
  Tensor tokens = be().alloc({B * (S + 1)}, DType::I32), last = be().alloc({B}, DType::I32);
  Tensor routed = i32(std::vector<int32_t>(size_t(B * (S + 1)), 7)), none;
  ops().draft_inputs(i32(verdicts, {B, S + 2}), tokens, last, routed);
  EXPECT_EQ(ints(tokens), (std::vector<int32_t>{2, 5, 7, 1,  //
                                                4, 4, 4, 4,  //
                                                6, 6, 6, 6,  //
                                                8, 1, 2, 2}));
  EXPECT_EQ(ints(last), (std::vector<int32_t>{3, 5, 8, 14}));
  // The rows past the kept ones only pad: no expert for them.
  EXPECT_EQ(ints(routed), (std::vector<int32_t>{1, 1, 1, 1,  //
                                                1, 1, 0, 0,  //
                                                1, 0, 0, 0,  //
                                                1, 1, 1, 0}));
  Tensor tokens2 = be().alloc({B * (S + 1)}, DType::I32);
  ops().draft_inputs(i32(verdicts, {B, S + 2}), tokens2, last, none);  // routed is optional
  EXPECT_EQ(ints(tokens2), ints(tokens));
  // No sequences: nothing to do.
  Tensor none_tokens = be().alloc({0}, DType::I32), none_last = be().alloc({0}, DType::I32);
  ops().draft_inputs(be().alloc({0, S + 2}, DType::I32), none_tokens, none_last, none);
  EXPECT_THROW(ops().draft_inputs(i32(verdicts, {B, S + 2}), none_tokens, last, none), Error);
  Tensor short_routed = be().alloc({B}, DType::I32);
  test::expect_error([&] { ops().draft_inputs(i32(verdicts, {B, S + 2}), tokens, last, short_routed); },
                     {"draft_inputs", "routed"});
}

TEST_P(OpConformance, VerifyDraftsSamplingEqualsTheReferenceLoop) {
  const int64_t B = 6, S = 4, V = 9, R = B * (S + 1);
  // Target logits close to the drafts' distributions, so that some drafts pass and some fail.
  const std::vector<float> logits = randn(size_t(R * V), 1200, 1.0f);
  std::vector<float> temperature, top_p;
  std::vector<int32_t> top_k, position;
  std::vector<int64_t> seed;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i <= S; ++i) {
      temperature.push_back(b == 4 ? 0.0f : 0.7f + 0.1f * float(b));  // sequence 4 is greedy
      top_p.push_back(b == 2 ? 0.85f : 1.0f);
      top_k.push_back(b == 3 ? 4 : 0);
      seed.push_back(int64_t(77 + b));
      position.push_back(int32_t(20 + i));
    }
  // The drafts and their distributions: q from perturbed logits, d_i drawn from q.
  std::vector<float> q(size_t(B * S * V));
  std::vector<int32_t> drafts(size_t(B * S));
  const std::vector<float> noise = randn(size_t(B * S * V), 1201, 0.7f);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < S; ++i) {
      const int64_t r = b * (S + 1) + i;
      std::vector<float> ql(static_cast<size_t>(V));
      for (int64_t v = 0; v < V; ++v) ql[size_t(v)] = logits[size_t(r * V + v)] + noise[size_t((b * S + i) * V + v)];
      const std::vector<float> qd = distribution(ql, 1.0f, 1.0f, 0);
      std::copy(qd.begin(), qd.end(), q.begin() + (b * S + i) * V);
      drafts[size_t(b * S + i)] = kernels::sample(qd, uniform(uint64_t(seed[size_t(r)]), position[size_t(r)], Draw::draft));
    }
  const SamplingRows rows = sampling_rows(temperature, top_p, top_k, seed, position);
  Tensor out = be().alloc({B, S + 2}, DType::I32);
  ops().verify_drafts(f32(logits, {R, V}), i32(drafts, {B, S}), f32(q, {B * S, V}), rows, out);

  std::vector<int32_t> want;
  for (int64_t b = 0; b < B; ++b) {
    const auto row = [&](int64_t r) { return std::span<const float>(logits.data() + r * V, size_t(V)); };
    const auto dist = [&](int64_t r) {
      return distribution(row(r), temperature[size_t(r)], top_p[size_t(r)], top_k[size_t(r)]);
    };
    const auto u = [&](int64_t r, Draw d) { return uniform(uint64_t(seed[size_t(r)]), position[size_t(r)], d); };
    int64_t a = 0;
    int32_t extra = -1;
    for (; a < S; ++a) {
      const int64_t r = b * (S + 1) + a;
      const int32_t d = drafts[size_t(b * S + a)];
      if (temperature[size_t(r)] <= 0) {
        if (d != argmax(row(r))) break;
        continue;
      }
      const Acceptance acc = accept_or_resample(dist(r), std::span<const float>(q.data() + (b * S + a) * V, size_t(V)),
                                                d, u(r, Draw::accept), u(r, Draw::residual));
      if (!acc.accepted) {
        extra = acc.token;
        break;
      }
    }
    if (extra < 0) {
      const int64_t r = b * (S + 1) + a;
      extra = temperature[size_t(r)] <= 0 ? argmax(row(r)) : kernels::sample(dist(r), u(r, Draw::target));
    }
    want.push_back(int32_t(a));
    for (int64_t i = 0; i < a; ++i) want.push_back(drafts[size_t(b * S + i)]);
    want.push_back(extra);
    for (int64_t i = a + 2; i < S + 2; ++i) want.push_back(-1);
  }
  EXPECT_EQ(ints(out), want);
  int accepted = 0;
  for (int64_t b = 0; b < B; ++b) accepted += want[size_t(b * (S + 2))];
  EXPECT_GT(accepted, 0) << "degenerate case: nothing accepted";
  EXPECT_LT(accepted, B * S) << "degenerate case: everything accepted";
}

// ============================================================================================
// Empty passes, steady state, errors
// ============================================================================================

TEST_P(OpConformance, TokenLogprobsAreTheLogSoftmaxAndItsTopK) {
  const int64_t V = 300, R = 5, K = 6;
  std::vector<float> logits = randn(size_t(R * V), 77, 3.0f);
  // Row 1: a tie among its best three (ties go to the lower id); row 3: all equal.
  logits[size_t(V + 10)] = logits[size_t(V + 250)] = logits[size_t(V + 40)] = 20.0f;
  std::fill(logits.begin() + 3 * V, logits.begin() + 4 * V, -1.5f);
  const std::vector<int32_t> ids{7, 250, -1, 299, 0};
  Tensor lp = be().alloc({R}, DType::F32), tid = be().alloc({R, K}, DType::I32), tlp = be().alloc({R, K}, DType::F32);
  ops().token_logprobs(f32(logits, {R, V}), i32(ids), lp, tid, tlp);
  std::vector<double> want_lp, want_tlp;
  std::vector<int32_t> want_tid;
  for (int64_t r = 0; r < R; ++r) {
    const float* row = logits.data() + r * V;
    double mx = row[0], sum = 0;
    for (int64_t v = 0; v < V; ++v) mx = std::max(mx, double(row[v]));
    for (int64_t v = 0; v < V; ++v) sum += std::exp(double(row[v]) - mx);
    const double lse = mx + std::log(sum);
    want_lp.push_back(ids[size_t(r)] < 0 ? 0.0 : double(row[ids[size_t(r)]]) - lse);
    std::vector<int32_t> order(static_cast<size_t>(V));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return row[a] > row[b]; });
    for (int64_t k = 0; k < K; ++k) {
      want_tid.push_back(order[size_t(k)]);
      want_tlp.push_back(double(row[order[size_t(k)]]) - lse);
    }
  }
  EXPECT_TRUE(all_near(floats(lp), want_lp, 1e-5));
  EXPECT_EQ(ints(tid), want_tid);
  EXPECT_TRUE(all_near(floats(tlp), want_tlp, 1e-5));
  EXPECT_EQ(ints(tid)[size_t(K)], 10) << "ties go to the lower id";
  EXPECT_NEAR(floats(lp)[3], -std::log(double(V)), 1e-5) << "a flat row";
  // K = 0: the tokens' logprobs alone.
  Tensor none;
  Tensor lp0 = be().alloc({R}, DType::F32);
  ops().token_logprobs(f32(logits, {R, V}), i32(ids), lp0, none, none);
  EXPECT_TRUE(all_near(floats(lp0), want_lp, 1e-5));
}

TEST_P(OpConformance, EmptyPassesAreNoOps) {
  // Under expert parallelism a rank runs every layer even with no rows.
  const int64_t H = 8, E = 4;
  Tensor x = be().alloc({0, H}, DType::F32), y = be().alloc({0, 16}, DType::F32);
  Tensor none;
  Tensor ids0 = be().alloc({0}, DType::I32);
  ops().matmul(x, weight(randn(16 * H, 1), {16, H}, DType::BF16), y);
  ops().embedding(ids0, weight(randn(5 * H, 2), {5, H}, DType::F32), x);
  ops().rms_norm(x, f32(std::vector<float>(size_t(H), 0.0f), {H}), 1e-6f, x);
  ops().add(x, x);
  ops().gather_rows(x, ids0, 1, x);
  ops().scatter_rows(x, ids0, x);
  HostLayout h;
  h.block_size = 4;
  SeqLayout empty = layout(h);
  Tensor kc = be().alloc({2, 4, 1, H}, DType::F32), vc = be().alloc({2, 4, 1, H}, DType::F32);
  Tensor q = be().alloc({0, 2, H}, DType::F32), kv = be().alloc({0, 1, H}, DType::F32);
  Tensor o = be().alloc({0, 2, H}, DType::F32);
  ops().attention(q, kv, kv, kc, vc, empty, o);
  Tensor qg0 = be().alloc({0, 2, 2 * H}, DType::F32), gate0 = be().alloc({0, 2, H}, DType::F32);
  Tensor kv0 = be().alloc({0, 1, H}, DType::F32), hn = f32(std::vector<float>(size_t(H), 0.0f), {H});
  ops().qk_norm_rope(qg0, hn, hn, 1e-6f, ids0, 4, 10000.0, q, gate0, kv0);
  const DeltaNetCase c;
  Tensor cs = be().alloc({2, c.C(), c.kc - 1}, DType::F32), rs = be().alloc({2, 4, 16, 16}, DType::F32);
  Tensor cx = be().alloc({0, c.C()}, DType::F32), cy = be().alloc({0, c.C()}, DType::F32);
  ops().causal_conv1d_silu(cx, f32(std::vector<float>(size_t(c.C() * c.kc), 0.0f), {c.C(), c.kc}), cs, empty, cy);
  Tensor g = be().alloc({0, 4}, DType::F32), ro = be().alloc({0, 4, 16}, DType::F32);
  ops().gated_delta_rule(cx, g, g, c.d, rs, empty, ro);
  Tensor logits = be().alloc({0, E}, DType::F32), tk = be().alloc({0, 2}, DType::I32), tw = be().alloc({0, 2}, DType::F32);
  ops().topk_softmax(logits, 2, true, Tensor(), tk, tw);
  const Placement pl;
  Tensor counts_by_rank = i32(std::vector<int32_t>(size_t(pl.G * pl.E), 0), {pl.G, pl.E});
  for (eplb::Dispatch d : {eplb::Dispatch::static_, eplb::Dispatch::random, eplb::Dispatch::balanced})
    ops().dispatch(dispatch_tables(pl, d, 0, 0), ids0, counts_by_rank, ids0);
  Tensor counts = i32(std::vector<int32_t>(size_t(E), 0)), offsets = be().alloc({E + 1}, DType::I32);
  ops().histogram(ids0, counts);
  ops().group_by(ids0, none, 1, int(E), ids0, counts, offsets, ids0);
  EXPECT_EQ(ints(offsets), std::vector<int32_t>(size_t(E + 1), 0));
  std::vector<SwigluWeights> experts(static_cast<size_t>(E));  // empty groups: their weights are not looked at
  ops().moe_experts(x, ids0, offsets, 2, experts, x);
  ops().moe_combine(x, none, be().alloc({0, 2}, DType::F32), x);
  const SamplingRows rows = sampling_rows({}, {}, {}, {}, {});
  ops().sample(logits, rows, Draw::target, ids0, none);
  Tensor vout = be().alloc({0, 4}, DType::I32);
  ops().verify_drafts(logits, be().alloc({0, 2}, DType::I32), none, rows, vout);
  Tensor lp = be().alloc({0}, DType::F32), tid = be().alloc({0, 3}, DType::I32), tlp = be().alloc({0, 3}, DType::F32);
  ops().token_logprobs(logits, ids0, lp, tid, tlp);
  be().synchronize();
}

TEST_P(OpConformance, SteadyStateAllocatesNothing) {
  // The ops a decode pass runs, twice with the same shapes: the second time, no allocation.
  const int64_t H = 16, I = 8, E = 4, k = 2, T = 3, V = 20;
  std::vector<SwigluWeights> experts;
  for (int64_t e = 0; e < E; ++e)
    experts.push_back({weight(randn(size_t(I * H), uint32_t(e)), {I, H}, DType::BF16),
                       weight(randn(size_t(I * H), uint32_t(e + 9)), {I, H}, DType::BF16),
                       weight(randn(size_t(H * I), uint32_t(e + 19)), {H, I}, DType::BF16)});
  Tensor x = f32(randn(size_t(T * H), 1), {T, H});
  Tensor router = weight(randn(size_t(E * H), 2), {E, H}, DType::F32);
  Tensor logits = be().alloc({T, E}, DType::F32), ids = be().alloc({T, k}, DType::I32);
  Tensor w = be().alloc({T, k}, DType::F32), perm = be().alloc({T * k}, DType::I32);
  Tensor counts = be().alloc({E}, DType::I32), offsets = be().alloc({E + 1}, DType::I32);
  Tensor y = be().alloc({T * k, H}, DType::F32), out = be().alloc({T, H}, DType::F32), none;
  HostLayout h;
  h.block_size = 4;
  h.width = 2;
  h.cu = {0, 1, 2, 3};
  h.kv_lens = {3, 5, 1};
  h.block_tables = {0, 1, 2, 3, 4, 5};
  h.slot_mapping = {2, 12, 16};
  h.state_slots = {0, 1, 2};
  const SeqLayout sl = layout(h);
  Tensor kc = f32(randn(6 * 4 * H, 3), {6, 4, 1, H}), vc = f32(randn(6 * 4 * H, 4), {6, 4, 1, H});
  Tensor qa = f32(randn(size_t(T * 2 * H), 5), {T, 2, H}), kn = f32(randn(size_t(T * H), 6), {T, 1, H});
  Tensor ao = be().alloc({T, 2, H}, DType::F32);
  const DeltaNetCase c;
  Tensor cs = f32(randn(size_t(3 * c.conv_state()), 7), {3, c.C(), c.kc - 1});
  Tensor rs = f32(randn(size_t(3 * c.rule_state()), 8, 0.1f), {3, 4, 16, 16});
  Tensor cx = f32(randn(size_t(T * c.C()), 9), {T, c.C()}), cy = be().alloc({T, c.C()}, DType::F32);
  Tensor cw = f32(randn(size_t(c.C() * c.kc), 10), {c.C(), c.kc});
  Tensor g = f32(std::vector<float>(size_t(T * 4), -0.5f), {T, 4}), beta = f32(std::vector<float>(size_t(T * 4), 0.5f), {T, 4});
  Tensor ro = be().alloc({T, 4, 16}, DType::F32);
  Tensor sl_logits = f32(randn(size_t(T * V), 11), {T, V}), sampled = be().alloc({T}, DType::I32);
  Tensor probs = be().alloc({T, V}, DType::F32);
  const SamplingRows rows = sampling_rows({0.8f, 0.0f, 1.0f}, {0.9f, 1.0f, 1.0f}, {0, 0, 5}, {1, 2, 3}, {4, 5, 6});
  Tensor vlogits = f32(randn(size_t(T * 2 * V), 12), {T * 2, V}), vout = be().alloc({T, 3}, DType::I32);
  const SamplingRows vrows = sampling_rows(std::vector<float>(size_t(T * 2), 1.0f), std::vector<float>(size_t(T * 2), 1.0f),
                                           std::vector<int32_t>(size_t(T * 2), 0), std::vector<int64_t>(size_t(T * 2), 3),
                                           std::vector<int32_t>(size_t(T * 2), 1));
  Tensor drafts = i32({1, 2, 3}, {T, 1});
  Tensor dprobs = f32(std::vector<float>(size_t(T * V), 1.0f / float(V)), {T, V});
  Tensor lp = be().alloc({T}, DType::F32), tid = be().alloc({T, 4}, DType::I32), tlp = be().alloc({T, 4}, DType::F32);
  Workspace ws(be());
  auto pass = [&] {
    ws.reset();
    Tensor tmp = ws.take({T, H});
    ops().copy(x, tmp);
    ops().matmul(tmp, router, logits);
    ops().topk_softmax(logits, int(k), true, Tensor(), ids, w);
    ops().group_by(ids, none, 1, int(E), perm, counts, offsets, none);
    ops().moe_experts(tmp, perm, offsets, int(k), experts, y);
    ops().zero(out);
    ops().moe_combine(y, none, w, out);
    ops().attention(qa, kn, kn, kc, vc, sl, ao);
    ops().causal_conv1d_silu(cx, cw, cs, sl, cy);
    ops().gated_delta_rule(cx, g, beta, c.d, rs, sl, ro);
    ops().sample(sl_logits, rows, Draw::target, sampled, probs);
    ops().sample(sl_logits, rows, Draw::target, sampled, none);
    ops().verify_drafts(vlogits, drafts, dprobs, vrows, vout);
    ops().token_logprobs(sl_logits, sampled, lp, tid, tlp);
    be().synchronize();
  };
  pass();
  const Counters before = be().counters();
  pass();
  pass();
  EXPECT_EQ(be().counters().allocations, before.allocations);
  EXPECT_EQ(be().counters().bytes_allocated, before.bytes_allocated);
  EXPECT_EQ(be().counters().uploads, before.uploads) << "a pass of ops uploads nothing";
  EXPECT_EQ(be().counters().downloads, before.downloads);
}

TEST_P(OpConformance, BadShapesThrowNamingTheOp) {
  Tensor x = be().alloc({2, 3}, DType::F32), w = be().alloc({4, 5}, DType::F32), y = be().alloc({2, 4}, DType::F32);
  test::expect_error([&] { ops().matmul(x, w, y); }, {"matmul"});
  Tensor ids = i32({0, 9});
  Tensor ik = be().alloc({2, 1}, DType::I32), wk = be().alloc({2, 1}, DType::F32);
  test::expect_error([&] { ops().topk_softmax(x, 4, true, Tensor(), ik, wk); }, {"topk_softmax"});
  Tensor x4 = be().alloc({2, 4}, DType::F32);
  test::expect_error([&] { ops().topk_softmax(x4, 1, true, i32({1, 1, 1}), ik, wk); }, {"topk_softmax", "routed"});
  test::expect_error([&] { ops().gather_rows(x, ids, 1, x); }, {"gather_rows"});
  {  // k's heads of another size than q's; a rotation wider than the heads
    Tensor qg = be().alloc({2, 1, 8}, DType::F32), q = be().alloc({2, 1, 4}, DType::F32);
    Tensor g = be().alloc({2, 1, 4}, DType::F32), k = be().alloc({2, 1, 6}, DType::F32);
    const Tensor n4 = f32(std::vector<float>(4, 0.0f), {4}), p2 = i32({0, 1});
    test::expect_error([&] { ops().qk_norm_rope(qg, n4, n4, 1e-6f, p2, 2, 1e4, q, g, k); }, {"qk_norm_rope", "k[2, 1, 6]"});
    Tensor k4 = be().alloc({2, 1, 4}, DType::F32);
    test::expect_error([&] { ops().qk_norm_rope(qg, n4, n4, 1e-6f, p2, 6, 1e4, q, g, k4); }, {"qk_norm_rope", "rot 6"});
  }
  Tensor lp = be().alloc({2}, DType::F32), many = be().alloc({2, kMaxTopLogprobs + 1}, DType::I32);
  Tensor many_lp = be().alloc({2, kMaxTopLogprobs + 1}, DType::F32);
  test::expect_error([&] { ops().token_logprobs(x, ids, lp, many, many_lp); }, {"token_logprobs"});
  Tensor counts = i32({0, 0, 0});
  // A bad index is data: a backend that cannot read it on the host reports it at its next wait.
  test::expect_error(
      [&] {
        ops().histogram(ids, counts);
        be().synchronize();
      },
      {"histogram"});
  // Attention: a sequence whose rows reach past its block table.
  HostLayout h;
  h.block_size = 4;
  h.width = 1;
  h.cu = {0, 1};
  h.kv_lens = {6};
  h.block_tables = {0};
  h.slot_mapping = {5};
  Tensor kc = be().alloc({2, 4, 1, 4}, DType::F32), q = be().alloc({1, 1, 4}, DType::F32);
  Tensor o = be().alloc({1, 1, 4}, DType::F32);
  test::expect_error([&] { ops().attention(q, q, q, kc, kc, layout(h), o); }, {"attention"});
}

}  // namespace ballast::kernels::conformance

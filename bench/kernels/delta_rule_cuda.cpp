// The CUDA backend's gated_delta_rule op (chunked WY form for prefill) on inputs written by
// bench/deltanet/side_by_side.py, which runs flash-linear-attention's chunk_gated_delta_rule on
// the same inputs: reads DIR/meta.json (sequence lengths, Hk, Hv, dk, dv) and DIR/{qkv,g,beta}.f32
// (the op's layouts: qkv [T, 2*Hk*dk + Hv*dv] after the conv, g and beta [T, Hv]), runs the op
// from zero states `runs` times, writes DIR/out.f32 [T, Hv, dv] and DIR/ballast.json (device
// time per run of the op alone: median and best). precision: fp32 (3xTF32 products) or bf16 (the
// backend with bf16 matrix products, the default outside the reference tests). The q, k and v rows
// go to the op in the dtype the model gives it (Ops::delta_rule_rows_dtype: bf16 under bf16
// products, rounded here, as flash-linear-attention's bf16 run takes them).
//   bench_delta_rule_cuda DIR [runs] [fp32|bf16]
#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "ballast/core/dtype.h"
#include "ballast/core/error.h"
#include "ballast/kernels/cuda/cuda_backend.h"
#include "ballast/kernels/ops.h"

using namespace ballast;
using namespace ballast::kernels;

namespace {

std::vector<float> read_floats(const std::string& path, size_t n) {
  std::vector<float> v(n);
  std::ifstream f(path, std::ios::binary);
  check(f.good(), "cannot open {}", path);
  f.read(reinterpret_cast<char*>(v.data()), std::streamsize(n * sizeof(float)));
  check(size_t(f.gcount()) == n * sizeof(float), "{}: expected {} floats", path, n);
  return v;
}

}  // namespace

int main(int argc, char** argv) try {
  check(argc >= 2, "usage: bench_delta_rule_cuda DIR [runs] [fp32|bf16]");
  const std::string dir = argv[1];
  const int runs = argc > 2 ? std::atoi(argv[2]) : 20;
  const std::string precision = argc > 3 ? argv[3] : "fp32";
  check(precision == "fp32" || precision == "bf16", "precision {}: fp32 or bf16", precision);
  nlohmann::json meta;
  std::ifstream(dir + "/meta.json") >> meta;
  const std::vector<int> lens = meta["seqs"].get<std::vector<int>>();
  const DeltaRuleDims d{meta["Hk"], meta["Hv"], meta["dk"], meta["dv"]};
  std::vector<int32_t> cu{0};
  for (int n : lens) cu.push_back(cu.back() + n);
  const int64_t T = cu.back(), B = int64_t(lens.size());
  const int64_t C = 2 * int64_t(d.Hk) * d.dk + int64_t(d.Hv) * d.dv;

  CudaBackend be(0, CudaOptions{.bf16_matmul = precision == "bf16"});
  auto upload = [&](const std::vector<float>& v, std::vector<int64_t> shape) {
    Tensor t = be.alloc(std::move(shape), DType::F32);
    be.upload(v.data(), t);
    return t;
  };
  auto upload_i32 = [&](const std::vector<int32_t>& v) {
    Tensor t = be.alloc({int64_t(v.size())}, DType::I32);
    be.upload(v.data(), t);
    return t;
  };
  const DType rows = be.ops().delta_rule_rows_dtype();
  Tensor qkv = be.alloc({T, C}, rows);
  {
    const std::vector<float> q32 = read_floats(dir + "/qkv.f32", size_t(T * C));
    std::vector<uint16_t> q16(rows == DType::BF16 ? q32.size() : 0);
    for (size_t i = 0; i < q16.size(); ++i) q16[i] = f32_to_bf16(q32[i]);
    be.upload(rows == DType::BF16 ? static_cast<const void*>(q16.data()) : q32.data(), qkv);
  }
  Tensor g = upload(read_floats(dir + "/g.f32", size_t(T * d.Hv)), {T, d.Hv});
  Tensor beta = upload(read_floats(dir + "/beta.f32", size_t(T * d.Hv)), {T, d.Hv});
  Tensor states = be.alloc({B, d.Hv, d.dk, d.dv}, DType::F32), out = be.alloc({T, d.Hv, d.dv}, DType::F32);
  std::vector<int32_t> slots(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) slots[size_t(b)] = int32_t(b);
  SeqLayout layout;
  layout.num_seqs = int(B);
  layout.num_tokens = int(T);
  layout.max_query_len = *std::max_element(lens.begin(), lens.end());
  layout.prefill_seqs = int(std::count_if(lens.begin(), lens.end(), [](int n) { return n > 1; }));
  layout.cu_seqlens = upload_i32(cu);
  layout.state_slots = upload_i32(slots);

  std::vector<double> times;
  for (int r = 0; r < runs + 2; ++r) {
    be.ops().zero(states);
    be.start_op_timing();
    be.ops().gated_delta_rule(qkv, g, beta, d, states, layout, out);
    const auto t = be.stop_op_timing();
    if (r >= 2) times.push_back(t.at(0).seconds);  // two warm-up runs
  }
  std::sort(times.begin(), times.end());
  std::vector<float> host(size_t(T * d.Hv * d.dv));
  be.download(out, host.data());
  std::ofstream(dir + "/out.f32", std::ios::binary)
      .write(reinterpret_cast<const char*>(host.data()), std::streamsize(host.size() * sizeof(float)));
  nlohmann::json res = {{"median_ms", times[times.size() / 2] * 1e3},
                        {"best_ms", times[0] * 1e3},
                        {"runs", runs},
                        {"rows", std::string(dtype_name(rows))}};
  std::ofstream(dir + "/ballast.json") << res.dump();
  fmt::print("{}\n", res.dump());
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "error: %s\n", e.what());
  return 1;
}

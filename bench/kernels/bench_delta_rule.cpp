// Gated delta rule on the Qwen3-Next-80B shape (Hk=16, Hv=32, dk=dv=128): chunked (prefill) vs
// recurrent, tokens/s, one thread and a pool. The ratio chunked/recurrent is the figure of merit;
// "GFLOP/s" counts the recurrence's 7*dk*dv flops per head per token (useful work, either form),
// to set beside the core's peak.
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "ballast/core/thread_pool.h"
#include "ballast/kernels/cpu/gated_delta_rule.h"

using namespace ballast;
using namespace ballast::kernels::cpu;

namespace {

struct Data {
  DeltaRuleShape s;
  std::vector<float> q, k, v, g, beta, state, out;
  explicit Data(int T) : s{T, 16, 32, 128, 128} {
    std::mt19937 rng(1);
    std::normal_distribution<float> nd(0.f, 1.f);
    std::uniform_real_distribution<float> gd(-3.f, 0.f), bd(0.f, 1.f);
    auto fill = [&](std::vector<float>& x, size_t n, auto& d) {
      x.resize(n);
      for (auto& e : x) e = d(rng);
    };
    fill(q, size_t(T) * s.Hk * s.dk, nd);
    fill(k, size_t(T) * s.Hk * s.dk, nd);
    fill(v, size_t(T) * s.Hv * s.dv, nd);
    fill(g, size_t(T) * s.Hv, gd);
    fill(beta, size_t(T) * s.Hv, bd);
    fill(state, size_t(s.Hv) * s.dk * s.dv, nd);
    out.assign(size_t(T) * s.Hv * s.dv, 0.f);
  }
  void run(bool chunked, ThreadPool* pool) {
    const int64_t lk = int64_t(s.Hk) * s.dk, lv = int64_t(s.Hv) * s.dv;
    if (chunked)
      gated_delta_rule_chunked(s, q.data(), lk, k.data(), lk, v.data(), lv, g.data(), beta.data(), state.data(),
                               out.data(), lv, pool);
    else
      gated_delta_rule_recurrent(s, q.data(), lk, k.data(), lk, v.data(), lv, g.data(), beta.data(), state.data(),
                                 out.data(), lv, pool);
  }
};

// range(0): T; range(1): 1 = chunked; range(2): threads (1 = no pool).
void BM_DeltaRule(benchmark::State& st) {
  const int T = int(st.range(0));
  const bool chunked = st.range(1) != 0;
  const int threads = int(st.range(2));
  Data d(T);
  std::unique_ptr<ThreadPool> pool;
  if (threads > 1) pool = std::make_unique<ThreadPool>(threads);
  for (auto _ : st) {
    d.run(chunked, pool.get());
    benchmark::DoNotOptimize(d.out.data());
    benchmark::ClobberMemory();
  }
  const double tokens = double(T) * double(st.iterations());
  st.counters["tokens/s"] = benchmark::Counter(tokens, benchmark::Counter::kIsRate);
  st.counters["GFLOP/s"] =
      benchmark::Counter(tokens * d.s.Hv * 7.0 * d.s.dk * d.s.dv * 1e-9, benchmark::Counter::kIsRate);
  st.SetLabel(std::string(chunked ? "chunked" : "recurrent") + " threads=" + std::to_string(threads));
}

const int kThreads = int(std::max(1u, std::thread::hardware_concurrency()));

BENCHMARK(BM_DeltaRule)
    ->ArgNames({"T", "chunked", "threads"})
    ->Args({512, 1, 1})
    ->Args({512, 0, 1})
    ->Args({512, 1, kThreads})
    ->Args({512, 0, kThreads})
    ->Args({1, 0, 1})  // one decode step
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace

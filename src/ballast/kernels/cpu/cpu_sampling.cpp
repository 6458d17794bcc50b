// CpuOps: drawing tokens from logits rows and verifying drafts, with the host math of sampling.h
// (which every backend shares, so that a GPU draws the same tokens).
#include <algorithm>
#include <span>

#include "ballast/core/error.h"
#include "ballast/kernels/cpu/cpu_ops.h"
#include "ballast/kernels/cpu/op_support.h"
#include "ballast/kernels/op_checks.h"
#include "ballast/kernels/sampling.h"

namespace ballast::kernels {

using namespace cpu;

namespace {

// The per-row sampling parameters (temperature, top_p, top_k, seed, position [R], their shapes
// checked already), their values checked.
struct RowParams {
  const float* temperature;
  const float* top_p;
  const int32_t* top_k;
  const int64_t* seed;
  const int32_t* position;

  bool greedy(int64_t r) const { return temperature[r] <= 0.0f; }
  double uniform(int64_t r, Draw stream) const { return kernels::uniform(uint64_t(seed[r]), position[r], stream); }
  // The distribution row r is drawn from, into `out`.
  void distribution(int64_t r, std::span<const float> logits, std::span<float> out) const {
    kernels::distribution(logits, temperature[r], top_p[r], top_k[r], out);
  }
};

RowParams row_params(const char* op, const SamplingRows& rows, int64_t R) {
  const RowParams p{f32(rows.temperature), f32(rows.top_p), i32(rows.top_k),
                    static_cast<const int64_t*>(rows.seed.raw()), i32(rows.position)};
  // distribution() checks these too, but on a worker thread a throw cannot be reported.
  for (int64_t r = 0; r < R; ++r)
    check(p.greedy(r) || (p.top_p[r] > 0.0f && p.top_p[r] <= 1.0f && p.top_k[r] >= 0),
          "{}: row {} has top_p {} (must be in (0, 1]) and top_k {} (must be >= 0)", op, r, p.top_p[r], p.top_k[r]);
  return p;
}

}  // namespace

void CpuOps::sample(const Tensor& logits, const SamplingRows& rows, Draw stream, Tensor& ids, Tensor& probs) {
  auto timed = time_op("sample");
  const auto [R, V] = check_sample(logits, rows, ids, probs);
  const RowParams params = row_params("sample", rows, R);
  // Without `probs`, each worker keeps the distribution of its row in scratch.
  float* scratch = probs.defined() ? nullptr : sampling_scratch_.floats(size_t(workers(&pool_, R, 1) * V));
  const float* lp = f32(logits);
  int32_t* out = i32_mut(ids);
  parallel_workers(&pool_, R, 1, [&, V = V](int worker, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const std::span<const float> row(lp + r * V, size_t(V));
      float* dist = probs.defined() ? f32_mut(probs) + r * V : scratch + worker * V;
      if (params.greedy(r)) {
        out[r] = argmax(row);
        if (probs.defined()) {
          std::fill(dist, dist + V, 0.0f);
          dist[out[r]] = 1.0f;
        }
        continue;
      }
      params.distribution(r, row, std::span<float>(dist, size_t(V)));
      out[r] = kernels::sample(std::span<const float>(dist, size_t(V)), params.uniform(r, stream));
    }
  });
}

void CpuOps::verify_drafts(const Tensor& logits, const Tensor& drafts, const Tensor& draft_probs,
                           const SamplingRows& rows, Tensor& out) {
  auto timed = time_op("verify_drafts");
  const auto [B, S, V] = check_verify_drafts(logits, drafts, draft_probs, rows, out);
  const RowParams params = row_params("verify_drafts", rows, B * (S + 1));
  const int32_t* d = i32(drafts);
  bool samples = false;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < S; ++i) {
      check(d[b * S + i] >= 0 && d[b * S + i] < V, "verify_drafts: drafts[{}][{}] = {} not in [0, {})", b, i,
            d[b * S + i], V);
      samples = samples || !params.greedy(b * (S + 1) + i);
    }
  // A defined draft_probs is checked already; a row that samples reads it.
  check(!samples || draft_probs.defined(), "verify_drafts: draft_probs is not defined");
  float* scratch = sampling_scratch_.floats(size_t(workers(&pool_, B, 1) * std::max<int64_t>(V, 1)));
  const float* lp = f32(logits);
  int32_t* op = i32_mut(out);
  parallel_workers(&pool_, B, 1, [&, S = S, V = V](int worker, int64_t b0, int64_t b1) {
    const std::span<float> p(scratch + worker * V, size_t(V));
    for (int64_t b = b0; b < b1; ++b) {
      const auto row = [&, V = V](int64_t r) { return std::span<const float>(lp + r * V, size_t(V)); };
      int64_t a = 0;
      int32_t correction = -1;
      for (; a < S; ++a) {
        const int64_t r = b * (S + 1) + a;
        const int32_t draft = d[b * S + a];
        if (params.greedy(r)) {
          if (draft != argmax(row(r))) break;  // the extra token below is then this row's argmax
          continue;
        }
        params.distribution(r, row(r), p);
        const std::span<const float> q(f32(draft_probs) + (b * S + a) * V, size_t(V));
        const Acceptance acc = accept_or_resample(p, q, draft, params.uniform(r, Draw::accept),
                                                  params.uniform(r, Draw::residual));
        if (!acc.accepted) {
          correction = acc.token;
          break;
        }
      }
      int32_t extra = correction;
      if (extra < 0) {
        const int64_t r = b * (S + 1) + a;
        if (params.greedy(r)) {
          extra = argmax(row(r));
        } else {
          params.distribution(r, row(r), p);
          extra = kernels::sample(p, params.uniform(r, Draw::target));
        }
      }
      int32_t* o = op + b * (S + 2);
      o[0] = int32_t(a);
      for (int64_t i = 0; i < a; ++i) o[1 + i] = d[b * S + i];
      o[1 + a] = extra;
      std::fill(o + 2 + a, o + S + 2, -1);
    }
  });
}

void CpuOps::draft_inputs(const Tensor& verdicts, Tensor& tokens, Tensor& last_rows, Tensor& routed) {
  auto timed = time_op("draft_inputs");
  const auto [B, S] = check_draft_inputs(verdicts, tokens, last_rows, routed);
  const int32_t* v = i32(verdicts);
  int32_t* t = i32_mut(tokens);
  int32_t* last = i32_mut(last_rows);
  int32_t* r = routed.defined() ? i32_mut(routed) : nullptr;
  for (int64_t b = 0; b < B; ++b, v += S + 2) {
    const int64_t a = v[0];
    check(a >= 0 && a <= S && v[1 + a] >= 0,
          "draft_inputs: verdict {} ({} accepted of {}, then {}) is not one of verify_drafts'", b, a, S,
          a >= 0 && a <= S ? v[1 + a] : -1);
    for (int64_t i = 0; i <= S; ++i) t[b * (S + 1) + i] = v[1 + std::min(i, a)];
    if (r)
      for (int64_t i = 0; i <= S; ++i) r[b * (S + 1) + i] = i <= a;
    last[b] = int32_t(b * (S + 1) + a);
  }
}

}  // namespace ballast::kernels

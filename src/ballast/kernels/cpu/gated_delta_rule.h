#pragma once
// Gated delta rule (the recurrence of Gated DeltaNet, docs/model.md), one sequence at a time.
//
// Per value head h (key head h / (Hv/Hk)), with q, k L2-normalised (x / sqrt(sum x^2 + 1e-6),
// as transformers' l2norm for qwen3_next) and q scaled by dk^-0.5, state S in R^{dk x dv}:
//   S <- exp(g_t) S;   S <- S + k_t (beta_t (v_t - S^T k_t))^T;   o_t = S^T q_t.
#include <cstdint>

namespace ballast {
class ThreadPool;
}

namespace ballast::kernels::cpu {

struct DeltaRuleShape {
  int T, Hk, Hv, dk, dv;  // value head h uses key head h / (Hv/Hk)
};

// q, k: [T, Hk, dk] raw (after conv + SiLU), row stride ldq / ldk (floats) per step;
//       normalised and scaled inside.
// v:    [T, Hv, dv], row stride ldv.
// g:    [T, Hv] log-decay (<= 0), contiguous.   beta: [T, Hv], contiguous.
// state:[Hv, dk, dv] fp32, read and updated in place.
// out:  [T, Hv, dv], row stride ldo. Must not alias the inputs.
// pool may be null (single thread); work is split over value heads.
void gated_delta_rule_recurrent(const DeltaRuleShape& s, const float* q, int64_t ldq, const float* k,
                                int64_t ldk, const float* v, int64_t ldv, const float* g, const float* beta,
                                float* state, float* out, int64_t ldo, ThreadPool* pool);

// The same function computed in the chunked (WY / UT-transform) form, `chunk` steps at a time
// (the last chunk may be shorter); used for prefill. Agrees with the recurrent form to rounding.
void gated_delta_rule_chunked(const DeltaRuleShape& s, const float* q, int64_t ldq, const float* k,
                              int64_t ldk, const float* v, int64_t ldv, const float* g, const float* beta,
                              float* state, float* out, int64_t ldo, ThreadPool* pool, int chunk = 64);

}  // namespace ballast::kernels::cpu

// CpuOps: the stateful Gated DeltaNet ops over state pools (causal conv1d, gated delta rule), one
// sequence at a time through the single-sequence kernels; and snapshot mode for verification.
#include <algorithm>
#include <cstring>

#include "ballast/core/error.h"
#include "ballast/kernels/cpu/causal_conv1d.h"
#include "ballast/kernels/cpu/cpu_ops.h"
#include "ballast/kernels/cpu/gated_delta_rule.h"
#include "ballast/kernels/cpu/op_support.h"

namespace ballast::kernels {

using namespace cpu;

namespace {

// Below this many rows a sequence is decode or verification work, too little to split over the pool.
constexpr int64_t kFewRows = 16;

// The rows, own slot and (verifying) snapshot slots of every sequence, checked against a pool of
// `slots` states before any is touched (the per-sequence work may run on workers, which cannot
// throw).
struct Sequences {
  int B = 0;
  const int32_t* cu = nullptr;
  const int32_t* slot = nullptr;
  const int32_t* snapshots = nullptr;  // [B, W'] or null
  int64_t snapshot_width = 0;

  int64_t first(int b) const { return cu[b]; }
  int64_t rows(int b) const { return cu[b + 1] - cu[b]; }
  // b's snapshot slots, or null when b is not verifying.
  const int32_t* snapshots_of(int b) const {
    return snapshots && snapshots[b * snapshot_width] >= 0 ? snapshots + b * snapshot_width : nullptr;
  }
};

Sequences sequences_of(const char* op, const SeqLayout& layout, int64_t T, int64_t slots) {
  Sequences s;
  s.B = layout.num_seqs;
  check(layout.num_tokens == T && s.B >= 0, "{}: layout of {} rows in {} sequences for {} rows", op, layout.num_tokens,
        s.B, T);
  if (s.B == 0) {
    check(T == 0, "{}: {} rows and no sequences", op, T);
    return s;
  }
  expect(op, "cu_seqlens", layout.cu_seqlens, DType::I32, s.B + 1);
  expect(op, "state_slots", layout.state_slots, DType::I32, s.B);
  s.cu = i32(layout.cu_seqlens);
  s.slot = i32(layout.state_slots);
  check(s.cu[0] == 0 && s.cu[s.B] == T, "{}: cu_seqlens runs from {} to {}, expected 0 to {}", op, s.cu[0], s.cu[s.B],
        T);
  if (layout.snapshot_slots.defined()) {
    expect(op, "snapshot_slots", layout.snapshot_slots, DType::I32);
    check(layout.snapshot_slots.rank() == 2 && layout.snapshot_slots.dim(0) == s.B,
          "{}: snapshot_slots {} for {} sequences", op, layout.snapshot_slots, s.B);
    s.snapshots = i32(layout.snapshot_slots);
    s.snapshot_width = layout.snapshot_slots.dim(1);
  }
  for (int b = 0; b < s.B; ++b) {
    check(s.rows(b) >= 0, "{}: sequence {} has {} rows", op, b, s.rows(b));
    check(s.slot[b] >= 0 && s.slot[b] < slots, "{}: state_slots[{}] = {} not in [0, {})", op, b, s.slot[b], slots);
    if (const int32_t* snap = s.snapshots_of(b)) {
      check(s.rows(b) <= s.snapshot_width, "{}: sequence {} verifies {} rows with {} snapshot slots", op, b, s.rows(b),
            s.snapshot_width);
      for (int64_t i = 0; i < s.rows(b); ++i)
        check(snap[i] >= 0 && snap[i] < slots, "{}: snapshot_slots[{}][{}] = {} not in [0, {})", op, b, i, snap[i],
              slots);
    }
  }
  return s;
}

// Snapshot mode, row i of a verifying sequence: the state before it (the own slot's for i = 0,
// else snapshot i-1) is copied to snapshot i, which the row then advances in place.
float* snapshot_state(float* states, size_t state_size, int32_t own, const int32_t* snap, int64_t i) {
  const int32_t src = i == 0 ? own : snap[i - 1];
  float* dst = states + size_t(snap[i]) * state_size;
  if (src != snap[i]) std::memcpy(dst, states + size_t(src) * state_size, state_size * sizeof(float));
  return dst;
}

}  // namespace

template <typename Fn>
void CpuOps::for_each_sequence(const int32_t* cu, int B, const Fn& fn) {
  const auto rows = [&](int b) { return int64_t(cu[b + 1]) - cu[b]; };
  int64_t few = 0;
  for (int b = 0; b < B; ++b) few += rows(b) <= kFewRows;
  const bool side_by_side = pool_.size() > 1 && few >= pool_.size();
  for (int b = 0; b < B; ++b)
    if (!side_by_side || rows(b) > kFewRows) fn(b, &pool_);
  if (side_by_side)
    parallel(&pool_, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        if (rows(int(b)) <= kFewRows) fn(int(b), nullptr);
    });
}

void CpuOps::causal_conv1d_silu(const Tensor& x, const Tensor& weight, Tensor& states, const SeqLayout& layout,
                                Tensor& out) {
  check(x.rank() == 2 && weight.rank() == 2 && states.rank() == 3,
        "causal_conv1d_silu: x{} weight{} states{} should be [T, C], [C, kc], [slots, C, kc-1]", x, weight, states);
  const int64_t T = x.dim(0), C = x.dim(1), kc = weight.dim(1);
  check(C > 0 && weight.dim(0) == C && kc >= 1 && kc <= 16 && states.dim(1) == C && states.dim(2) == kc - 1 &&
            out.shape() == x.shape(),
        "causal_conv1d_silu: x{} weight{} states{} out{} do not agree (kernel size in [1, 16])", x, weight, states,
        out);
  for (const Tensor* t : std::initializer_list<const Tensor*>{&x, &weight, &states, &out})
    check(t->dtype() == DType::F32, "causal_conv1d_silu: tensor {} is {}, expected F32", *t, dtype_name(t->dtype()));
  const Sequences seqs = sequences_of("causal_conv1d_silu", layout, T, states.dim(0));
  const size_t state_size = size_t(C * (kc - 1));
  const float* xp = f32(x);
  const float* wp = f32(weight);
  float* sp = f32_mut(states);
  float* op = f32_mut(out);
  for_each_sequence(seqs.cu, seqs.B, [&](int b, ThreadPool* pool) {
    const int64_t t0 = seqs.first(b), n = seqs.rows(b);
    if (const int32_t* snap = seqs.snapshots_of(b)) {
      for (int64_t i = 0; i < n; ++i) {
        float* state = snapshot_state(sp, state_size, seqs.slot[b], snap, i);
        cpu::causal_conv1d_silu(xp + (t0 + i) * C, C, 1, int(C), wp, int(kc), state, op + (t0 + i) * C, C, pool);
      }
      return;
    }
    cpu::causal_conv1d_silu(xp + t0 * C, C, int(n), int(C), wp, int(kc), sp + size_t(seqs.slot[b]) * state_size,
                            op + t0 * C, C, pool);
  });
}

void CpuOps::gated_delta_rule(const Tensor& qkv, const Tensor& g, const Tensor& beta, const DeltaRuleDims& d,
                              Tensor& states, const SeqLayout& layout, Tensor& out) {
  check(d.Hk > 0 && d.Hv > 0 && d.dk > 0 && d.dv > 0 && d.Hv % d.Hk == 0,
        "gated_delta_rule: bad dims Hk={} Hv={} dk={} dv={}", d.Hk, d.Hv, d.dk, d.dv);
  const int64_t kd = int64_t(d.Hk) * d.dk, vd = int64_t(d.Hv) * d.dv;
  check(qkv.rank() == 2 && qkv.dim(1) == 2 * kd + vd, "gated_delta_rule: qkv{} for Hk={} dk={} Hv={} dv={}", qkv,
        d.Hk, d.dk, d.Hv, d.dv);
  const int64_t T = qkv.dim(0);
  check(g.numel() == T * d.Hv && beta.numel() == T * d.Hv && out.numel() == T * vd && out.rank() >= 1 &&
            out.dim(0) == T,
        "gated_delta_rule: qkv{} g{} beta{} out{} do not agree (Hv={}, dv={})", qkv, g, beta, out, d.Hv, d.dv);
  check(states.rank() == 4 && states.dim(1) == d.Hv && states.dim(2) == d.dk && states.dim(3) == d.dv,
        "gated_delta_rule: states {} should be [slots, {}, {}, {}]", states, d.Hv, d.dk, d.dv);
  for (const Tensor* t : std::initializer_list<const Tensor*>{&qkv, &g, &beta, &states, &out})
    check(t->dtype() == DType::F32, "gated_delta_rule: tensor {} is {}, expected F32", *t, dtype_name(t->dtype()));
  const Sequences seqs = sequences_of("gated_delta_rule", layout, T, states.dim(0));
  const size_t state_size = size_t(d.Hv) * d.dk * d.dv;
  const int64_t ld = qkv.dim(1);
  const float* base = f32(qkv);
  float* sp = f32_mut(states);
  for_each_sequence(seqs.cu, seqs.B, [&](int b, ThreadPool* pool) {
    const int64_t t0 = seqs.first(b), n = seqs.rows(b);
    // Rows [t0 + i, t0 + i + steps) from `state`.
    auto run = [&](int64_t i, int64_t steps, float* state, bool chunked) {
      const cpu::DeltaRuleShape s{int(steps), d.Hk, d.Hv, d.dk, d.dv};
      const float* q = base + (t0 + i) * ld;
      const float* gt = f32(g) + (t0 + i) * d.Hv;
      const float* bt = f32(beta) + (t0 + i) * d.Hv;
      float* o = f32_mut(out) + (t0 + i) * vd;
      if (chunked)
        cpu::gated_delta_rule_chunked(s, q, ld, q + kd, ld, q + 2 * kd, ld, gt, bt, state, o, vd, pool);
      else
        cpu::gated_delta_rule_recurrent(s, q, ld, q + kd, ld, q + 2 * kd, ld, gt, bt, state, o, vd, pool);
    };
    if (const int32_t* snap = seqs.snapshots_of(b)) {
      for (int64_t i = 0; i < n; ++i) run(i, 1, snapshot_state(sp, state_size, seqs.slot[b], snap, i), false);
      return;
    }
    if (n > 0) run(0, n, sp + size_t(seqs.slot[b]) * state_size, n > 1);
  });
}

}  // namespace ballast::kernels

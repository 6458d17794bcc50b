// CpuOps: the stateful Gated DeltaNet ops over state pools (causal conv1d, gated delta rule), one
// sequence at a time through the single-sequence kernels; and snapshot mode for verification.
#include <algorithm>
#include <cstring>

#include "ballast/core/dtype.h"
#include "ballast/core/error.h"
#include "ballast/kernels/cpu/causal_conv1d.h"
#include "ballast/kernels/cpu/cpu_ops.h"
#include "ballast/kernels/cpu/gated_delta_rule.h"
#include "ballast/kernels/cpu/op_support.h"
#include "ballast/kernels/op_checks.h"

namespace ballast::kernels {

using namespace cpu;

namespace {

// Below this many rows a sequence is decode or verification work, too little to split over the pool.
constexpr int64_t kFewRows = 16;

// The rows, own slot and (verifying) snapshot slots of every sequence, their data checked against
// a pool of `slots` states before any is touched (the per-sequence work may run on workers, which
// cannot throw).
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

// The layout's shapes are checked already (op_checks.h); B = 0 reads none of its tensors.
Sequences sequences_of(const char* op, const SeqLayout& layout, int64_t T, int64_t slots) {
  Sequences s;
  s.B = layout.num_seqs;
  if (s.B == 0) return s;
  s.cu = i32(layout.cu_seqlens);
  s.slot = i32(layout.state_slots);
  check(s.cu[0] == 0 && s.cu[s.B] == T, "{}: cu_seqlens runs from {} to {}, expected 0 to {}", op, s.cu[0], s.cu[s.B],
        T);
  if (layout.snapshot_slots.defined()) {
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
  auto timed = time_op("causal_conv1d_silu");
  const ConvShape shape = check_causal_conv1d_silu(x, weight, states, layout, out);
  const int64_t C = shape.C, kc = shape.kc;
  const Sequences seqs = sequences_of("causal_conv1d_silu", layout, shape.T, shape.slots);
  const size_t state_size = size_t(C * (kc - 1));
  const float* xp = f32(x);
  const float* wp = f32(weight);
  float* sp = f32_mut(states);
  // BF16 out: the fp32 sums in scratch, rounded into out at the end.
  const bool bf16_out = out.dtype() == DType::BF16;
  float* op = bf16_out ? rows_scratch_.floats(size_t(shape.T * C)) : f32_mut(out);
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
  if (bf16_out) {
    uint16_t* o16 = static_cast<uint16_t*>(out.raw());
    parallel(&pool_, shape.T * C, 1 << 14, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) o16[i] = f32_to_bf16(op[i]);
    });
  }
}

void CpuOps::gated_delta_rule(const Tensor& qkv, const Tensor& g, const Tensor& beta, const DeltaRuleDims& d,
                              Tensor& states, const SeqLayout& layout, Tensor& out) {
  auto timed = time_op("gated_delta_rule");
  const GatedDeltaRuleShape shape = check_gated_delta_rule(qkv, g, beta, d, states, layout, out);
  const int64_t kd = shape.kd, vd = shape.vd;
  const Sequences seqs = sequences_of("gated_delta_rule", layout, shape.T, shape.slots);
  const size_t state_size = size_t(d.Hv) * d.dk * d.dv;
  const int64_t ld = qkv.dim(1);
  // BF16 rows are widened (exactly) into scratch first.
  const float* base = f32(qkv);
  if (qkv.dtype() == DType::BF16) {
    float* wide = rows_scratch_.floats(size_t(qkv.numel()));
    const uint16_t* q16 = static_cast<const uint16_t*>(qkv.raw());
    parallel(&pool_, qkv.numel(), 1 << 14,
             [&](int64_t i0, int64_t i1) { to_f32(q16 + i0, DType::BF16, wide + i0, size_t(i1 - i0)); });
    base = wide;
  }
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

#include "ballast/kernels/op_checks.h"

#include <algorithm>
#include <cmath>

#include "ballast/core/error.h"

namespace ballast::kernels {

void expect(const char* op, const char* name, const Tensor& t, DType dtype, int64_t numel) {
  check(t.defined(), "{}: {} is not defined", op, name);
  check(t.dtype() == dtype, "{}: {} {} is {}, expected {}", op, name, t, dtype_name(t.dtype()), dtype_name(dtype));
  check(numel < 0 || t.numel() == numel, "{}: {} {} should have {} elements", op, name, t, numel);
}

namespace {
// The DeltaNet's conv rows (Ops::delta_rule_rows_dtype): F32 or BF16.
void expect_rows(const char* op, const char* name, const Tensor& t) {
  check(t.defined(), "{}: {} is not defined", op, name);
  check(t.dtype() == DType::F32 || t.dtype() == DType::BF16, "{}: {} {} is {}, expected F32 or BF16", op, name, t,
        dtype_name(t.dtype()));
}
}  // namespace

bool is_weight_dtype(DType dtype) {
  return dtype == DType::F32 || dtype == DType::BF16 || dtype == DType::F16 || dtype == DType::F8_E4M3;
}

void expect_weight(const char* op, const char* name, const Tensor& t, int64_t numel) {
  check(t.defined(), "{}: {} is not defined", op, name);
  check(is_weight_dtype(t.dtype()), "{}: {} {} is {}, expected F32, BF16, F16 or F8_E4M3", op, name, t,
        dtype_name(t.dtype()));
  check(numel < 0 || t.numel() == numel, "{}: {} {} should have {} elements", op, name, t, numel);
}

void expect_matrix_weight(const char* op, const char* name, const Tensor& t) {
  check(t.defined() || t.numel() == 0, "{}: {} is not defined", op, name);
  if (t.dtype() != DType::F8_E4M3_B128) return expect_weight(op, name, t);
  check(t.rank() == 2, "{}: block-scaled {} {} is not a matrix", op, name, t);
  const Tensor& s = t.scales();
  check(s.dtype() == DType::F32 && s.rank() == 2 && s.dim(0) == scale_blocks(t.dim(0)) &&
            s.dim(1) == scale_blocks(t.dim(1)) && s.device() == t.device() && (s.defined() || s.numel() == 0),
        "{}: {} {} has block scales {} {}: expected F32 [{}, {}] on its device", op, name, t, s, dtype_name(s.dtype()),
        scale_blocks(t.dim(0)), scale_blocks(t.dim(1)));
}

namespace {

// The number of sequences B of a layout over T rows (0: no sequences, and then no rows).
int check_layout_rows(const char* op, const SeqLayout& layout, int64_t T) {
  const int B = layout.num_seqs;
  check(layout.num_tokens == T && B >= 0, "{}: layout of {} rows in {} sequences for {} rows", op, layout.num_tokens,
        B, T);
  if (B == 0) check(T == 0, "{}: {} rows and no sequences", op, T);
  return B;
}

// The sequences of a DeltaNet op's layout over T rows: their rows and state slots. Returns B.
int check_state_sequences(const char* op, const SeqLayout& layout, int64_t T) {
  const int B = check_layout_rows(op, layout, T);
  if (B == 0) return 0;
  expect(op, "cu_seqlens", layout.cu_seqlens, DType::I32, B + 1);
  expect(op, "state_slots", layout.state_slots, DType::I32, B);
  if (layout.snapshot_slots.defined()) {
    expect(op, "snapshot_slots", layout.snapshot_slots, DType::I32);
    check(layout.snapshot_slots.rank() == 2 && layout.snapshot_slots.dim(0) == B,
          "{}: snapshot_slots {} for {} sequences", op, layout.snapshot_slots, B);
  }
  check(layout.max_query_len >= 0 && layout.max_query_len <= std::max<int64_t>(T, 0),
        "{}: layout max_query_len {} for {} rows", op, layout.max_query_len, T);
  return B;
}

// The per-row sampling parameters of R rows.
void check_sampling_rows(const char* op, const SamplingRows& rows, int64_t R) {
  expect(op, "temperature", rows.temperature, DType::F32, R);
  expect(op, "top_p", rows.top_p, DType::F32, R);
  expect(op, "top_k", rows.top_k, DType::I32, R);
  expect(op, "seed", rows.seed, DType::I64, R);
  expect(op, "position", rows.position, DType::I32, R);
}

}  // namespace

// --- rows and elementwise ---

EmbeddingShape check_embedding(const Tensor& ids, const Tensor& table, const Tensor& out) {
  expect("embedding", "ids", ids, DType::I32);
  const int64_t T = ids.numel();
  check(table.rank() == 2, "embedding: table {} is not [V, H]", table);
  expect_weight("embedding", "table", table);
  const int64_t V = table.dim(0), H = table.dim(1);
  expect("embedding", "out", out, DType::F32, T * H);
  check(out.rank() == 2 && out.dim(0) == T, "embedding: out {} for {} ids of width {}", out, T, H);
  return {T, V, H};
}

MatmulShape check_matmul(const Tensor& x, const Tensor& w, const Tensor& y) {
  check(x.rank() == 2 && w.rank() == 2 && y.rank() == 2, "matmul: expected 2-d tensors, got x{} w{} y{}", x, w, y);
  const int64_t T = x.dim(0), K = x.dim(1), N = w.dim(0);
  check(w.dim(1) == K && y.dim(0) == T && y.dim(1) == N, "matmul: shapes x{} w{} y{} do not agree", x, w, y);
  check(x.dtype() == DType::F32 && y.dtype() == DType::F32, "matmul: x{} and y{} must be F32", x, y);
  expect_matrix_weight("matmul", "w", w);
  return {T, K, N};
}

RowShape check_rms_norm(const Tensor& x, const Tensor& w, const Tensor& y) {
  check(x.rank() >= 1, "rms_norm: x {} has no dimensions", x);
  const int64_t D = x.dim(-1), R = D > 0 ? x.numel() / D : 0;
  check(w.numel() == D && y.numel() == x.numel() && x.dtype() == DType::F32 && y.dtype() == DType::F32,
        "rms_norm: x{} w{} y{}", x, w, y);
  expect_weight("rms_norm", "w", w);
  return {R, D};
}

void check_add(const Tensor& y, const Tensor& x) {
  check(y.numel() == x.numel() && y.dtype() == DType::F32 && x.dtype() == DType::F32, "add: y{} x{}", y, x);
}

void check_matmul_many(std::span<const Tensor> w, std::span<Tensor> y) {
  check(w.size() == y.size(), "matmul_many: {} weights for {} outputs", w.size(), y.size());
}

namespace {
bool overlap(const Tensor& a, const Tensor& b) {
  const char *a0 = static_cast<const char*>(a.raw()), *b0 = static_cast<const char*>(b.raw());
  return a.nbytes() > 0 && b.nbytes() > 0 && a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}
}  // namespace

RowShape check_add_rms_norm(const Tensor& x, const Tensor& d, const Tensor& w, const Tensor& y) {
  check_add(x, d);
  const RowShape shape = check_rms_norm(x, w, y);
  check(!overlap(y, x) && !overlap(y, d), "add_rms_norm: y{} overlaps x{} or d{}", y, x, d);
  return shape;
}

RowShape check_matmul_many_normed(const PendingNorm& n, const Tensor& h, std::span<const Tensor> w, std::span<Tensor> y) {
  check(n.s.defined() && n.s.rank() == 2 && n.s.dtype() == DType::F32, "matmul_many_normed: the rows {} are not F32 [T, H]",
        n.s);
  const int64_t T = n.s.dim(0), H = n.s.dim(1);
  check(n.parts >= 0, "matmul_many_normed: {} partial sums", n.parts);
  if (n.parts > 0)
    check(n.sums.defined() && n.sums.rank() == 2 && n.sums.dtype() == DType::F32 && n.sums.dim(0) == T &&
              n.sums.dim(1) >= n.parts,
          "matmul_many_normed: sums {} do not hold {} partial sums for {} rows", n.sums, n.parts, T);
  if (h.defined())
    check(h.dtype() == DType::F32 && h.numel() == T * H && (h.raw() == n.s.raw() ? n.parts == 0 : !overlap(h, n.s)),
          "matmul_many_normed: h{} is not F32 [{}, {}] apart from the rows{}", h, T, H, n.s);
  check_matmul_many(w, y);
  for (size_t i = 0; i < w.size(); ++i) check_matmul(n.s, w[i], y[i]);
  return {T, H};
}

RowShape check_add_norm(const char* op, const AddNorm& then, const Tensor& d, int64_t parts) {
  const RowShape shape = check_add_rms_norm(then.x, d, then.w, then.h);
  check(then.sums.defined() && then.sums.rank() == 2 && then.sums.dtype() == DType::F32 &&
            then.sums.dim(0) == shape.rows && then.sums.dim(1) >= parts,
        "{}: the norm's sums {} do not hold {} partial sums for {} rows", op, then.sums, parts, shape.rows);
  return shape;
}

RowShape check_matmul_add_norm(const Tensor& o, const Tensor& w_out, const Tensor& d, const AddNorm& then,
                               int64_t parts) {
  check_matmul(o, w_out, d);
  const RowShape shape = check_add_norm("matmul_add_norm", then, d, parts);
  check(!overlap(o, then.x) && !overlap(o, d) && !overlap(then.x, d) && !overlap(then.h, o),
        "matmul_add_norm: o{}, x{}, d{} and h{} overlap", o, then.x, d, then.h);
  return shape;
}

void check_copy(const Tensor& src, const Tensor& dst) {
  check(src.nbytes() == dst.nbytes(), "copy: src {} {} and dst {} {} differ in size", src, dtype_name(src.dtype()),
        dst, dtype_name(dst.dtype()));
}

ConcatShape check_concat_cols(const Tensor& a, const Tensor& b, const Tensor& out) {
  check(a.rank() == 2 && b.rank() == 2 && out.rank() == 2, "concat_cols: a{} b{} out{} must be 2-d", a, b, out);
  const int64_t T = a.dim(0), A = a.dim(1), B = b.dim(1);
  check(b.dim(0) == T && out.dim(0) == T && out.dim(1) == A + B && a.dtype() == DType::F32 &&
            b.dtype() == DType::F32 && out.dtype() == DType::F32,
        "concat_cols: a{} b{} out{}", a, b, out);
  return {T, A, B};
}

void check_fill_uniform(const Tensor& t, float scale) {
  check(t.defined() && (t.dtype() == DType::F32 || t.dtype() == DType::BF16 || t.dtype() == DType::F16 ||
                        t.dtype() == DType::F8_E4M3),
        "fill_uniform: t{} must be F32, BF16, F16 or F8_E4M3", t);
  check(std::isfinite(scale), "fill_uniform: scale {} is not finite", scale);
}

void check_silu_mul(const Tensor& gate, const Tensor& up, const Tensor& out) {
  check(gate.numel() == up.numel() && out.numel() == gate.numel() && gate.dtype() == DType::F32 &&
            up.dtype() == DType::F32 && out.dtype() == DType::F32,
        "silu_mul: gate{} up{} out{}", gate, up, out);
}

void check_mul_sigmoid(const Tensor& x, const Tensor& gate) {
  check(x.numel() == gate.numel() && x.dtype() == DType::F32 && gate.dtype() == DType::F32,
        "mul_sigmoid: x{} gate{}", x, gate);
}

RowShape check_scale_rows_sigmoid(const Tensor& y, const Tensor& s) {
  check(y.rank() >= 1 && y.dtype() == DType::F32, "scale_rows_sigmoid: y {} must be F32 rows", y);
  const int64_t T = y.dim(0), D = T > 0 ? y.numel() / T : 0;
  expect("scale_rows_sigmoid", "s", s, DType::F32, T);
  return {T, D};
}

MatmulShape check_swiglu_down(const Tensor& gate, const Tensor& up, const Tensor& w, const Tensor& row_gate,
                              const Tensor& out) {
  check(gate.shape() == up.shape(), "swiglu_down: gate{} and up{} differ", gate, up);
  check_silu_mul(gate, up, gate);
  const MatmulShape s = check_matmul(gate, w, out);
  if (row_gate.defined()) expect("swiglu_down", "row_gate", row_gate, DType::F32, s.T);
  return s;
}

RowCopyShape check_gather_rows(const Tensor& x, const Tensor& rows, int row_div, const Tensor& out) {
  expect("gather_rows", "rows", rows, DType::I32);
  check(row_div >= 1, "gather_rows: row_div {} < 1", row_div);
  check(x.rank() >= 1 && out.rank() >= 1 && x.dtype() == out.dtype(), "gather_rows: x{} {} out{} {}", x,
        dtype_name(x.dtype()), out, dtype_name(out.dtype()));
  const int64_t N = rows.numel(), M = x.dim(0);
  const size_t row = M > 0 ? x.nbytes() / size_t(M) : 0;
  check(out.dim(0) == N && out.nbytes() == size_t(N) * row, "gather_rows: out {} for {} rows of x {}", out, N, x);
  return {N, M, row};
}

RowCopyShape check_scatter_rows(const Tensor& x, const Tensor& rows, const Tensor& out) {
  expect("scatter_rows", "rows", rows, DType::I32);
  check(x.rank() >= 1 && out.rank() >= 1 && x.dtype() == out.dtype(), "scatter_rows: x{} {} out{} {}", x,
        dtype_name(x.dtype()), out, dtype_name(out.dtype()));
  const int64_t N = rows.numel(), M = out.dim(0);
  const size_t row = M > 0 ? out.nbytes() / size_t(M) : 0;
  check(x.dim(0) == N && x.nbytes() == size_t(N) * row, "scatter_rows: x {} for {} rows of out {}", x, N, out);
  return {N, M, row};
}

// --- gated attention ---

QkShape check_qk_norm_rope(const Tensor& qg, const Tensor& q_norm, const Tensor& k_norm, const Tensor& positions,
                           int rot, const Tensor& q, const Tensor& gate, const Tensor& k) {
  check(q.rank() == 3 && k.rank() == 3 && q.dtype() == DType::F32 && k.dtype() == DType::F32,
        "qk_norm_rope: q {} and k {} are not F32 [T, heads, hd]", q, k);
  const int64_t T = q.dim(0), Hq = q.dim(1), hd = q.dim(2), Hkv = k.dim(1);
  check(qg.shape() == std::vector<int64_t>{T, Hq, 2 * hd} && qg.dtype() == DType::F32 && gate.shape() == q.shape() &&
            gate.dtype() == DType::F32 && k.dim(0) == T && k.dim(2) == hd,
        "qk_norm_rope: qg{} q{} gate{} k{} (qg [T, Hq, 2 hd], q and gate [T, Hq, hd], k [T, Hkv, hd])", qg, q, gate, k);
  expect_weight("qk_norm_rope", "q_norm", q_norm, hd);
  expect_weight("qk_norm_rope", "k_norm", k_norm, hd);
  expect("qk_norm_rope", "positions", positions, DType::I32, T);
  check(rot <= hd && rot >= 0 && rot % 2 == 0, "qk_norm_rope: heads of {} with rot {}", hd, rot);
  return {T, Hq, Hkv, hd};
}

AttentionShape check_attention(const Tensor& q, const Tensor& k_new, const Tensor& v_new, const Tensor& k_cache,
                               const Tensor& v_cache, const SeqLayout& layout, const Tensor& out) {
  check(q.rank() == 3 && k_new.rank() == 3 && k_cache.rank() == 4,
        "attention: q{} k_new{} k_cache{} should be [T, Hq, hd], [T, Hkv, hd], [blocks, block_size, Hkv, hd]", q,
        k_new, k_cache);
  AttentionShape s;
  s.T = q.dim(0), s.Hq = q.dim(1), s.hd = q.dim(2), s.Hkv = k_new.dim(1);
  s.blocks = k_cache.dim(0), s.block_size = k_cache.dim(1);
  check(k_new.dim(0) == s.T && k_new.dim(2) == s.hd && v_new.shape() == k_new.shape() && s.Hkv > 0 &&
            s.Hq % s.Hkv == 0 && k_cache.dim(2) == s.Hkv && k_cache.dim(3) == s.hd &&
            v_cache.shape() == k_cache.shape() && out.shape() == q.shape(),
        "attention: q{} k_new{} v_new{} k_cache{} v_cache{} out{} do not agree", q, k_new, v_new, k_cache, v_cache,
        out);
  expect("attention", "q", q, DType::F32);
  expect("attention", "k_new", k_new, DType::F32);
  expect("attention", "v_new", v_new, DType::F32);
  // The caches are fp32, or bf16 where a backend keeps them so (Backend::kv_cache_dtype).
  check((k_cache.dtype() == DType::F32 || k_cache.dtype() == DType::BF16) && v_cache.dtype() == k_cache.dtype(),
        "attention: caches of {} and {}: expected F32 or BF16, both alike", dtype_name(k_cache.dtype()),
        dtype_name(v_cache.dtype()));
  expect("attention", "out", out, DType::F32);
  s.B = check_layout_rows("attention", layout, s.T);
  if (s.B == 0) return s;
  const int64_t bs = s.block_size;
  check(bs > 0 && layout.block_size == bs, "attention: layout block_size {} for caches of blocks of {}",
        layout.block_size, bs);
  expect("attention", "cu_seqlens", layout.cu_seqlens, DType::I32, s.B + 1);
  expect("attention", "kv_lens", layout.kv_lens, DType::I32, s.B);
  expect("attention", "slot_mapping", layout.slot_mapping, DType::I32, s.T);
  expect("attention", "block_tables", layout.block_tables, DType::I32);
  if (layout.table_rows.defined()) {
    expect("attention", "table_rows", layout.table_rows, DType::I32, s.B);
    check(layout.block_tables.rank() == 2, "attention: block_tables {} is not [rows, W]", layout.block_tables);
  } else {
    check(layout.block_tables.rank() == 2 && layout.block_tables.dim(0) == s.B,
          "attention: block_tables {} for {} sequences", layout.block_tables, s.B);
  }
  s.W = layout.block_tables.dim(1);
  // The host counts against the tables: every sequence's cache rows must fit its table.
  check(layout.max_kv_len >= 0 && layout.max_query_len >= 0 && layout.max_query_len <= layout.max_kv_len,
        "attention: layout of up to {} new rows and {} cache rows per sequence", layout.max_query_len,
        layout.max_kv_len);
  const int64_t max_blocks = (layout.max_kv_len + bs - 1) / bs;
  check(max_blocks <= s.W,
        "attention: sequences of up to {} cache rows need {} blocks of {}; the block tables hold {}", layout.max_kv_len,
        max_blocks, bs, s.W);
  return s;
}

// --- Gated DeltaNet ---

RowShape check_delta_gates(const Tensor& b, const Tensor& a, const Tensor& A_log, const Tensor& dt_bias,
                           const Tensor& beta, const Tensor& g) {
  check(b.rank() == 2 && b.dtype() == DType::F32, "delta_gates: b {} is not F32 [T, Hv]", b);
  const int64_t T = b.dim(0), Hv = b.dim(1);
  check(a.numel() == T * Hv && beta.numel() == T * Hv && g.numel() == T * Hv && a.dtype() == DType::F32 &&
            beta.dtype() == DType::F32 && g.dtype() == DType::F32,
        "delta_gates: b{} a{} beta{} g{}", b, a, beta, g);
  check(A_log.numel() == Hv && dt_bias.numel() == Hv, "delta_gates: A_log{} dt_bias{} for {} heads", A_log, dt_bias,
        Hv);
  expect_weight("delta_gates", "A_log", A_log);
  expect_weight("delta_gates", "dt_bias", dt_bias);
  return {T, Hv};
}

ConvShape check_causal_conv1d_silu(const Tensor& x, const Tensor& weight, const Tensor& states,
                                   const SeqLayout& layout, const Tensor& out) {
  check(x.rank() == 2 && weight.rank() == 2 && states.rank() == 3,
        "causal_conv1d_silu: x{} weight{} states{} should be [T, C], [C, kc], [slots, C, kc-1]", x, weight, states);
  ConvShape s;
  s.T = x.dim(0), s.C = x.dim(1), s.kc = weight.dim(1), s.slots = states.dim(0);
  check(s.C > 0 && weight.dim(0) == s.C && s.kc >= 1 && s.kc <= 16 && states.dim(1) == s.C &&
            states.dim(2) == s.kc - 1 && out.shape() == x.shape(),
        "causal_conv1d_silu: x{} weight{} states{} out{} do not agree (kernel size in [1, 16])", x, weight, states,
        out);
  expect("causal_conv1d_silu", "x", x, DType::F32);
  expect("causal_conv1d_silu", "weight", weight, DType::F32);
  expect("causal_conv1d_silu", "states", states, DType::F32);
  expect_rows("causal_conv1d_silu", "out", out);
  s.B = check_state_sequences("causal_conv1d_silu", layout, s.T);
  return s;
}

GatedDeltaRuleShape check_gated_delta_rule(const Tensor& qkv, const Tensor& g, const Tensor& beta,
                                           const DeltaRuleDims& d, const Tensor& states, const SeqLayout& layout,
                                           const Tensor& out) {
  check(d.Hk > 0 && d.Hv > 0 && d.dk > 0 && d.dv > 0 && d.Hv % d.Hk == 0,
        "gated_delta_rule: bad dims Hk={} Hv={} dk={} dv={}", d.Hk, d.Hv, d.dk, d.dv);
  GatedDeltaRuleShape s;
  s.kd = int64_t(d.Hk) * d.dk, s.vd = int64_t(d.Hv) * d.dv;
  check(qkv.rank() == 2 && qkv.dim(1) == 2 * s.kd + s.vd, "gated_delta_rule: qkv{} for Hk={} dk={} Hv={} dv={}", qkv,
        d.Hk, d.dk, d.Hv, d.dv);
  s.T = qkv.dim(0);
  check(g.numel() == s.T * d.Hv && beta.numel() == s.T * d.Hv && out.numel() == s.T * s.vd && out.rank() >= 1 &&
            out.dim(0) == s.T,
        "gated_delta_rule: qkv{} g{} beta{} out{} do not agree (Hv={}, dv={})", qkv, g, beta, out, d.Hv, d.dv);
  check(states.rank() == 4 && states.dim(1) == d.Hv && states.dim(2) == d.dk && states.dim(3) == d.dv,
        "gated_delta_rule: states {} should be [slots, {}, {}, {}]", states, d.Hv, d.dk, d.dv);
  s.slots = states.dim(0);
  expect_rows("gated_delta_rule", "qkv", qkv);
  expect("gated_delta_rule", "g", g, DType::F32);
  expect("gated_delta_rule", "beta", beta, DType::F32);
  expect("gated_delta_rule", "states", states, DType::F32);
  expect("gated_delta_rule", "out", out, DType::F32);
  s.B = check_state_sequences("gated_delta_rule", layout, s.T);
  return s;
}

RowShape check_gated_rms_norm(const Tensor& x, const Tensor& z, const Tensor& w, const Tensor& y) {
  const int64_t dv = w.numel();
  check(dv > 0 && x.numel() % dv == 0 && z.numel() == x.numel() && y.numel() == x.numel() &&
            x.dtype() == DType::F32 && z.dtype() == DType::F32 && y.dtype() == DType::F32,
        "gated_rms_norm: x{} z{} w{} y{}", x, z, w, y);
  expect_weight("gated_rms_norm", "w", w);
  return {x.numel() / dv, dv};
}

// --- mixture of experts ---

TopkShape check_topk_softmax(const Tensor& logits, int k, const Tensor& routed, const Tensor& ids,
                             const Tensor& weights) {
  check(logits.defined() && logits.rank() == 2 && logits.dtype() == DType::F32,
        "topk_softmax: logits {} is not F32 [T, E]", logits);
  const int64_t T = logits.dim(0), E = logits.dim(1);
  check(k >= 1 && k <= E, "topk_softmax: k={} with {} experts", k, E);
  expect("topk_softmax", "ids", ids, DType::I32, T * k);
  expect("topk_softmax", "weights", weights, DType::F32, T * k);
  if (routed.defined()) expect("topk_softmax", "routed", routed, DType::I32, T);
  return {T, E};
}

DispatchShape check_dispatch(const DispatchTables& tables, const Tensor& ids, const Tensor& counts_by_rank,
                             const Tensor& slots) {
  DispatchShape s;
  expect("dispatch", "ids", ids, DType::I32);
  s.N = ids.numel();
  expect("dispatch", "slots", slots, DType::I32, s.N);
  check(tables.ranks >= 1 && tables.rank >= 0 && tables.rank < tables.ranks, "dispatch: rank {} of {}", tables.rank,
        tables.ranks);
  switch (tables.policy) {
    case eplb::Dispatch::static_:
      expect("dispatch", "static_slot", tables.static_slot, DType::I32);
      s.E = tables.static_slot.numel();
      return s;
    case eplb::Dispatch::random:
      expect("dispatch", "replica_count", tables.replica_count, DType::I32);
      s.E = tables.replica_count.numel();
      expect("dispatch", "replicas", tables.replicas, DType::I32);
      check(tables.replicas.rank() == 2 && tables.replicas.dim(0) == s.E, "dispatch: replicas {} for {} experts",
            tables.replicas, s.E);
      expect("dispatch", "pass_seed", tables.pass_seed, DType::I64, 1);
      s.R = tables.replicas.dim(1);
      return s;
    case eplb::Dispatch::balanced:
      expect("dispatch", "phy2log", tables.phy2log, DType::I32);
      expect("dispatch", "counts_by_rank", counts_by_rank, DType::I32);
      s.P = tables.phy2log.numel();
      check(counts_by_rank.rank() == 2 && counts_by_rank.dim(0) == tables.ranks,
            "dispatch: counts_by_rank {} is not [G={}, E]", counts_by_rank, tables.ranks);
      check(tables.slots_per_rank >= 1 && s.P == int64_t(tables.ranks) * tables.slots_per_rank,
            "dispatch: {} slots for {} ranks of {}", s.P, tables.ranks, tables.slots_per_rank);
      s.E = counts_by_rank.dim(1);
      return s;
  }
  fail("dispatch: unknown policy {}", int(tables.policy));
}

void check_histogram(const Tensor& keys, const Tensor& counts) {
  expect("histogram", "keys", keys, DType::I32);
  expect("histogram", "counts", counts, DType::I32);
}

int64_t check_group_by(const Tensor& keys, const Tensor& valid, int div, int groups, const Tensor& perm,
                       const Tensor& counts, const Tensor& offsets, const Tensor& inverse) {
  expect("group_by", "keys", keys, DType::I32);
  const int64_t N = keys.numel();
  check(div >= 1 && groups >= 1, "group_by: div {} and groups {} must be >= 1", div, groups);
  expect("group_by", "perm", perm, DType::I32, N);
  expect("group_by", "counts", counts, DType::I32, groups);
  expect("group_by", "offsets", offsets, DType::I32, int64_t(groups) + 1);
  if (inverse.defined()) expect("group_by", "inverse", inverse, DType::I32, N);
  if (valid.defined()) expect("group_by", "valid", valid, DType::I32);
  return N;
}

namespace {

// Every expert whose gate is defined: SwiGLU weights for rows of H.
void check_experts(const char* op, std::span<const SwigluWeights> experts, int64_t H) {
  for (size_t g = 0; g < experts.size(); ++g) {
    const SwigluWeights& w = experts[g];
    if (!w.gate.defined()) continue;
    const int64_t I = w.gate.dim(0);
    check(w.gate.rank() == 2 && w.gate.dim(1) == H && w.up.defined() && w.up.shape() == w.gate.shape() &&
              w.down.defined() && w.down.rank() == 2 && w.down.dim(0) == H && w.down.dim(1) == I,
          "{}: expert {} has gate{} up{} down{} for rows of {}", op, g, w.gate, w.up, w.down, H);
    for (auto [part, t] : {std::pair{"gate", &w.gate}, {"up", &w.up}, {"down", &w.down}})
      expect_matrix_weight(op, fmt::format("expert {} {}", g, part).c_str(), *t);
  }
}

}  // namespace

ExpertsShape check_moe_experts(const Tensor& x, const Tensor& perm, const Tensor& offsets, int row_div,
                               std::span<const SwigluWeights> experts, const Tensor& y) {
  check(x.defined() && y.defined() && x.rank() == 2 && y.rank() == 2 && x.dtype() == DType::F32 &&
            y.dtype() == DType::F32 && x.dim(1) == y.dim(1),
        "moe_experts: x{} and y{} should be F32 [*, H]", x, y);
  const int64_t H = x.dim(1);
  expect("moe_experts", "perm", perm, DType::I32);
  expect("moe_experts", "offsets", offsets, DType::I32, int64_t(experts.size()) + 1);
  check(row_div >= 1, "moe_experts: row_div {} < 1", row_div);
  check_experts("moe_experts", experts, H);
  return {x.dim(0), H, y.dim(0)};
}

RoutedShape check_moe_routed(const Tensor& x, const Tensor& ids, const Tensor& weights,
                             std::span<const SwigluWeights> experts, const SharedExpert* shared, const Tensor& out) {
  check(x.defined() && out.defined() && x.rank() == 2 && x.dtype() == DType::F32 && out.shape() == x.shape() &&
            out.dtype() == DType::F32,
        "moe_routed: x{} and out{} should be F32 [T, H] alike", x, out);
  const int64_t T = x.dim(0), H = x.dim(1);
  check(ids.defined() && ids.rank() == 2 && ids.dim(0) == T && ids.dtype() == DType::I32,
        "moe_routed: ids {} is not I32 [T={}, k]", ids, T);
  check(weights.defined() && weights.shape() == ids.shape() && weights.dtype() == DType::F32,
        "moe_routed: weights {} is not F32 shaped as ids {}", weights, ids);
  check_experts("moe_routed", experts, H);
  if (shared) {
    check(shared->w.gate.defined(), "moe_routed: the shared expert has no weights");
    check_experts("moe_routed (shared expert)", std::span(&shared->w, 1), H);
    expect("moe_routed", "shared expert's gate", shared->gate, DType::F32, T);
  }
  return {T, H, ids.dim(1)};
}

CombineShape check_moe_combine(const Tensor& y, const Tensor& rows, const Tensor& weights, const Tensor& out) {
  check(y.defined() && out.defined() && y.rank() == 2 && out.rank() == 2 && y.dtype() == DType::F32 &&
            out.dtype() == DType::F32 && y.dim(1) == out.dim(1),
        "moe_combine: y{} and out{} should be F32 [*, H]", y, out);
  const int64_t T = out.dim(0), H = out.dim(1), M = y.dim(0);
  check(weights.defined() && weights.rank() == 2 && weights.dim(0) == T && weights.dtype() == DType::F32,
        "moe_combine: weights {} is not F32 [T={}, k]", weights, T);
  const int64_t k = weights.dim(1);
  if (rows.defined()) {
    expect("moe_combine", "rows", rows, DType::I32, T * k);
  } else {
    check(M >= T * k, "moe_combine: y {} has fewer than T*k = {} rows", y, T * k);
  }
  return {T, H, M, k};
}

// --- sampling ---

SampleShape check_sample(const Tensor& logits, const SamplingRows& rows, const Tensor& ids, const Tensor& probs) {
  check(logits.rank() == 2 && logits.dtype() == DType::F32, "sample: logits {} is not F32 [R, V]", logits);
  const int64_t R = logits.dim(0), V = logits.dim(1);
  check(V > 0 || R == 0, "sample: logits {} has no tokens", logits);
  expect("sample", "ids", ids, DType::I32, R);
  if (probs.defined()) {
    expect("sample", "probs", probs, DType::F32, R * V);
    check(probs.rank() == 2 && probs.dim(0) == R, "sample: probs {} for logits {}", probs, logits);
  }
  check_sampling_rows("sample", rows, R);
  return {R, V};
}

VerifyShape check_verify_drafts(const Tensor& logits, const Tensor& drafts, const Tensor& draft_probs,
                                const SamplingRows& rows, const Tensor& out) {
  expect("verify_drafts", "drafts", drafts, DType::I32);
  check(drafts.rank() == 2, "verify_drafts: drafts {} is not [B, S]", drafts);
  const int64_t B = drafts.dim(0), S = drafts.dim(1);
  check(logits.rank() == 2 && logits.dtype() == DType::F32 && logits.dim(0) == B * (S + 1),
        "verify_drafts: logits {} should be F32 [B*(S+1) = {}, V] for drafts {}", logits, B * (S + 1), drafts);
  const int64_t V = logits.dim(1);
  check(V > 0 || B == 0, "verify_drafts: logits {} has no tokens", logits);
  expect("verify_drafts", "out", out, DType::I32, B * (S + 2));
  check(out.rank() == 2 && out.dim(0) == B, "verify_drafts: out {} should be [B={}, S+2={}]", out, B, S + 2);
  if (draft_probs.defined()) {
    expect("verify_drafts", "draft_probs", draft_probs, DType::F32, B * S * V);
    check(draft_probs.rank() == 2 && draft_probs.dim(0) == B * S, "verify_drafts: draft_probs {} should be [{}, {}]",
          draft_probs, B * S, V);
  }
  check_sampling_rows("verify_drafts", rows, B * (S + 1));
  return {B, S, V};
}

DraftInputsShape check_draft_inputs(const Tensor& verdicts, const Tensor& tokens, const Tensor& last_rows,
                                    const Tensor& routed) {
  expect("draft_inputs", "verdicts", verdicts, DType::I32);
  check(verdicts.rank() == 2 && verdicts.dim(1) >= 2, "draft_inputs: verdicts {} is not [B, S+2]", verdicts);
  const int64_t B = verdicts.dim(0), S = verdicts.dim(1) - 2;
  expect("draft_inputs", "tokens", tokens, DType::I32, B * (S + 1));
  expect("draft_inputs", "last_rows", last_rows, DType::I32, B);
  if (routed.defined()) expect("draft_inputs", "routed", routed, DType::I32, B * (S + 1));
  return {B, S};
}

LogprobShape check_token_logprobs(const Tensor& logits, const Tensor& ids, const Tensor& logprob,
                                  const Tensor& top_ids, const Tensor& top_logprobs) {
  check(logits.rank() == 2 && logits.dtype() == DType::F32, "token_logprobs: logits {} is not F32 [R, V]", logits);
  const int64_t R = logits.dim(0), V = logits.dim(1);
  check(V > 0 || R == 0, "token_logprobs: logits {} has no tokens", logits);
  expect("token_logprobs", "ids", ids, DType::I32, R);
  expect("token_logprobs", "logprob", logprob, DType::F32, R);
  const int64_t K = top_ids.defined() ? (top_ids.rank() == 2 ? top_ids.dim(1) : -1) : 0;
  check(K >= 0 && K <= kMaxTopLogprobs && K <= std::max<int64_t>(V, 0),
        "token_logprobs: top_ids {} should be [R={}, K] with K <= {} and K <= V={}", top_ids, R, kMaxTopLogprobs, V);
  if (K > 0) {
    expect("token_logprobs", "top_ids", top_ids, DType::I32, R * K);
    expect("token_logprobs", "top_logprobs", top_logprobs, DType::F32, R * K);
    check(top_logprobs.rank() == 2 && top_logprobs.dim(1) == K, "token_logprobs: top_logprobs {} for top_ids {}",
          top_logprobs, top_ids);
  }
  return {R, V, K};
}

int64_t check_gather_routed(std::span<const RoutedRows> sources, int me, const Tensor& out, const Tensor& recv_counts) {
  const int64_t G = int64_t(sources.size());
  check(G >= 1 && me >= 0 && me < G, "gather_routed: rank {} of {} sources", me, G);
  check(out.defined() && out.rank() >= 1, "gather_routed: out {} has no rows", out);
  expect("gather_routed", "recv_counts", recv_counts, DType::I32, G);
  for (int64_t s = 0; s < G; ++s) {
    const RoutedRows& src = sources[size_t(s)];
    check(src.rows.defined() && src.rows.rank() >= 1 && src.rows.dtype() == out.dtype() &&
              src.rows.row_bytes() == out.row_bytes(),
          "gather_routed: source {}'s rows {} are not rows of out {}", s, src.rows, out);
    expect("gather_routed", fmt::format("source {}'s counts", s).c_str(), src.counts, DType::I32, G);
    // Peers read a source's counts while this rank writes recv_counts.
    check(src.counts.raw() != recv_counts.raw(), "gather_routed: recv_counts is source {}'s counts", s);
  }
  return int64_t(out.row_bytes());
}

}  // namespace ballast::kernels

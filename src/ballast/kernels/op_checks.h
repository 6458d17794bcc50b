#pragma once
// The host-side argument checks that belong to the contract of ops.h: what every backend must
// refuse, seen from the host alone (shapes, ranks, dtypes, element counts, and the host counts of
// a SeqLayout against its tensors). One function per op; each throws ballast::Error naming the
// op, and returns the sizes its backends go on to use. None reads tensor data: index inputs may
// live where the host cannot read them.
//
// Backends call these first (nothing above the contract does), then add only what is their own:
// the CPU backend checks the index data it reads on the host (token ids, slots, offsets in range);
// the CUDA backend checks that tensors are in CUDA memory, and its launch limits.
#include <cstddef>
#include <cstdint>
#include <span>

#include "ballast/core/tensor.h"
#include "ballast/kernels/ops.h"

namespace ballast::kernels {

// Checks that `t` is defined, of `dtype`, with `numel` elements (-1: any).
void expect(const char* op, const char* name, const Tensor& t, DType dtype, int64_t numel = -1);
// The dtypes a weight may be stored in (ops.h): F32, BF16, F16, F8_E4M3.
bool is_weight_dtype(DType dtype);
// Checks that weight `t` is defined, of a weight dtype, with `numel` elements (-1: any).
void expect_weight(const char* op, const char* name, const Tensor& t, int64_t numel = -1);
// The weight of a matrix product (matmul, moe_experts): a weight dtype, or F8_E4M3_B128 whose
// block scales are F32 [scale_blocks(rows), scale_blocks(cols)] on the weight's device. Only these
// two ops read block-scaled weights; every other op refuses them through expect_weight.
void expect_matrix_weight(const char* op, const char* name, const Tensor& t);

// `rows` rows of `width` elements: the shape of the row-wise ops (norms, gates, head splits).
struct RowShape {
  int64_t rows, width;
};

// --- rows and elementwise ---
struct EmbeddingShape {
  int64_t T, V, H;  // ids, table rows, row width
};
EmbeddingShape check_embedding(const Tensor& ids, const Tensor& table, const Tensor& out);
struct MatmulShape {
  int64_t T, K, N;
};
MatmulShape check_matmul(const Tensor& x, const Tensor& w, const Tensor& y);
void check_fill_uniform(const Tensor& t, float scale);
RowShape check_rms_norm(const Tensor& x, const Tensor& w, const Tensor& y);
void check_add(const Tensor& y, const Tensor& x);
void check_matmul_many(std::span<const Tensor> w, std::span<Tensor> y);
RowShape check_add_rms_norm(const Tensor& x, const Tensor& d, const Tensor& w, const Tensor& y);
// matmul_add_norm: d as matmul's y of o and w_out, then as check_add_norm's (o apart from x, d and h).
RowShape check_matmul_add_norm(const Tensor& o, const Tensor& w_out, const Tensor& d, const AddNorm& then,
                               int64_t parts = 0);
// matmul_many_normed: n's rows [T, H] (s F32; where pending, sums F32 [T, >= parts]), h (if
// defined) F32 [T, H] apart from n.s, each product as matmul's of the rows.
RowShape check_matmul_many_normed(const PendingNorm& n, const Tensor& h, std::span<const Tensor> w, std::span<Tensor> y);
// The AddNorm after an op whose output d [T, H] it adds: x, w, h as add_rms_norm's; sums F32 [T, >= parts].
RowShape check_add_norm(const char* op, const AddNorm& then, const Tensor& d, int64_t parts);
void check_copy(const Tensor& src, const Tensor& dst);
struct ConcatShape {
  int64_t T, A, B;
};
ConcatShape check_concat_cols(const Tensor& a, const Tensor& b, const Tensor& out);
void check_silu_mul(const Tensor& gate, const Tensor& up, const Tensor& out);
void check_mul_sigmoid(const Tensor& x, const Tensor& gate);
RowShape check_scale_rows_sigmoid(const Tensor& y, const Tensor& s);
// gate and up [T, I] alike, w [N, I], out [T, N], row_gate (if defined) [T, 1]: the product's shape.
MatmulShape check_swiglu_down(const Tensor& gate, const Tensor& up, const Tensor& w, const Tensor& row_gate,
                              const Tensor& out);
// N rows listed, M rows in the tensor they index (gather: x, scatter: out), row_bytes per row.
struct RowCopyShape {
  int64_t N, M;
  size_t row_bytes;
};
RowCopyShape check_gather_rows(const Tensor& x, const Tensor& rows, int row_div, const Tensor& out);
RowCopyShape check_scatter_rows(const Tensor& x, const Tensor& rows, const Tensor& out);

// --- gated attention ---
struct QkShape {
  int64_t T, Hq, Hkv, hd;
};
QkShape check_qk_norm_rope(const Tensor& qg, const Tensor& q_norm, const Tensor& k_norm, const Tensor& positions,
                           int rot, const Tensor& q, const Tensor& gate, const Tensor& k);
// B = 0: the op has nothing to do (T is 0 then) and the layout's tensors are not looked at (W = 0).
struct AttentionShape {
  int B = 0;
  int64_t T = 0, Hq = 0, Hkv = 0, hd = 0;
  int64_t blocks = 0, block_size = 0;  // of the caches
  int64_t W = 0;                       // blocks per block table
};
AttentionShape check_attention(const Tensor& q, const Tensor& k_new, const Tensor& v_new, const Tensor& k_cache,
                               const Tensor& v_cache, const SeqLayout& layout, const Tensor& out);

// --- Gated DeltaNet ---
RowShape check_delta_gates(const Tensor& b, const Tensor& a, const Tensor& A_log, const Tensor& dt_bias,
                           const Tensor& beta, const Tensor& g);  // T rows of Hv
// B = 0: nothing to do (T is 0 then); the layout's tensors are not looked at.
struct ConvShape {
  int B = 0;
  int64_t T = 0, C = 0, kc = 0;
  int64_t slots = 0;  // states in the pool
};
ConvShape check_causal_conv1d_silu(const Tensor& x, const Tensor& weight, const Tensor& states,
                                   const SeqLayout& layout, const Tensor& out);
// B = 0: nothing to do (T is 0 then); the layout's tensors are not looked at.
struct GatedDeltaRuleShape {
  int B = 0;
  int64_t T = 0;
  int64_t kd = 0, vd = 0;  // Hk * dk, Hv * dv
  int64_t slots = 0;       // states in the pool
};
GatedDeltaRuleShape check_gated_delta_rule(const Tensor& qkv, const Tensor& g, const Tensor& beta,
                                           const DeltaRuleDims& dims, const Tensor& states, const SeqLayout& layout,
                                           const Tensor& out);
RowShape check_gated_rms_norm(const Tensor& x, const Tensor& z, const Tensor& w, const Tensor& y);  // rows of dv

// --- mixture of experts ---
struct TopkShape {
  int64_t T, E;
};
TopkShape check_topk_softmax(const Tensor& logits, int k, const Tensor& routed, const Tensor& ids,
                             const Tensor& weights);
// The tables of tables.policy are checked, the others not looked at. E: the experts of those
// tables (static: static_slot's, random: replica_count's, balanced: counts_by_rank's columns);
// R: replicas per expert (random); P: slots (balanced).
struct DispatchShape {
  int64_t N = 0, E = 0, R = 0, P = 0;
};
DispatchShape check_dispatch(const DispatchTables& tables, const Tensor& ids, const Tensor& counts_by_rank,
                             const Tensor& slots);
void check_histogram(const Tensor& keys, const Tensor& counts);
// Returns N, the number of keys.
int64_t check_group_by(const Tensor& keys, const Tensor& valid, int div, int groups, const Tensor& perm,
                       const Tensor& counts, const Tensor& offsets, const Tensor& inverse);
// Every expert whose gate is defined is checked; an expert left undefined may only have no rows,
// which is data (the offsets).
struct ExpertsShape {
  int64_t M, H, Ny;  // rows of x, width, rows of y
};
ExpertsShape check_moe_experts(const Tensor& x, const Tensor& perm, const Tensor& offsets, int row_div,
                               std::span<const SwigluWeights> experts, const Tensor& y);
struct RoutedShape {
  int64_t T, H, k;  // tokens, width, choices per token
};
RoutedShape check_moe_routed(const Tensor& x, const Tensor& ids, const Tensor& weights,
                             std::span<const SwigluWeights> experts, const SharedExpert* shared, const Tensor& out);
struct CombineShape {
  int64_t T, H, M, k;  // rows of out, width, rows of y, choices per row
};
CombineShape check_moe_combine(const Tensor& y, const Tensor& rows, const Tensor& weights, const Tensor& out);
// gather_routed's shapes; returns the bytes of a row (out's and every source's).
int64_t check_gather_routed(std::span<const RoutedRows> sources, int me, const Tensor& out, const Tensor& recv_counts);

// --- sampling ---
struct SampleShape {
  int64_t R, V;
};
SampleShape check_sample(const Tensor& logits, const SamplingRows& rows, const Tensor& ids, const Tensor& probs);
// draft_probs is checked when defined; whether a row samples (and so needs it) is data.
struct VerifyShape {
  int64_t B, S, V;
};
VerifyShape check_verify_drafts(const Tensor& logits, const Tensor& drafts, const Tensor& draft_probs,
                                const SamplingRows& rows, const Tensor& out);
struct DraftInputsShape {
  int64_t B, S;
};
DraftInputsShape check_draft_inputs(const Tensor& verdicts, const Tensor& tokens, const Tensor& last_rows,
                                    const Tensor& routed);
struct LogprobShape {
  int64_t R, V, K;
};
LogprobShape check_token_logprobs(const Tensor& logits, const Tensor& ids, const Tensor& logprob,
                                  const Tensor& top_ids, const Tensor& top_logprobs);

}  // namespace ballast::kernels

#pragma once
// The backend contract, part 2: the ops the model graph is written against (part 1, memory and
// transfers, is backend.h). A backend implements every op for tensors on its device, in stream
// order, without allocating device memory per call (a backend may keep scratch of its own, grown
// at first need and counted as an allocation). Activations are F32 (the DeltaNet's conv rows may
// be BF16: delta_rule_rows_dtype); weights may be F32, BF16, F16 or F8_E4M3 and are read in place;
// the weights of matrix products (matmul, moe_experts) may also be F8_E4M3_B128, Qwen's
// fine-grained FP8: e4m3 elements times one F32 scale per 128 x 128 block (Tensor::block_scaled),
// dequantized inside the dot product with fp32 accumulation. Index inputs are I32 tensors on the
// device: nothing in an op needs the host to look at data. Shapes are in the comments; row-major.
// docs/model.md has the math, docs/expert-parallel.md the MoE dispatch and combine.
#include <cstdint>
#include <functional>
#include <span>

#include "ballast/core/error.h"
#include "ballast/core/tensor.h"
#include "ballast/eplb/dispatch.h"

namespace ballast::kernels {

struct DeltaRuleDims {
  int Hk, Hv, dk, dv;
};

// One SwiGLU expert: down(silu(gate x) * up x). gate, up [I, H]; down [H, I]; any weight dtype
// (block-scaled FP8 included).
struct SwigluWeights {
  Tensor gate, up, down;
  int64_t intermediate() const { return gate.dim(0); }
  size_t nbytes() const { return gate.storage_bytes() + up.storage_bytes() + down.storage_bytes(); }
};

// A MoE layer's shared expert beside its routed ones (Qwen's shared_expert and shared_expert_gate):
// row t gets sigmoid(gate[t]) * w(x[t]). gate [T, 1] F32: the gate's logits.
struct SharedExpert {
  SwigluWeights w;
  Tensor gate;
};

// How the T rows of a pass split into B sequences, and where each sequence's cache lives. The
// tensors are I32 on the device; the counts are also given on the host (loop bounds and launch
// shapes only, never data).
struct SeqLayout {
  int num_seqs = 0;        // B
  int num_tokens = 0;      // T
  int max_query_len = 0;   // max over b of cu_seqlens[b+1] - cu_seqlens[b]
  int prefill_seqs = -1;   // sequences of more than one row not verifying drafts (-1: not given,
                           // up to B): how a backend spreads a prefill over its cores
  int max_kv_len = 0;      // max over b of kv_lens[b]
  int block_size = 0;      // cache rows per KV block
  Tensor cu_seqlens;       // [B+1]: rows of sequence b are [cu_seqlens[b], cu_seqlens[b+1])
  Tensor kv_lens;          // [B]: cache rows of b once this pass has appended its rows (its new
                           //      rows are its last ones: row i of n new sits at kv_len - n + i)
  Tensor block_tables;     // [B, W]: b's cache blocks in order; cache row r of b is at block
                           //      block_tables[b][r / block_size], offset r % block_size; or, with
                           //      table_rows, [R, W]: a row per sequence the cache holds
  Tensor table_rows;       // [B] or undefined: b's row of block_tables (undefined: row b), so that
                           //      the tables can stay on the device and a pass names its rows
  Tensor slot_mapping;     // [T]: where each new row's K and V go, block * block_size + offset
  Tensor state_slots;      // [B]: b's DeltaNet state slot (conv and recurrent state pools)
  Tensor snapshot_slots;   // [B, W'] or undefined: where b's entry [b][0] >= 0, b is verifying
                           //      drafts: the state after its row i goes to slot [b][i] and its
                           //      own slot is left as it was (rollback is then a choice of slot)
  // B = 0 (a rank with no sequences this pass): the ops do nothing and read none of the tensors.
};

// Logical -> physical expert dispatch of one MoE layer under a placement (docs/expert-parallel.md).
// Tables are I32 on the device, uploaded when the layer's placement switches.
struct DispatchTables {
  eplb::Dispatch policy = eplb::Dispatch::static_;
  int rank = 0, ranks = 1;    // this rank, G
  int slots_per_rank = 0;     // K = P / G
  int layer = 0;              // the layer's index in its domain (mixed into the random seed)
  Tensor phy2log;             // [P] logical expert of each slot
  Tensor static_slot;         // [E] static: the slot this rank sends expert e's tokens to
  Tensor replicas;            // [E, Rmax] slots holding e, ascending, padded with -1
  Tensor replica_count;       // [E]
  Tensor pass_seed;           // [1] I64, random: the domain's pass index (changes every pass)
};

// What one source rank sends in an all_to_all_v whose counts stay on the device (in-process
// ranks on one device read each other's buffers): its rows (to rank 0 first, then rank 1, ...)
// and its send counts, I32 [G].
struct RoutedRows {
  Tensor rows, counts;
};

// A residual stream's RMSNorm as the op that finished its input left it: finished (parts = 0: s
// holds rms_norm(x, w)), or left for the products that read it to finish (parts > 0: s = x (1 + w),
// and sums [T, >= parts] F32 holds each row's sum of x's squares in `parts` pieces, however the op
// split the row). CUDA's one-token decode starts the norm where its input is finished and ends it
// where the next products store (docs/perf.md, session 40): no norm kernel between them.
struct PendingNorm {
  Tensor s, sums;
  int parts = 0;
  float eps = 0;
};

// What follows an op that finishes an update of the residual stream x [T, H]: x += its output d,
// then rms_norm(x, w) into h [T, H] (neither x nor d), or left pending (sums [T, P] F32 its scratch,
// P = Ops::norm_parts(H)).
struct AddNorm {
  Tensor x, w;
  float eps = 0;
  Tensor h, sums;
};

// qk_norm_rope's parameters besides its rows: the heads' norms (weights [hd], zero-centred) and
// NeoX RoPE on the first rot dims of each head at positions [T].
struct QkNormRope {
  Tensor q_norm, k_norm;
  float eps = 0;
  Tensor positions;
  int rot = 0;
  double theta = 0;
};

// How each logits row is drawn from. Tensors are on the device, one entry per row [R].
struct SamplingRows {
  Tensor temperature;  // F32; <= 0: greedy (argmax, ties to the lower id)
  Tensor top_p;        // F32 in (0, 1]
  Tensor top_k;        // I32; 0: no limit
  Tensor seed;         // I64: the sequence's seed
  Tensor position;     // I32: position of the token being drawn
};

// The most top logprobs token_logprobs gives per row (OpenAI's limit for chat completions).
inline constexpr int kMaxTopLogprobs = 20;

// Independent uniform streams of one (seed, position): see uniform() in sampling.h.
enum class Draw : uint32_t { target = 0, draft = 1, accept = 2, residual = 3 };

class Ops {
 public:
  virtual ~Ops() = default;

  // --- rows and elementwise ---
  // out[T, H] = table[ids[t], :]; ids [T]
  virtual void embedding(const Tensor& ids, const Tensor& table, Tensor& out) = 0;
  // y[T, N] = x[T, K] @ w[N, K]^T. The weights of matmul, matmul_many and swiglu_down are
  // parameters: no op writes them while passes run, so a backend may start reading them before the
  // op issued just before has finished (CUDA's decode products do: their weight loads overlap the
  // previous kernel's tail). The routed experts' weights (moe_experts), which EPLB migrates, are not
  // read early.
  virtual void matmul(const Tensor& x, const Tensor& w, Tensor& y) = 0;
  // Zero-centred RMSNorm over the last dim: y = x * rsqrt(mean(x^2) + eps) * (1 + w). x may be y.
  virtual void rms_norm(const Tensor& x, const Tensor& w, float eps, Tensor& y) = 0;
  // y[i] = x @ w[i]^T for each i: the projections of one input, in one op so that a backend can
  // read x once and run them in one launch (w and y of one length, each pair as in matmul).
  virtual void matmul_many(const Tensor& x, std::span<const Tensor> w, std::span<Tensor> y) = 0;
  // x += d, then y = rms_norm(x, w) (the residual stream's add and the next norm in one pass); y is
  // neither x nor d.
  virtual void add_rms_norm(Tensor& x, const Tensor& d, const Tensor& w, float eps, Tensor& y) = 0;
  // d [T, H] = o @ w_out^T (as matmul), then `then` after it (a mixer's output projection, the
  // residual add and the next norm): finished, or left pending in d where the backend starts the
  // norm at the product's store (CUDA at one row: its blocks add, weigh and sum squares as they
  // store). o overlaps none of x, d and h.
  virtual PendingNorm matmul_add_norm(const Tensor& o, const Tensor& w_out, Tensor& d, const AddNorm& then);
  // h = n's normed rows (finished here where n is pending), then y[i] = h @ w[i]^T as matmul_many (w
  // may be empty). h undefined: only the products read the rows (a backend may finish them in n.s,
  // which is then spent); h may be n.s itself where n is finished.
  virtual void matmul_many_normed(const PendingNorm& n, Tensor& h, std::span<const Tensor> w, std::span<Tensor> y);
  // The partial sums a pending norm of rows of H may take (AddNorm::sums' columns).
  virtual int64_t norm_parts(int64_t H) const {
    (void)H;
    return 1;
  }
  // y += x
  virtual void add(Tensor& y, const Tensor& x) = 0;
  // dst = src (same number of bytes)
  virtual void copy(const Tensor& src, Tensor& dst) = 0;
  // t = 0 (any dtype)
  virtual void zero(Tensor& t) = 0;
  // t[i] = uniform_weight(seed, i, scale) (random_fill.h) rounded to t's dtype (F32, BF16 or F16):
  // random weights made where they live, equal on every backend.
  virtual void fill_uniform(Tensor& t, uint64_t seed, float scale) = 0;
  // out[T, A + B] = [a[T, A] | b[T, B]]
  virtual void concat_cols(const Tensor& a, const Tensor& b, Tensor& out) = 0;
  // out = silu(gate) * up, elementwise; out may alias gate.
  virtual void silu_mul(const Tensor& gate, const Tensor& up, Tensor& out) = 0;
  // x *= sigmoid(gate), elementwise.
  virtual void mul_sigmoid(Tensor& x, const Tensor& gate) = 0;
  // y[t, :] *= sigmoid(s[t]); s [T, 1].
  virtual void scale_rows_sigmoid(Tensor& y, const Tensor& s) = 0;
  // out = (silu(gate) * up) @ w^T, then, where row_gate [T, 1] is defined, out[t, :] *=
  // sigmoid(row_gate[t]): a SwiGLU MLP's down projection (the shared expert's gated one) as one op,
  // so that a backend can take the elementwise parts into the product's loads and stores. gate
  // [T, I] is scratch: it may hold silu(gate) * up afterwards.
  virtual void swiglu_down(Tensor& gate, const Tensor& up, const Tensor& w, const Tensor& row_gate, Tensor& out) = 0;
  // out[i, :] = x[rows[i] / row_div, :] for rows [N] (any dtype; a row is x's first dimension);
  // zeros where rows[i] < 0 (e.g. the unsorted tail of group_by's perm).
  virtual void gather_rows(const Tensor& x, const Tensor& rows, int row_div, Tensor& out) = 0;
  // out[rows[i], :] = x[i, :] for rows [N] (any dtype); rows must not repeat.
  virtual void scatter_rows(const Tensor& x, const Tensor& rows, Tensor& out) = 0;

  // --- gated attention ---
  // The attention's q and k from its projections, in one op (one pass over the heads, where
  // splitting, two norms and two rotations took five): from qg[T, Hq, 2*hd] (per head [q | gate]),
  // gate[T, Hq, hd] = its second half and q[T, Hq, hd] = rope(rms_norm(its first half, q_norm)); k
  // [T, Hkv, hd] = rope(rms_norm(k, k_norm)) in place. rms_norm as the op of that name (weights
  // [hd], zero-centred); NeoX RoPE on the first rot dims of each head at positions [T].
  virtual void qk_norm_rope(const Tensor& qg, const Tensor& q_norm, const Tensor& k_norm, float eps,
                            const Tensor& positions, int rot, double theta, Tensor& q, Tensor& gate, Tensor& k) = 0;
  // Writes k_new/v_new[T, Hkv, hd] at layout.slot_mapping of the paged caches
  // k_cache/v_cache[blocks, block_size, Hkv, hd], then for row i of sequence b (n new rows):
  // out[row, Hq, hd] = softmax(q k^T / sqrt(hd)) v over b's cache rows [0, kv_len - n + i].
  virtual void attention(const Tensor& q, const Tensor& k_new, const Tensor& v_new, Tensor& k_cache,
                         Tensor& v_cache, const SeqLayout& layout, Tensor& out) = 0;
  // Gated attention from its projections: qk_norm_rope(qg, r, q, gate, k), attention(q, k, v, ...,
  // out), then out *= sigmoid(gate), in one op so that a backend can take the heads' norms, their
  // rotation, the cache write and the gate into the attention kernel (CUDA at decode: one row a
  // sequence). k [T, Hkv, hd] is the raw projection; q, gate and k are scratch (what they hold
  // afterwards is the backend's).
  virtual void gated_attention(const Tensor& qg, const QkNormRope& r, Tensor& q, Tensor& gate, Tensor& k,
                               const Tensor& v, Tensor& k_cache, Tensor& v_cache, const SeqLayout& layout, Tensor& out);

  // --- Gated DeltaNet ---
  // beta[T, Hv] = sigmoid(b); g[T, Hv] = -exp(A_log) * softplus(a + dt_bias)
  virtual void delta_gates(const Tensor& b, const Tensor& a, const Tensor& A_log, const Tensor& dt_bias,
                           Tensor& beta, Tensor& g) = 0;
  // The dtype of the DeltaNet's q, k and v rows between its two ops (causal_conv1d_silu's out,
  // gated_delta_rule's qkv), which the model asks for: BF16 where the backend multiplies them in
  // bf16 anyway (CUDA under bf16 products: half the bytes the chunked form reads, as
  // flash-linear-attention takes them), else F32. Both ops take either.
  virtual DType delta_rule_rows_dtype() const { return DType::F32; }
  // Per sequence: out = silu(causal depthwise conv1d of x over [state | its rows]);
  // x, out [T, C]; weight [C, kc]; states [slots, C, kc-1] (the last kc-1 inputs, oldest first).
  // out F32 or BF16 (rounded once, from the fp32 sum).
  virtual void causal_conv1d_silu(const Tensor& x, const Tensor& weight, Tensor& states, const SeqLayout& layout,
                                  Tensor& out) = 0;
  // Per sequence: the gated delta rule over its rows from its recurrent state; qkv[T, 2*Hk*dk +
  // Hv*dv] (after conv; F32 or BF16), g/beta [T, Hv], states [slots, Hv, dk, dv], out [T, Hv, dv].
  // Sequences of more than one row take the chunked (WY) form, single rows and verifying sequences
  // the recurrence; both compute the same function.
  virtual void gated_delta_rule(const Tensor& qkv, const Tensor& g, const Tensor& beta, const DeltaRuleDims& dims,
                                Tensor& states, const SeqLayout& layout, Tensor& out) = 0;
  // Per row of dv: y = w * x * rsqrt(mean(x^2) + eps) * silu(z); x, z [R, dv]. y may alias x.
  virtual void gated_rms_norm(const Tensor& x, const Tensor& z, const Tensor& w, float eps, Tensor& y) = 0;

  // --- mixture of experts (docs/expert-parallel.md) ---
  // p = softmax(logits[T, E]) in fp32; ids[T, k] the k largest (by decreasing p, ties to the lower
  // id), weights[T, k] their p (renormalised to sum 1 when `normalize`). routed, if defined, I32
  // [T]: a row t with routed[t] == 0 only fills a graph's shape and goes to no expert: ids -1,
  // weights 0 (no expert reads it, no load counts it, the combine adds nothing for it).
  virtual void topk_softmax(const Tensor& logits, int k, bool normalize, const Tensor& routed, Tensor& ids,
                            Tensor& weights) = 0;
  // slots[N] = the physical slot serving each routed choice ids[N] under tables.policy; -1 for a
  // choice of no expert (ids < 0). balanced: counts_by_rank [G, E] holds every rank's routed
  // counts of this layer and pass.
  virtual void dispatch(const DispatchTables& tables, const Tensor& ids, const Tensor& counts_by_rank,
                        Tensor& slots) = 0;
  // counts[bins] += number of i with keys[i] == bin; keys [N] (entries < 0 are skipped); counts I32.
  virtual void histogram(const Tensor& keys, Tensor& counts) = 0;
  // A stable counting sort of keys[N] by group (keys[i] / div) % groups. Only the first n keys
  // take part, n = the sum of `valid` (e.g. the recv_counts of an all_to_all_v) if it is defined,
  // else N; keys < 0 are skipped. perm [N] lists the indices i in group order (its first
  // offsets[groups] entries are valid), counts [groups] and offsets [groups + 1] give the groups'
  // sizes and starts, inverse [N] (if defined) the position of each i in perm (-1 if not sorted).
  virtual void group_by(const Tensor& keys, const Tensor& valid, int div, int groups, Tensor& perm, Tensor& counts,
                        Tensor& offsets, Tensor& inverse) = 0;
  // Expert-grouped SwiGLU: for group g and each j in [offsets[g], offsets[g+1]), with i = perm[j]:
  // y[i, :] = experts[g](x[i / row_div, :]). Rows of y not listed are left as they are.
  virtual void moe_experts(const Tensor& x, const Tensor& perm, const Tensor& offsets, int row_div,
                           std::span<const SwigluWeights> experts, Tensor& y) = 0;
  // out[t, :] += sum over j in order of weights[t, j] * y[rows[t*k + j], :]; weights [T, k];
  // rows [T*k] (undefined: row t*k + j). A choice of weight 0 adds nothing and its rows entry and
  // y row are not read (a row that went to no expert has no y row).
  virtual void moe_combine(const Tensor& y, const Tensor& rows, const Tensor& weights, Tensor& out) = 0;
  // Whether moe_routed computes x's routed experts in one pass on this backend (a fast path for few
  // tokens: decode); where it does not, the caller groups the choices (group_by, moe_experts,
  // moe_combine), which every backend does. With `shared`: whether moe_routed_add_norm's pass
  // computes that shared expert too. A function of the shapes and dtypes alone.
  virtual bool moe_routed_fits(const Tensor& x, const Tensor& ids, std::span<const SwigluWeights> experts,
                               const SharedExpert* shared) const {
    (void)x, (void)ids, (void)experts, (void)shared;
    return false;
  }
  // out[t, :] += sum over j in order of weights[t, j] * experts[ids[t, j]](x[t, :]): what group_by,
  // moe_experts and moe_combine compute together, in one pass, where moe_routed_fits. ids, weights
  // [T, k]; a choice of weight 0 or id < 0 adds nothing; an id past the experts, or of an expert
  // with no weights, is an index fault.
  virtual void moe_routed(const Tensor& x, const Tensor& ids, const Tensor& weights,
                          std::span<const SwigluWeights> experts, Tensor& out) {
    (void)x, (void)ids, (void)weights, (void)experts, (void)out;
    fail("moe_routed: this backend computes routed experts only grouped (moe_routed_fits is false)");
  }
  // moe_routed into out, then `then` after it: finished, or left pending where the backend starts
  // the norm in the same pass (CUDA at one token: the last block of each slice of the row adds,
  // weighs and sums squares as it stores). With `shared` (where moe_routed_fits with it), the shared
  // expert's rows take the place of out's contents as the sum's first term: out[t, :] = sigmoid(
  // gate[t]) * w(x[t, :]) + the choices', in one pass (nothing beside it to join).
  virtual PendingNorm moe_routed_add_norm(const Tensor& x, const Tensor& ids, const Tensor& weights,
                                          std::span<const SwigluWeights> experts, const SharedExpert* shared,
                                          Tensor& out, const AddNorm& then);
  // all_to_all_v's receiving half with the counts read on the device, no host wait: out [M, ...]
  // holds, by source in order, the sources[s].counts[me] rows that follow the first
  // sum(sources[s].counts[0..me)) rows of sources[s].rows (the same dtype and row size as out);
  // recv_counts [G] (I32, no source's counts) how many came from each. Rows of out past them keep
  // their bytes. Counts that reach past a source's rows or out's are index faults (the rows in
  // range still move).
  virtual void gather_routed(std::span<const RoutedRows> sources, int me, Tensor& out, Tensor& recv_counts) = 0;

  // --- sampling (docs/sampling.md) ---
  // ids[R] = a token drawn from each row of logits[R, V] as rows says (greedy: argmax), with the
  // uniform of `stream`. probs [R, V], if defined, receives the distribution each row was drawn
  // from (drafts keep it for verification).
  virtual void sample(const Tensor& logits, const SamplingRows& rows, Draw stream, Tensor& ids, Tensor& probs) = 0;
  // Speculative verification of B sequences with S drafts each. logits [B*(S+1), V]: the target's
  // rows for [last token, d_1 .. d_S] of each sequence; drafts [B, S]; draft_probs [B*S, V]: the
  // distribution each draft was drawn from (read only where the row samples); rows: sampling of
  // the target rows [B*(S+1)]. out [B, S+2]: out[b][0] = a, the drafts accepted left to right
  // (greedy: while equal to the argmax; else with probability min(1, p/q)), then d_1 .. d_a and
  // one more token: the correction drawn from max(0, p - q), or the target's own draw after d_S;
  // the entries after it are -1.
  virtual void verify_drafts(const Tensor& logits, const Tensor& drafts, const Tensor& draft_probs,
                             const SamplingRows& rows, Tensor& out) = 0;
  // The MTP head's first draft step after a verification, from its verdicts [B, S+2] (verify_drafts'
  // out) on the device, so that the step is issued before the host has seen them: each sequence's
  // S + 1 rows pair the verified rows with the token after each, tokens[b*(S+1) + t] =
  // verdicts[b][1 + min(t, a_b)] (rows past the kept a_b + 1 repeat its last token: they only pad),
  // and last_rows[b] = b*(S+1) + a_b, the row each sequence drafts from. routed, if defined, I32
  // [B*(S+1)]: 1 for the kept rows, 0 for the padding ones (ForwardBatch::routed: no expert).
  virtual void draft_inputs(const Tensor& verdicts, Tensor& tokens, Tensor& last_rows, Tensor& routed) = 0;
  // Log-probabilities under the model, log_softmax of the raw logits[R, V] (before temperature
  // and truncation; fp32 out, accumulated in double): logprob[R] of the token ids[R] of each row
  // (an id < 0 means the row has none: its logprob is 0), and the K most likely tokens of each
  // row, top_ids[R, K] and top_logprobs[R, K] by decreasing logprob, ties to the lower id.
  // 0 <= K <= kMaxTopLogprobs; with K = 0 the two may be undefined.
  virtual void token_logprobs(const Tensor& logits, const Tensor& ids, Tensor& logprob, Tensor& top_ids,
                              Tensor& top_logprobs) = 0;

  // --- order ---
  // Side work: the ops `work` issues start after every op issued before side() and may run beside
  // the ops issued after side() returns, until join_side(); the ops issued after join_side() see
  // what side work wrote. Side work must not write what the ops beside it read or write, nor read
  // what they write. A backend of one order (the CPU's) runs `work` in place, as does any backend
  // for side work issued inside side work; a backend joins side work before the host sees its
  // results (a download, a synchronize, the end of a graph's capture). join_side() with no side
  // work out does nothing.
  virtual void side(const std::function<void()>& work) { work(); }
  virtual void join_side() {}
};

// then.x += d, then.h = rms_norm(then.x, then.w) (add_rms_norm): `then` with the norm finished.
PendingNorm add_norm_finished(Ops& ops, const AddNorm& then, const Tensor& d);

}  // namespace ballast::kernels

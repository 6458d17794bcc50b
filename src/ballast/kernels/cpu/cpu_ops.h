#pragma once
// The CPU backend's ops (internal to ballast_kernels_cpu; callers see kernels::Ops through
// CpuBackend::ops()): every op of ops.h on host memory, fp32 arithmetic, parallel over the
// backend's ThreadPool. The implementations are split by concept: cpu_ops.cpp (rows,
// elementwise, norms, rope), cpu_attention.cpp, cpu_deltanet.cpp, cpu_moe.cpp, cpu_sampling.cpp.
#include <cstddef>
#include <memory>

#include "ballast/core/thread_pool.h"
#include "ballast/kernels/backend.h"
#include "ballast/kernels/op_timing.h"
#include "ballast/kernels/ops.h"

namespace ballast::kernels {

// Scratch of one op, grown at first need and never shrunk. Each growth is a counted allocation
// of the backend (on the CPU, host memory is the device's), so a steady-state pass shows none.
class CpuScratch {
 public:
  explicit CpuScratch(Counters& counters) : counters_(counters) {}
  // At least n floats; the contents are undefined.
  float* floats(size_t n);

 private:
  Counters& counters_;
  std::unique_ptr<float[]> data_;
  size_t size_ = 0;
};

class CpuOps final : public Ops {
 public:
  CpuOps(ThreadPool& pool, Counters& counters);

  void embedding(const Tensor& ids, const Tensor& table, Tensor& out) override;
  void matmul(const Tensor& x, const Tensor& w, Tensor& y) override;
  void rms_norm(const Tensor& x, const Tensor& w, float eps, Tensor& y) override;
  void matmul_many(const Tensor& x, std::span<const Tensor> w, std::span<Tensor> y) override;
  void add_rms_norm(Tensor& x, const Tensor& d, const Tensor& w, float eps, Tensor& y) override;
  void add(Tensor& y, const Tensor& x) override;
  void copy(const Tensor& src, Tensor& dst) override;
  void zero(Tensor& t) override;
  void fill_uniform(Tensor& t, uint64_t seed, float scale) override;
  void concat_cols(const Tensor& a, const Tensor& b, Tensor& out) override;
  void silu_mul(const Tensor& gate, const Tensor& up, Tensor& out) override;
  void mul_sigmoid(Tensor& x, const Tensor& gate) override;
  void scale_rows_sigmoid(Tensor& y, const Tensor& s) override;
  void swiglu_down(Tensor& gate, const Tensor& up, const Tensor& w, const Tensor& row_gate, Tensor& out) override;
  void gather_rows(const Tensor& x, const Tensor& rows, int row_div, Tensor& out) override;
  void scatter_rows(const Tensor& x, const Tensor& rows, Tensor& out) override;

  void qk_norm_rope(const Tensor& qg, const Tensor& q_norm, const Tensor& k_norm, float eps, const Tensor& positions,
                    int rot, double theta, Tensor& q, Tensor& gate, Tensor& k) override;
  void attention(const Tensor& q, const Tensor& k_new, const Tensor& v_new, Tensor& k_cache, Tensor& v_cache,
                 const SeqLayout& layout, Tensor& out) override;

  void delta_gates(const Tensor& b, const Tensor& a, const Tensor& A_log, const Tensor& dt_bias, Tensor& beta,
                   Tensor& g) override;
  void causal_conv1d_silu(const Tensor& x, const Tensor& weight, Tensor& states, const SeqLayout& layout,
                          Tensor& out) override;
  void gated_delta_rule(const Tensor& qkv, const Tensor& g, const Tensor& beta, const DeltaRuleDims& dims,
                        Tensor& states, const SeqLayout& layout, Tensor& out) override;
  void gated_rms_norm(const Tensor& x, const Tensor& z, const Tensor& w, float eps, Tensor& y) override;

  void topk_softmax(const Tensor& logits, int k, bool normalize, const Tensor& routed, Tensor& ids,
                    Tensor& weights) override;
  void dispatch(const DispatchTables& tables, const Tensor& ids, const Tensor& counts_by_rank,
                Tensor& slots) override;
  void histogram(const Tensor& keys, Tensor& counts) override;
  void group_by(const Tensor& keys, const Tensor& valid, int div, int groups, Tensor& perm, Tensor& counts,
                Tensor& offsets, Tensor& inverse) override;
  void moe_experts(const Tensor& x, const Tensor& perm, const Tensor& offsets, int row_div,
                   std::span<const SwigluWeights> experts, Tensor& y) override;
  void moe_combine(const Tensor& y, const Tensor& rows, const Tensor& weights, Tensor& out) override;
  void gather_routed(std::span<const RoutedRows> sources, int me, Tensor& out, Tensor& recv_counts) override;

  void sample(const Tensor& logits, const SamplingRows& rows, Draw stream, Tensor& ids, Tensor& probs) override;
  void verify_drafts(const Tensor& logits, const Tensor& drafts, const Tensor& draft_probs, const SamplingRows& rows,
                     Tensor& out) override;
  void draft_inputs(const Tensor& verdicts, Tensor& tokens, Tensor& last_rows, Tensor& routed) override;
  void token_logprobs(const Tensor& logits, const Tensor& ids, Tensor& logprob, Tensor& top_ids,
                      Tensor& top_logprobs) override;

  // Op timing (Backend::start_op_timing): null when off.
  void set_op_times(OpTimes* times) { times_ = times; }
  // The weights come from memory at every pass (matmul.h's weights_stream): CpuBackend says so
  // once the weights it has loaded exceed the last-level cache.
  void set_weights_stream(bool stream) { weights_stream_ = stream; }

 private:
  HostTimedOp time_op(const char* op) { return HostTimedOp(times_, timing_depth_, op); }
  // Runs fn(b, pool) for every sequence b of `rows` [B+1] (cu_seqlens): sequences of many rows
  // one at a time with the pool inside; when at least a pool's worth of sequences have few rows
  // (decode, verification), those side by side, each single-threaded (fn gets pool = nullptr).
  template <typename Fn>
  void for_each_sequence(const int32_t* cu_seqlens, int B, const Fn& fn);

  ThreadPool& pool_;
  CpuScratch attention_scratch_;  // per worker: one row of scores
  CpuScratch expert_scratch_;     // per worker: one group's [rows, H + 2I]
  CpuScratch sampling_scratch_;   // per worker: one distribution [V]
  CpuScratch rows_scratch_;       // the DeltaNet's BF16 conv rows in fp32 (this backend's own are F32)
  OpTimes* times_ = nullptr;
  int timing_depth_ = 0;
  bool weights_stream_ = false;
};

}  // namespace ballast::kernels

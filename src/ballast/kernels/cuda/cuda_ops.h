#pragma once
// CudaOps: every op of ops.h as CUDA kernels on one backend's stream (internal to
// ballast_kernels_cuda). One .cu file per group of ops: cuda_rows.cu (rows, elementwise, norms,
// rope, gates), cuda_matmul.cu, cuda_attention.cu, cuda_deltanet.cu, cuda_moe.cu,
// cuda_sampling.cu. Shapes and dtypes are checked on the host; index data is never read on the
// host: kernels check indices themselves and skip (never write through) an out-of-range one.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "ballast/kernels/backend.h"
#include "ballast/kernels/ops.h"

namespace ballast::kernels {

// Device scratch of the ops, grown at first need and never shrunk. A growth waits for the stream
// (the old buffer may still be read by queued kernels), then allocates: a counted allocation.
// One buffer serves every op of a stream (CudaOps has one for the main stream and one for side
// work): a stream's ops run one after the other.
class CudaScratch {
 public:
  CudaScratch(Counters& counters, cudaStream_t stream) : counters_(counters), stream_(stream) {}
  ~CudaScratch();
  CudaScratch(const CudaScratch&) = delete;
  CudaScratch& operator=(const CudaScratch&) = delete;
  // At least `bytes` bytes, 256-byte aligned; the contents are undefined (kept from the last call
  // where it did not grow).
  void* bytes(size_t n);
  size_t size() const { return size_; }

 private:
  Counters& counters_;
  cudaStream_t stream_;
  void* data_ = nullptr;
  size_t size_ = 0;
};

// What the ops' launch choices depend on, read once by the backend (cudaGetDeviceProperties).
struct CudaDeviceTraits {
  int sms = 1;            // streaming multiprocessors
  int capability = 0;     // compute capability, major x 10 + minor (90 on Hopper)
  size_t smem_optin = 0;  // dynamic shared memory a block may opt in to
  size_t smem_per_sm = 0;  // shared memory of an SM, all its blocks together
  bool hopper() const { return capability / 10 == 9; }  // warpgroup products (with sm_90a code)
  bool bf16_mma() const { return capability >= 80; }    // bf16 mma.sync
  bool fp8_mma() const { return capability >= 89; }     // FP8 mma.sync
};

// Dynamic shared memory past the default 48 KB, allowed a kernel (cudaFuncSetAttribute) the first
// time a launch needs more than it has; a size past the device's opt-in limit is an error naming
// the op. One for every kernel of the ops, keyed by the kernel's address.
class CudaSmemAllowance {
 public:
  explicit CudaSmemAllowance(size_t optin) : optin_(optin) {}
  template <typename Kernel>
  void allow(Kernel* kernel, size_t bytes, const char* op) {
    allow_kernel(reinterpret_cast<const void*>(kernel), bytes, op);
  }

 private:
  void allow_kernel(const void* kernel, size_t bytes, const char* op);
  std::unordered_map<const void*, size_t> allowed_;
  size_t optin_;  // the device's opt-in limit
};

// Device time of each op while timing is on (Backend::start_op_timing): an event recorded before
// and after it on the stream, read back when timing stops.
class CudaOpTimer {
 public:
  explicit CudaOpTimer(cudaStream_t stream) : stream_(stream) {}
  ~CudaOpTimer();
  CudaOpTimer(const CudaOpTimer&) = delete;
  CudaOpTimer& operator=(const CudaOpTimer&) = delete;
  void start() { on_ = true; }
  std::vector<OpTime> stop();  // waits for the stream
  bool on() const { return on_; }
  int record();  // an event recorded on the stream now: its index
  void add(const char* op, int begin, int end) { spans_.push_back({op, begin, end}); }

 private:
  struct Span {
    std::string op;
    int begin, end;
  };
  cudaStream_t stream_;
  bool on_ = false;
  std::vector<cudaEvent_t> events_;
  size_t used_ = 0;
  std::vector<Span> spans_;
};

// Times one op (nothing when timing is off; an op inside another is not counted twice).
class CudaTimedOp {
 public:
  CudaTimedOp(CudaOpTimer& timer, int& depth, const char* op)
      : timer_(depth == 0 && timer.on() ? &timer : nullptr), depth_(depth), op(op) {
    ++depth_;
    if (timer_) begin_ = timer_->record();
  }
  ~CudaTimedOp() {
    --depth_;
    if (timer_) timer_->add(op, begin_, timer_->record());
  }
  CudaTimedOp(const CudaTimedOp&) = delete;
  CudaTimedOp& operator=(const CudaTimedOp&) = delete;

 private:
  CudaOpTimer* timer_;
  int& depth_;
  int begin_ = -1;

 public:
  const char* op;  // may be refined while the op runs (the path it took)
};

// The second stream of side work (Ops::side) and the events that fork it from the main stream and
// join it back (owned here so that the side's scratch, declared after it, goes first).
struct CudaSideStream {
  CudaSideStream();
  ~CudaSideStream();
  CudaSideStream(const CudaSideStream&) = delete;
  CudaSideStream& operator=(const CudaSideStream&) = delete;
  cudaStream_t stream = nullptr;
  cudaEvent_t fork = nullptr, joined = nullptr;  // side work's start, and its end
};

struct ResidualNorm;  // cuda_matmul.cu

class CudaOps final : public Ops {
 public:
  // bf16_matmul: many-row products of 16-bit weights on the tensor cores (cuda_matmul.cu).
  // cublas_workspace: the workspace set on `cublas` (cublasSetStream drops it: it is set again
  // whenever the handle moves between the main and the side stream).
  CudaOps(Counters& counters, const CudaDeviceTraits& device, cudaStream_t stream, cublasHandle_t cublas,
          void* cublas_workspace, size_t cublas_workspace_bytes, bool bf16_matmul);
  CudaOps(const CudaOps&) = delete;
  CudaOps& operator=(const CudaOps&) = delete;

  void embedding(const Tensor& ids, const Tensor& table, Tensor& out) override;
  void matmul(const Tensor& x, const Tensor& w, Tensor& y) override;
  void rms_norm(const Tensor& x, const Tensor& w, float eps, Tensor& y) override;
  void matmul_many(const Tensor& x, std::span<const Tensor> w, std::span<Tensor> y) override;
  void matmul_many_normed(const PendingNorm& n, Tensor& h, std::span<const Tensor> w, std::span<Tensor> y) override;
  void add_rms_norm(Tensor& x, const Tensor& d, const Tensor& w, float eps, Tensor& y) override;
  PendingNorm matmul_add_norm(const Tensor& o, const Tensor& w_out, Tensor& d, const AddNorm& then) override;
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
  void gated_attention(const Tensor& qg, const QkNormRope& r, Tensor& q, Tensor& gate, Tensor& k, const Tensor& v,
                       Tensor& k_cache, Tensor& v_cache, const SeqLayout& layout, Tensor& out) override;

  void delta_gates(const Tensor& b, const Tensor& a, const Tensor& A_log, const Tensor& dt_bias, Tensor& beta,
                   Tensor& g) override;
  // BF16 under bf16 products (the chunked delta rule multiplies its rows in bf16), else F32.
  DType delta_rule_rows_dtype() const override { return bf16_matmul_ ? DType::BF16 : DType::F32; }
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
  bool moe_routed_fits(const Tensor& x, const Tensor& ids, std::span<const SwigluWeights> experts,
                       const SharedExpert* shared) const override;
  void moe_routed(const Tensor& x, const Tensor& ids, const Tensor& weights, std::span<const SwigluWeights> experts,
                  Tensor& out) override;
  PendingNorm moe_routed_add_norm(const Tensor& x, const Tensor& ids, const Tensor& weights,
                                  std::span<const SwigluWeights> experts, const SharedExpert* shared, Tensor& out,
                                  const AddNorm& then) override;
  int64_t norm_parts(int64_t H) const override;
  void gather_routed(std::span<const RoutedRows> sources, int me, Tensor& out, Tensor& recv_counts) override;

  void sample(const Tensor& logits, const SamplingRows& rows, Draw stream, Tensor& ids, Tensor& probs) override;
  void verify_drafts(const Tensor& logits, const Tensor& drafts, const Tensor& draft_probs, const SamplingRows& rows,
                     Tensor& out) override;
  void draft_inputs(const Tensor& verdicts, Tensor& tokens, Tensor& last_rows, Tensor& routed) override;
  void token_logprobs(const Tensor& logits, const Tensor& ids, Tensor& logprob, Tensor& top_ids,
                      Tensor& top_logprobs) override;

  // Side work runs on a second stream with scratch of its own (a fork and a join of events, which
  // a graph's capture records as a fork and a join of its nodes); in place while ops are timed (each
  // op's time alone), inside side work, or with BALLAST_CUDA_SIDE_STREAM=0.
  void side(const std::function<void()>& work) override;
  void join_side() override;

  cudaStream_t stream() const { return stream_; }
  CudaOpTimer& timer() { return timer_; }
  // Throws the first index fault a kernel found since the last call (kernels never write through
  // a bad index; they record it for the host). The backend calls this after every wait for its
  // stream, so a fault surfaces at the pass's download at the latest.
  void raise_device_faults();

 private:
  CudaTimedOp time_op(const char* op) { return CudaTimedOp(timer_, timing_depth_, op); }
  // x as a product of many rows leaves it in the scratch: quantized to FP8 rows and scales
  // (cuBLASLt) or rounded to 16 bits (cuBLAS). matmul_with takes what the product before left
  // (`ready`; matmul_many's products of one x; not trusted where the scratch must grow) and returns
  // what it leaves.
  enum class XForm { none, fp8, bf16, f16 };
  XForm matmul_with(const Tensor& x, const Tensor& w, Tensor& y, XForm ready);
  // matmul_many's products; with `rn` (matmul_many_normed of a pending norm: x is its s, one row) one
  // few-row launch that applies the row's RMS factor and writes h (if rn.h).
  void matmul_many_with(const Tensor& x, std::span<const Tensor> w, std::span<Tensor> y, const ResidualNorm* rn);
  // moe_routed; with `shared` the shared expert as each token's first choice (its rows in place of
  // out's); with `then` (moe_routed_add_norm at one token) the norm's first half at its store.
  void moe_routed_with(const Tensor& x, const Tensor& ids, const Tensor& weights, std::span<const SwigluWeights> experts,
                       const SharedExpert* shared, Tensor& out, const AddNorm* then);
  // attention; with `gated` (gated_attention at decode: k_new is the raw projection, q only its
  // shape) the heads' norms and rotation, the cache write and the gate in the rows kernel.
  struct GatedInputs {
    const Tensor& qg;
    const QkNormRope& r;
  };
  void attention_with(const Tensor& q, const Tensor& k_new, const Tensor& v_new, Tensor& k_cache, Tensor& v_cache,
                      const SeqLayout& layout, Tensor& out, const GatedInputs* gated);
  // Before a cuBLAS or cuBLASLt call: each library has one workspace, so a call on the main stream
  // waits for side work that is out (a call from side work has nothing beside it in a library:
  // the main stream's next call waits for it), and the cuBLAS handle is moved to the current stream.
  cublasHandle_t library_call();
  void cublas_on(cudaStream_t stream);         // the handle on `stream`, with its workspace
  bool move_cublas(cudaStream_t stream) noexcept;  // cublas_on's calls: whether they succeeded

  Counters& counters_;
  const CudaDeviceTraits device_;
  cudaStream_t stream_;  // where ops go now: main_stream_, or side_.stream while side work is issued
  cudaStream_t main_stream_;
  CudaSideStream side_;
  bool side_out_ = false;  // side work issued and not joined
  cublasHandle_t cublas_;
  cudaStream_t cublas_stream_;
  void* cublas_workspace_;
  size_t cublas_workspace_bytes_;
  bool bf16_matmul_;
  CudaScratch main_scratch_, side_scratch_;  // per op call: what one op needs while it runs
  CudaScratch* scratch_ = &main_scratch_;     // the current stream's
  CudaOpTimer timer_;
  CudaSmemAllowance smem_;
  int timing_depth_ = 0;
  // State a group of ops keeps across calls (each .cu file defines its own type and creates it at
  // first need; type-erased so that this header stays free of them). Device memory in them is
  // counted in counters_ like any allocation.
  std::shared_ptr<void> matmul_state_, moe_state_, sampling_state_;
};

}  // namespace ballast::kernels

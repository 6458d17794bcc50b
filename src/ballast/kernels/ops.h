#pragma once
// The op interface the model graph is written against. A backend (CPU here; CUDA beside it)
// implements every op for tensors that live on its device. Activations are F32; weights may be
// F32, BF16, F16 or F8_E4M3 and are read in place. Shapes are in the comments; row-major.
#include <cstdint>
#include <span>

#include "ballast/core/tensor.h"

namespace ballast::kernels {

struct DeltaRuleDims {
  int Hk, Hv, dk, dv;
};

class Ops {
 public:
  virtual ~Ops() = default;
  virtual Device device() const = 0;

  // New zeroed F32 activation on this backend's device.
  virtual Tensor alloc(std::vector<int64_t> shape) = 0;

  // out[T, H] = table[ids[t], :]
  virtual void embedding(std::span<const int32_t> ids, const Tensor& table, Tensor& out) = 0;
  // y[T, N] = x[T, K] @ w[N, K]^T
  virtual void matmul(const Tensor& x, const Tensor& w, Tensor& y) = 0;
  // Zero-centred RMSNorm over the last dim: y = x * rsqrt(mean(x^2) + eps) * (1 + w). x may be y.
  virtual void rms_norm(const Tensor& x, const Tensor& w, float eps, Tensor& y) = 0;
  // y += x
  virtual void add(Tensor& y, const Tensor& x) = 0;
  // dst = src (same number of elements)
  virtual void copy(const Tensor& src, Tensor& dst) = 0;
  // out[T, A + B] = [a[T, A] | b[T, B]]
  virtual void concat_cols(const Tensor& a, const Tensor& b, Tensor& out) = 0;
  // out = silu(gate) * up, elementwise; out may alias gate.
  virtual void silu_mul(const Tensor& gate, const Tensor& up, Tensor& out) = 0;

  // Gated attention pieces. qg[T, Hq, 2*hd] (per head [q | gate]) -> q[T, Hq, hd], gate[T, Hq, hd].
  virtual void split_heads_gate(const Tensor& qg, Tensor& q, Tensor& gate) = 0;
  // NeoX RoPE on the first rot dims of each head of x[T, heads, hd], in place.
  virtual void rope(Tensor& x, std::span<const int32_t> positions, int rot, double theta) = 0;
  // Appends k_new/v_new[T, Hkv, hd] at rows [pos0, pos0+T) of k_cache/v_cache[cap, Hkv, hd], then
  // out[T, Hq, hd] = causal softmax(q k^T / sqrt(hd)) v over cache rows [0, pos0+t].
  virtual void attention(const Tensor& q, const Tensor& k_new, const Tensor& v_new, Tensor& k_cache,
                         Tensor& v_cache, int64_t pos0, Tensor& out) = 0;
  // x *= sigmoid(gate), elementwise.
  virtual void mul_sigmoid(Tensor& x, const Tensor& gate) = 0;

  // Gated DeltaNet pieces (one sequence at a time for the stateful ops).
  // beta[T, Hv] = sigmoid(b); g[T, Hv] = -exp(A_log) * softplus(a + dt_bias)
  virtual void delta_gates(const Tensor& b, const Tensor& a, const Tensor& A_log,
                           const Tensor& dt_bias, Tensor& beta, Tensor& g) = 0;
  // x[T, C] -> out[T, C] = silu(causal depthwise conv1d), weight[C, kc], state[C, kc-1] updated.
  virtual void causal_conv1d_silu(const Tensor& x, const Tensor& weight, Tensor& state, Tensor& out) = 0;
  // qkv[T, 2*Hk*dk + Hv*dv] (after conv) -> out[T, Hv, dv]; state[Hv, dk, dv] updated.
  // chunked = true selects the chunked (WY) form used for prefill; false, the recurrence.
  virtual void gated_delta_rule(const Tensor& qkv, const Tensor& g, const Tensor& beta,
                                const DeltaRuleDims& dims, Tensor& state, Tensor& out, bool chunked) = 0;
  // Per row of dv: y = w * x * rsqrt(mean(x^2) + eps) * silu(z); x[R, dv], z[R, dv].
  virtual void gated_rms_norm(const Tensor& x, const Tensor& z, const Tensor& w, float eps, Tensor& y) = 0;

  // Rows of y scaled: y[t, :] *= sigmoid(s[t]); s[T, 1].
  virtual void scale_rows_sigmoid(Tensor& y, const Tensor& s) = 0;
  // Rows of x gathered: out[i, :] = x[rows[i], :]
  virtual void gather_rows(const Tensor& x, std::span<const int32_t> rows, Tensor& out) = 0;
  // y[rows[i], :] += scale[i] * x[i, :]
  virtual void scatter_add_rows(const Tensor& x, std::span<const int32_t> rows,
                                std::span<const float> scale, Tensor& y) = 0;
  // Copies a tensor to host float memory (for routing decisions, sampling and outputs).
  virtual void to_host(const Tensor& x, float* dst) = 0;
};

}  // namespace ballast::kernels

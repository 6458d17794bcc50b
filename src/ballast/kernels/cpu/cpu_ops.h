#pragma once
// The reference backend: every op on host memory, fp32 arithmetic, parallel over a ThreadPool.
#include "ballast/core/thread_pool.h"
#include "ballast/kernels/ops.h"

namespace ballast::kernels {

class CpuOps final : public Ops {
 public:
  explicit CpuOps(ThreadPool* pool);
  Device device() const override { return Device::CPU; }
  Tensor alloc(std::vector<int64_t> shape) override;

  void embedding(std::span<const int32_t> ids, const Tensor& table, Tensor& out) override;
  void matmul(const Tensor& x, const Tensor& w, Tensor& y) override;
  void rms_norm(const Tensor& x, const Tensor& w, float eps, Tensor& y) override;
  void add(Tensor& y, const Tensor& x) override;
  void copy(const Tensor& src, Tensor& dst) override;
  void concat_cols(const Tensor& a, const Tensor& b, Tensor& out) override;
  void silu_mul(const Tensor& gate, const Tensor& up, Tensor& out) override;
  void split_heads_gate(const Tensor& qg, Tensor& q, Tensor& gate) override;
  void rope(Tensor& x, std::span<const int32_t> positions, int rot, double theta) override;
  void attention(const Tensor& q, const Tensor& k_new, const Tensor& v_new, Tensor& k_cache,
                 Tensor& v_cache, int64_t pos0, Tensor& out) override;
  void mul_sigmoid(Tensor& x, const Tensor& gate) override;
  void delta_gates(const Tensor& b, const Tensor& a, const Tensor& A_log, const Tensor& dt_bias,
                   Tensor& beta, Tensor& g) override;
  void causal_conv1d_silu(const Tensor& x, const Tensor& weight, Tensor& state, Tensor& out) override;
  void gated_delta_rule(const Tensor& qkv, const Tensor& g, const Tensor& beta, const DeltaRuleDims& dims,
                        Tensor& state, Tensor& out, bool chunked) override;
  void gated_rms_norm(const Tensor& x, const Tensor& z, const Tensor& w, float eps, Tensor& y) override;
  void scale_rows_sigmoid(Tensor& y, const Tensor& s) override;
  void gather_rows(const Tensor& x, std::span<const int32_t> rows, Tensor& out) override;
  void scatter_add_rows(const Tensor& x, std::span<const int32_t> rows, std::span<const float> scale,
                        Tensor& y) override;
  void to_host(const Tensor& x, float* dst) override;

 private:
  ThreadPool* pool_;
};

}  // namespace ballast::kernels

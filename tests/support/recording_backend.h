#pragma once
// A backend that captures graphs the way CUDA does, over another backend (the CPU's): between
// begin_capture() and end_capture(key) its ops are recorded, not run, and replay(key) runs them
// again in order; nothing may wait, allocate or copy from the host meanwhile (download, synchronize,
// alloc and upload throw: the contract's, backend.h; a CUDA graph would read a host buffer at
// replay, pinned staging refuses it). Backends of in-process ranks join a capture as CUDA streams
// do: one that waits (after) for a mark taken in a capture records into it until the capture ends,
// so one graph holds every rank's work in the order the ranks issued it (which the data plane's
// meetings make an order their marks allow).
// Checks and errors of the ops come when they run (at replay), as a GPU's faults would. For tests
// of what runs graphs (runtime/graph_group.h) where no GPU is.
#include <array>
#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "ballast/core/error.h"
#include "ballast/kernels/backend.h"
#include "ballast/kernels/ops.h"

namespace ballast::test {

class RecordingBackend final : public kernels::Backend {
 public:
  explicit RecordingBackend(std::unique_ptr<kernels::Backend> inner) : inner_(std::move(inner)), ops_(*this) {}

  Device device() const override { return inner_->device(); }
  std::string describe() const override { return inner_->describe() + ", recording graphs"; }
  kernels::Ops& ops() override { return ops_; }
  Tensor alloc(std::vector<int64_t> shape, DType dtype) override {
    check(!recording(), "recording backend: alloc while recording a graph");
    Tensor t = inner_->alloc(std::move(shape), dtype);
    sync_counters();
    return t;
  }
  Tensor to_device(const Tensor& host) override {
    Tensor t = inner_->to_device(host);
    sync_counters();
    return t;
  }
  void upload(const void* host, Tensor& dst) override {
    check(!recording(), "recording backend: upload while recording a graph");
    inner_->upload(host, dst);
    sync_counters();
  }
  void download(const Tensor& src, void* host) override {
    check(!recording(), "recording backend: download while recording a graph");
    inner_->download(src, host);
    sync_counters();
  }
  void synchronize() override {
    check(!recording(), "recording backend: synchronize while recording a graph");
    inner_->synchronize();
    sync_counters();
  }
  // A mark taken in a capture is the capture's: a backend that waits for it joins it.
  const void* mark(int slot) override {
    marks_.at(size_t(slot)) = recording() ? rec_ : nullptr;
    return &marks_[size_t(slot)];
  }
  void after(const void* mark) override {
    if (!mark) return;
    const auto& rec = *static_cast<const std::shared_ptr<Recording>*>(mark);
    if (rec && rec->open && !recording()) rec_ = rec;
  }

  bool can_capture() const override { return true; }
  bool capturing() const override { return recording(); }
  void begin_capture() override {
    check(!recording(), "recording backend: begin_capture while recording");
    rec_ = std::make_shared<Recording>();
  }
  void end_capture(int64_t key) override {
    check(recording(), "recording backend: end_capture without a capture");
    rec_->open = false;
    graphs_[key] = std::move(rec_);
    sync_counters();
  }
  bool replay(int64_t key) override {
    const auto it = graphs_.find(key);
    if (it == graphs_.end()) return false;
    for (auto& work : it->second->work) work();
    ++counters_.graph_replays;
    sync_counters();
    return true;
  }
  int64_t graph_nodes(int64_t key) const override {
    const auto it = graphs_.find(key);
    return it == graphs_.end() ? 0 : int64_t(it->second->work.size());
  }
  void drop_graphs() override {
    graphs_.clear();
    sync_counters();
  }
  int64_t replays() const { return counters_.graph_replays; }

  void start_op_timing() override { inner_->start_op_timing(); }
  std::vector<kernels::OpTime> stop_op_timing() override { return inner_->stop_op_timing(); }
  kernels::Ceilings measure_ceilings() override { return inner_->measure_ceilings(); }
  kernels::MemoryInfo memory() const override { return inner_->memory(); }
  DType kv_cache_dtype() const override { return inner_->kv_cache_dtype(); }

 private:
  // One graph being recorded or kept: its work in the order issued, by any rank's thread.
  struct Recording {
    std::mutex mu;
    std::vector<std::function<void()>> work;
    std::atomic<bool> open{true};
  };

  bool recording() const { return rec_ && rec_->open; }
  // Runs `work` now, or records it into the open capture this backend is part of.
  void issue(std::function<void()> work) {
    if (!recording()) {
      work();
      return sync_counters();
    }
    std::lock_guard lk(rec_->mu);
    rec_->work.push_back(std::move(work));
  }
  // The inner backend counts what is allocated, copied and moved (memory_epoch included: what
  // tells a runner that its graphs read moved buffers); this one adds the graphs it holds and
  // replayed. A rank's work replayed from another rank's thread is counted at this rank's next call.
  void sync_counters() {
    const int64_t replayed = counters_.graph_replays;
    counters_ = inner_->counters();
    counters_.graph_replays = replayed;
    counters_.graphs = int64_t(graphs_.size());
  }

  // Every op through issue(), its arguments held by value (tensors are handles).
  class RecordingOps final : public kernels::Ops {
   public:
    explicit RecordingOps(RecordingBackend& be) : be_(be) {}
    kernels::Ops& inner() { return be_.inner_->ops(); }
    void embedding(const Tensor& ids, const Tensor& table, Tensor& out) override {
      be_.issue([this, ids = ids, table = table, out = out]() mutable { inner().embedding(ids, table, out); });
    }
    void matmul(const Tensor& x, const Tensor& w, Tensor& y) override {
      be_.issue([this, x = x, w = w, y = y]() mutable { inner().matmul(x, w, y); });
    }
    void rms_norm(const Tensor& x, const Tensor& w, float eps, Tensor& y) override {
      be_.issue([this, x = x, w = w, eps = eps, y = y]() mutable { inner().rms_norm(x, w, eps, y); });
    }
    void matmul_many(const Tensor& x, std::span<const Tensor> w, std::span<Tensor> y) override {
      be_.issue([this, x = x, w = std::vector<Tensor>(w.begin(), w.end()), y = std::vector<Tensor>(y.begin(), y.end())]() mutable { inner().matmul_many(x, w, std::span<Tensor>(y)); });
    }
    void add_rms_norm(Tensor& x, const Tensor& d, const Tensor& w, float eps, Tensor& y) override {
      be_.issue([this, x = x, d = d, w = w, eps = eps, y = y]() mutable { inner().add_rms_norm(x, d, w, eps, y); });
    }
    void add(Tensor& y, const Tensor& x) override {
      be_.issue([this, y = y, x = x]() mutable { inner().add(y, x); });
    }
    void copy(const Tensor& src, Tensor& dst) override {
      be_.issue([this, src = src, dst = dst]() mutable { inner().copy(src, dst); });
    }
    void zero(Tensor& t) override {
      be_.issue([this, t = t]() mutable { inner().zero(t); });
    }
    void fill_uniform(Tensor& t, uint64_t seed, float scale) override {
      be_.issue([this, t = t, seed = seed, scale = scale]() mutable { inner().fill_uniform(t, seed, scale); });
    }
    void concat_cols(const Tensor& a, const Tensor& b, Tensor& out) override {
      be_.issue([this, a = a, b = b, out = out]() mutable { inner().concat_cols(a, b, out); });
    }
    void silu_mul(const Tensor& gate, const Tensor& up, Tensor& out) override {
      be_.issue([this, gate = gate, up = up, out = out]() mutable { inner().silu_mul(gate, up, out); });
    }
    void mul_sigmoid(Tensor& x, const Tensor& gate) override {
      be_.issue([this, x = x, gate = gate]() mutable { inner().mul_sigmoid(x, gate); });
    }
    void scale_rows_sigmoid(Tensor& y, const Tensor& s) override {
      be_.issue([this, y = y, s = s]() mutable { inner().scale_rows_sigmoid(y, s); });
    }
    void swiglu_down(Tensor& gate, const Tensor& up, const Tensor& w, const Tensor& row_gate, Tensor& out) override {
      be_.issue([this, gate = gate, up = up, w = w, row_gate = row_gate, out = out]() mutable { inner().swiglu_down(gate, up, w, row_gate, out); });
    }
    void gather_rows(const Tensor& x, const Tensor& rows, int row_div, Tensor& out) override {
      be_.issue([this, x = x, rows = rows, row_div = row_div, out = out]() mutable { inner().gather_rows(x, rows, row_div, out); });
    }
    void scatter_rows(const Tensor& x, const Tensor& rows, Tensor& out) override {
      be_.issue([this, x = x, rows = rows, out = out]() mutable { inner().scatter_rows(x, rows, out); });
    }
    void qk_norm_rope(const Tensor& qg, const Tensor& q_norm, const Tensor& k_norm, float eps, const Tensor& positions, int rot, double theta, Tensor& q, Tensor& gate, Tensor& k) override {
      be_.issue([this, qg = qg, q_norm = q_norm, k_norm = k_norm, eps = eps, positions = positions, rot = rot, theta = theta, q = q, gate = gate, k = k]() mutable { inner().qk_norm_rope(qg, q_norm, k_norm, eps, positions, rot, theta, q, gate, k); });
    }
    void attention(const Tensor& q, const Tensor& k_new, const Tensor& v_new, Tensor& k_cache, Tensor& v_cache, const kernels::SeqLayout& layout, Tensor& out) override {
      be_.issue([this, q = q, k_new = k_new, v_new = v_new, k_cache = k_cache, v_cache = v_cache, layout = layout, out = out]() mutable { inner().attention(q, k_new, v_new, k_cache, v_cache, layout, out); });
    }
    void delta_gates(const Tensor& b, const Tensor& a, const Tensor& A_log, const Tensor& dt_bias, Tensor& beta, Tensor& g) override {
      be_.issue([this, b = b, a = a, A_log = A_log, dt_bias = dt_bias, beta = beta, g = g]() mutable { inner().delta_gates(b, a, A_log, dt_bias, beta, g); });
    }
    DType delta_rule_rows_dtype() const override { return be_.inner_->ops().delta_rule_rows_dtype(); }
    void causal_conv1d_silu(const Tensor& x, const Tensor& weight, Tensor& states, const kernels::SeqLayout& layout, Tensor& out) override {
      be_.issue([this, x = x, weight = weight, states = states, layout = layout, out = out]() mutable { inner().causal_conv1d_silu(x, weight, states, layout, out); });
    }
    void gated_delta_rule(const Tensor& qkv, const Tensor& g, const Tensor& beta, const kernels::DeltaRuleDims& dims, Tensor& states, const kernels::SeqLayout& layout, Tensor& out) override {
      be_.issue([this, qkv = qkv, g = g, beta = beta, dims = dims, states = states, layout = layout, out = out]() mutable { inner().gated_delta_rule(qkv, g, beta, dims, states, layout, out); });
    }
    void gated_rms_norm(const Tensor& x, const Tensor& z, const Tensor& w, float eps, Tensor& y) override {
      be_.issue([this, x = x, z = z, w = w, eps = eps, y = y]() mutable { inner().gated_rms_norm(x, z, w, eps, y); });
    }
    void topk_softmax(const Tensor& logits, int k, bool normalize, const Tensor& routed, Tensor& ids, Tensor& weights) override {
      be_.issue([this, logits = logits, k = k, normalize = normalize, routed = routed, ids = ids, weights = weights]() mutable { inner().topk_softmax(logits, k, normalize, routed, ids, weights); });
    }
    void dispatch(const kernels::DispatchTables& tables, const Tensor& ids, const Tensor& counts_by_rank, Tensor& slots) override {
      be_.issue([this, tables = tables, ids = ids, counts_by_rank = counts_by_rank, slots = slots]() mutable { inner().dispatch(tables, ids, counts_by_rank, slots); });
    }
    void histogram(const Tensor& keys, Tensor& counts) override {
      be_.issue([this, keys = keys, counts = counts]() mutable { inner().histogram(keys, counts); });
    }
    void group_by(const Tensor& keys, const Tensor& valid, int div, int groups, Tensor& perm, Tensor& counts, Tensor& offsets, Tensor& inverse) override {
      be_.issue([this, keys = keys, valid = valid, div = div, groups = groups, perm = perm, counts = counts, offsets = offsets, inverse = inverse]() mutable { inner().group_by(keys, valid, div, groups, perm, counts, offsets, inverse); });
    }
    void moe_experts(const Tensor& x, const Tensor& perm, const Tensor& offsets, int row_div, std::span<const kernels::SwigluWeights> experts, Tensor& y) override {
      be_.issue([this, x = x, perm = perm, offsets = offsets, row_div = row_div, experts = std::vector<kernels::SwigluWeights>(experts.begin(), experts.end()), y = y]() mutable { inner().moe_experts(x, perm, offsets, row_div, experts, y); });
    }
    void moe_combine(const Tensor& y, const Tensor& rows, const Tensor& weights, Tensor& out) override {
      be_.issue([this, y = y, rows = rows, weights = weights, out = out]() mutable { inner().moe_combine(y, rows, weights, out); });
    }
    // (A shared expert in the pass is moe_routed_add_norm's, which these ops issue as its parts.)
    bool moe_routed_fits(const Tensor& x, const Tensor& ids, std::span<const kernels::SwigluWeights> experts,
                         const kernels::SharedExpert* shared) const override {
      return shared == nullptr && be_.inner_->ops().moe_routed_fits(x, ids, experts, nullptr);
    }
    void moe_routed(const Tensor& x, const Tensor& ids, const Tensor& weights, std::span<const kernels::SwigluWeights> experts, Tensor& out) override {
      be_.issue([this, x = x, ids = ids, weights = weights, experts = std::vector<kernels::SwigluWeights>(experts.begin(), experts.end()), out = out]() mutable { inner().moe_routed(x, ids, weights, experts, out); });
    }
    void gather_routed(std::span<const kernels::RoutedRows> sources, int me, Tensor& out, Tensor& recv_counts) override {
      be_.issue([this, sources = std::vector<kernels::RoutedRows>(sources.begin(), sources.end()), me = me, out = out, recv_counts = recv_counts]() mutable { inner().gather_routed(sources, me, out, recv_counts); });
    }
    void sample(const Tensor& logits, const kernels::SamplingRows& rows, kernels::Draw stream, Tensor& ids, Tensor& probs) override {
      be_.issue([this, logits = logits, rows = rows, stream = stream, ids = ids, probs = probs]() mutable { inner().sample(logits, rows, stream, ids, probs); });
    }
    void verify_drafts(const Tensor& logits, const Tensor& drafts, const Tensor& draft_probs, const kernels::SamplingRows& rows, Tensor& out) override {
      be_.issue([this, logits = logits, drafts = drafts, draft_probs = draft_probs, rows = rows, out = out]() mutable { inner().verify_drafts(logits, drafts, draft_probs, rows, out); });
    }
    void draft_inputs(const Tensor& verdicts, Tensor& tokens, Tensor& last_rows, Tensor& routed) override {
      be_.issue([this, verdicts = verdicts, tokens = tokens, last_rows = last_rows, routed = routed]() mutable { inner().draft_inputs(verdicts, tokens, last_rows, routed); });
    }
    void token_logprobs(const Tensor& logits, const Tensor& ids, Tensor& logprob, Tensor& top_ids, Tensor& top_logprobs) override {
      be_.issue([this, logits = logits, ids = ids, logprob = logprob, top_ids = top_ids, top_logprobs = top_logprobs]() mutable { inner().token_logprobs(logits, ids, logprob, top_ids, top_logprobs); });
    }

   private:
    RecordingBackend& be_;
  };

  std::unique_ptr<kernels::Backend> inner_;
  RecordingOps ops_;
  std::shared_ptr<Recording> rec_;  // the capture this backend records into (begun or joined)
  std::map<int64_t, std::shared_ptr<Recording>> graphs_;
  std::array<std::shared_ptr<Recording>, 4> marks_;  // mark()'s, by slot: the capture it was taken in
};

}  // namespace ballast::test

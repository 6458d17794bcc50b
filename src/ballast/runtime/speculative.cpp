#include "ballast/runtime/speculative.h"

#include <algorithm>
#include <chrono>
#include <optional>

#include "ballast/core/error.h"
#include "ballast/runtime/sampler.h"

namespace ballast::runtime {

namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

struct Seq {
  model::SequenceState trunk, mtp;
  std::vector<int32_t> out;
  bool done = false;
  int32_t next = 0;   // the trunk's greedy token not yet run through the trunk
  Tensor last_hidden;  // [1, H] trunk hidden state whose prediction was `next`
  // Pairs (hidden, token) the head has yet to enter into its cache, before the first draft.
  std::vector<int32_t> pending_tokens;
  Tensor pending_hidden;  // [n, H]
  int64_t pending_pos = 0;  // position of pending_tokens[0]
  std::vector<int32_t> drafts;
  std::vector<std::vector<float>> draft_probs;  // q of each draft (sampling only)
  std::mt19937_64 rng;
};

// Rows [r0, r0 + n) of a host copy of t as an owned tensor.
Tensor rows_of(kernels::Ops& ops, const Tensor& t, int64_t r0, int64_t n) {
  Tensor out = ops.alloc({n, t.dim(1)});
  ops.copy(t.rows(r0, r0 + n), out);
  return out;
}

}  // namespace

GenerationResult generate_speculative(Engine& engine, const std::vector<std::vector<int32_t>>& prompts,
                                      int max_new_tokens, const SpeculativeOptions& opts, SpeculativeStats* stats,
                                      std::span<const int32_t> stop_ids) {
  auto& model = engine.model();
  auto& ops = engine.ops();
  check(model.has_mtp(), "speculative decoding needs an MTP head (mtp.* tensors), the model has none");
  check(opts.num_steps >= 1, "--speculative-num-steps must be at least 1");
  check(max_new_tokens > 0, "max_new_tokens must be positive");
  const int S = opts.num_steps;
  const int64_t V = engine.config().vocab_size;
  SpeculativeStats local;
  SpeculativeStats& st = stats ? *stats : local;
  st.proposed.assign(size_t(S), 0);
  st.accepted.assign(size_t(S), 0);

  const size_t n = prompts.size();
  std::vector<Seq> seqs(n);
  for (size_t i = 0; i < n; ++i) seqs[i].rng = sequence_rng(opts.sampling, i);
  GenerationResult res;
  auto is_stop = [&](int32_t id) { return std::find(stop_ids.begin(), stop_ids.end(), id) != stop_ids.end(); };
  // Emits a token; returns false once the sequence is finished.
  auto emit = [&](Seq& s, int32_t id) {
    if (s.done) return false;
    s.out.push_back(id);
    s.done = is_stop(id) || int(s.out.size()) >= max_new_tokens;
    return !s.done;
  };
  std::vector<float> logits;
  const SamplingParams& sp = opts.sampling;
  auto row_of = [&](int64_t row) { return std::span<const float>(logits).subspan(size_t(row * V), size_t(V)); };
  // A token from the trunk's row: argmax, or a draw from its processed distribution.
  auto choose = [&](Seq& s, int64_t row) {
    return sp.greedy() ? argmax(row_of(row)) : sample(distribution(row_of(row), sp), s.rng);
  };

  // Prefill: every prompt position's hidden state feeds the head's cache.
  std::vector<model::SeqChunk> chunks;
  for (size_t i = 0; i < n; ++i) {
    check(!prompts[i].empty(), "empty prompt");
    const int64_t cap = int64_t(prompts[i].size()) + max_new_tokens + S + 2;
    seqs[i].trunk = model.new_sequence(cap);
    seqs[i].mtp = model.new_mtp_sequence(cap);
    chunks.push_back({&seqs[i].trunk, prompts[i], true});
    res.stats.prefill_tokens += int64_t(prompts[i].size());
  }
  auto t0 = Clock::now();
  model::ForwardResult r = engine.forward(chunks);
  ++res.stats.passes;
  logits.resize(size_t(r.logits.numel()));
  ops.to_host(r.logits, logits.data());
  for (size_t i = 0; i < n; ++i) {
    Seq& s = seqs[i];
    const int64_t T = int64_t(prompts[i].size()), first = r.first_row[i];
    s.next = choose(s, first + T - 1);
    s.last_hidden = rows_of(ops, r.hidden, first + T - 1, 1);
    s.pending_tokens.assign(prompts[i].begin() + 1, prompts[i].end());
    s.pending_hidden = rows_of(ops, r.hidden, first, T - 1);
    s.pending_pos = 1;
    emit(s, s.next);
  }
  res.stats.prefill_seconds = since(t0);

  t0 = Clock::now();
  for (;;) {
    std::vector<size_t> live;
    for (size_t i = 0; i < n; ++i)
      if (!seqs[i].done) live.push_back(i);
    if (!engine.any_rank(!live.empty())) break;

    // Draft: step 1 enters the pending pairs and (last_hidden, next); later steps chain.
    const auto td = Clock::now();
    std::vector<Tensor> hid(live.size());
    std::vector<std::vector<int32_t>> toks(live.size());
    std::vector<model::MtpChunk> mchunks;
    for (size_t j = 0; j < live.size(); ++j) {
      Seq& s = seqs[live[j]];
      toks[j] = s.pending_tokens;
      toks[j].push_back(s.next);
      const int64_t m = int64_t(toks[j].size());
      hid[j] = ops.alloc({m, engine.config().hidden_size});
      if (m > 1) {
        Tensor head = hid[j].rows(0, m - 1);
        ops.copy(s.pending_hidden, head);
      }
      Tensor tail = hid[j].rows(m - 1, m);
      ops.copy(s.last_hidden, tail);
      mchunks.push_back({&s.mtp, toks[j], hid[j], s.pending_pos, false});
      s.drafts.clear();
      s.draft_probs.clear();
    }
    for (int step = 0; step < S; ++step) {
      model::ForwardResult d = engine.mtp_forward(mchunks);
      logits.resize(size_t(d.logits.numel()));
      ops.to_host(d.logits, logits.data());
      std::vector<model::MtpChunk> next_chunks;
      for (size_t j = 0; j < live.size(); ++j) {
        Seq& s = seqs[live[j]];
        if (sp.greedy()) {
          s.drafts.push_back(argmax(row_of(d.first_row[j])));
        } else {
          s.draft_probs.push_back(distribution(row_of(d.first_row[j]), sp));
          s.drafts.push_back(sample(s.draft_probs.back(), s.rng));
        }
        hid[j] = rows_of(ops, d.hidden, d.first_row[j], 1);  // after mtp.norm: the chained input
        toks[j] = {s.drafts.back()};
        next_chunks.push_back({&s.mtp, toks[j], hid[j], mchunks[j].position + int64_t(mchunks[j].tokens.size()), false});
      }
      mchunks = std::move(next_chunks);
    }
    for (size_t j = 0; j < live.size(); ++j) {
      Seq& s = seqs[live[j]];
      // Chained entries were computed from the head's own outputs: drop them.
      s.mtp.length -= S - 1;
      s.pending_tokens.clear();
    }
    st.draft_seconds += since(td);

    // Verify: the trunk scores [next, drafts...] in one pass, keeping DeltaNet states per token.
    const auto tv = Clock::now();
    std::vector<std::vector<int32_t>> verify(live.size());
    chunks.clear();
    for (size_t j = 0; j < live.size(); ++j) {
      Seq& s = seqs[live[j]];
      verify[j] = {s.next};
      verify[j].insert(verify[j].end(), s.drafts.begin(), s.drafts.end());
      chunks.push_back({&s.trunk, verify[j], true, true});
    }
    r = engine.forward(chunks);
    ++res.stats.passes;
    logits.resize(size_t(r.logits.numel()));
    ops.to_host(r.logits, logits.data());
    for (size_t j = 0; j < live.size(); ++j) {
      Seq& s = seqs[live[j]];
      const int64_t first = r.first_row[j];
      const int64_t pos0 = s.trunk.length - (S + 1);  // position of `next`
      // Accept drafts left to right; the first rejection is replaced by the correction token.
      int a = 0;
      std::optional<int32_t> correction;
      for (; a < S; ++a) {
        if (sp.greedy()) {
          if (s.drafts[size_t(a)] != argmax(row_of(first + a))) break;
          continue;
        }
        const auto acc = accept_or_resample(distribution(row_of(first + a), sp), s.draft_probs[size_t(a)],
                                            s.drafts[size_t(a)], s.rng);
        if (!acc.accepted) {
          correction = acc.token;
          break;
        }
      }
      for (int k = 0; k < S; ++k) {
        ++st.proposed[size_t(k)];
        if (k < a) ++st.accepted[size_t(k)];
      }
      ++st.rounds;
      const int32_t bonus = correction ? *correction : choose(s, first + a);
      int emitted = 0;
      for (int k = 0; k < a && emit(s, s.drafts[size_t(k)]); ++k) ++emitted;
      if (!s.done) {
        emit(s, bonus);
        ++emitted;
      }
      st.emitted += emitted;
      res.stats.decode_tokens += emitted;
      model.roll_back(s.trunk, a + 1);
      // Next round enters the accepted drafts with the trunk's hidden states, then drafts from
      // (hidden after the last accepted token, bonus).
      s.pending_tokens.assign(s.drafts.begin(), s.drafts.begin() + a);
      s.pending_hidden = rows_of(ops, r.hidden, first, a);
      s.pending_pos = pos0 + 1;
      s.last_hidden = rows_of(ops, r.hidden, first + a, 1);
      s.next = bonus;
    }
    st.verify_seconds += since(tv);
  }
  res.stats.decode_seconds = since(t0);
  for (auto& s : seqs) res.outputs.push_back(std::move(s.out));
  return res;
}

}  // namespace ballast::runtime

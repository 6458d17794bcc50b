#include "ballast/runtime/speculative.h"

#include "ballast/core/clock.h"
#include "ballast/core/error.h"

namespace ballast::runtime {

void Engine::draft(std::span<const Scheduled> pass, const ModelRunner::Result& trunk, std::span<const int64_t> kept) {
  const double t0 = now_seconds();
  const int S = steps_;
  const int64_t V = config().vocab_size;
  // SGLang's mode keeps the draft layer's load out of every record.
  std::optional<eplb::Recorder::PauseGuard> paused;
  if (opts_.ep.mtp_experts == MtpExperts::sglang && mtp_ep_) paused.emplace(mtp_ep_->domain.recorder.pause());

  // Step 1: every sequence of the trunk pass that goes on enters its kept rows, pairs (hidden
  // state of row t, token t + 1); the ones whose rows reached their last token draft from the last.
  // Where the runner replays graphs and every such sequence drafts from at most S + 1 kept rows (a
  // decode or verification pass), each is padded to S + 1 rows (rolled back after the pass), so
  // that the step is one graph whatever was accepted.
  bool pad = runner_->pads_first_drafts();
  for (size_t i = 0; i < pass.size() && pad; ++i)
    pad = pass[i].seq->finished() || (pass[i].draws && kept[i] <= S + 1);
  std::vector<ModelRunner::Entry> entries;
  std::vector<std::vector<int32_t>> hidden_rows, padded_tokens;
  hidden_rows.reserve(pass.size());
  padded_tokens.reserve(pass.size());
  std::vector<Sequence*> drafting;
  std::vector<int64_t> padding;
  for (size_t i = 0; i < pass.size(); ++i) {
    Sequence& q = *pass[i].seq;
    if (q.finished()) continue;
    const int64_t n = kept[i], first = q.cache.length - n, extra = pad ? S + 1 - n : 0;
    check(q.cache.mtp_length == first, "MTP cache of {} rows behind a trunk of {}", q.cache.mtp_length, first);
    check(cache_->append(q.cache, {.mtp_rows = n + extra}), "MTP cache: no room reserved for {} rows", n + extra);
    auto& rows = hidden_rows.emplace_back();
    for (int64_t t = 0; t < n + extra; ++t) rows.push_back(int32_t(trunk.first_row[i] + std::min(t, n - 1)));
    std::span<const int32_t> tokens = std::span<const int32_t>(q.tokens).subspan(size_t(first + 1), size_t(n));
    if (extra > 0) {
      auto& t = padded_tokens.emplace_back(tokens.begin(), tokens.end());
      t.resize(size_t(n + extra), 0);
      tokens = t;
    }
    const bool drafts = pass[i].draws;
    entries.push_back({&q.cache, tokens, drafts ? ModelRunner::Logits::last : ModelRunner::Logits::none, false, rows,
                       int(extra)});
    if (drafts) drafting.push_back(&q), padding.push_back(extra);
  }
  bool samples = false;
  for (const Sequence* q : drafting) samples = samples || !q->sampling.greedy();
  if (samples && !kept_probs_.defined())
    kept_probs_ = backend_->alloc({int64_t(opts_.cache.max_running_requests) * S, V}, DType::F32);

  // The drafts stay on the device until the round is drafted: a chained step takes its token from
  // the step before on the device (its entries' tokens are placeholders), so the host issues every
  // step without waiting, and the last step's download brings them all (with its domain's load).
  ModelRunner::Result r;
  const Tensor* source = &trunk.hidden;
  const int64_t D = int64_t(drafting.size());
  const std::vector<int32_t> placeholder{0};
  auto step_ids = [&](int step) { return mtp_out_.results((step + 1) * D).rows(step * D, (step + 1) * D); };
  for (int step = 0; step < S; ++step) {
    Tensor previous;
    if (step > 0) {
      // Chained steps: the last draft with the head's own output for it.
      entries.clear();
      hidden_rows.clear();
      for (size_t j = 0; j < drafting.size(); ++j) {
        Sequence& q = *drafting[j];
        check(cache_->append(q.cache, {.mtp_rows = 1}), "MTP cache: no room reserved for a chained draft");
        hidden_rows.push_back({r.first_logit[j]});
        entries.push_back({&q.cache, placeholder, ModelRunner::Logits::last, false, hidden_rows.back()});
      }
      source = &r.hidden;
      previous = step_ids(step - 1);
    }
    // Without expert parallelism an empty pass has nothing to do; under it every rank takes part.
    if (entries.empty() && !comm_) break;
    r = runner_->mtp_forward(entries, *source, previous);
    if (step == 0)
      for (size_t j = 0; j < drafting.size(); ++j) cache_->rollback(drafting[j]->cache, 0, padding[j]);
    std::vector<Sampler::Row> rows;
    std::vector<int32_t> kept_rows;
    for (const Sequence* q : drafting) {
      rows.push_back(row_of(*q, q->cache.mtp_length + 1));  // the pair at mtp_length predicts the next
      kept_rows.push_back(q->place * S + step);
    }
    Tensor ids = step_ids(step);
    if (D > 0)
      sampler_->sample(runner_->workspace(), r.logits.rows(0, D), rows, kernels::Draw::draft, ids,
                       samples ? kept_probs_ : Tensor(), kept_rows);
    int64_t pass_rows = 0;
    for (const auto& e : entries) pass_rows += int64_t(e.tokens.size());
    const bool last = step == S - 1;
    const std::span<const int32_t> host = finish_pass(mtp_out_, mtp_ep_.get(), last ? S * D : 0, pass_rows);
    if (last)
      for (int k = 0; k < S; ++k)
        for (size_t j = 0; j < drafting.size(); ++j) drafting[j]->drafts.push_back(host[size_t(k * D) + j]);
  }
  // Chained entries came from the head's own outputs: the next round re-enters those positions
  // from the trunk's hidden states.
  for (Sequence* q : drafting) cache_->rollback(q->cache, 0, S - 1);
  spec_stats_.draft_seconds += seconds_since(t0);
}

GenerationResult generate_speculative(Engine& engine, const std::vector<std::vector<int32_t>>& prompts,
                                      int max_new_tokens, const SpeculativeOptions& opts, SpeculativeStats* stats,
                                      std::span<const int32_t> stop_ids) {
  check(opts.num_steps >= 1, "--speculative-num-steps must be at least 1");
  const int before = engine.speculative_steps();
  engine.set_speculative_steps(opts.num_steps);
  const SpeculativeStats start = engine.speculative_stats();
  GenerationResult res = engine.generate(prompts, max_new_tokens, stop_ids, opts.sampling);
  if (stats) {
    const SpeculativeStats& end = engine.speculative_stats();
    *stats = end;
    stats->rounds -= start.rounds;
    stats->emitted -= start.emitted;
    stats->draft_seconds -= start.draft_seconds;
    stats->verify_seconds -= start.verify_seconds;
    stats->proposed.resize(size_t(opts.num_steps), 0);
    stats->accepted.resize(size_t(opts.num_steps), 0);
    for (size_t k = 0; k < start.proposed.size() && k < stats->proposed.size(); ++k) {
      stats->proposed[k] -= start.proposed[k];
      stats->accepted[k] -= start.accepted[k];
    }
  }
  engine.set_speculative_steps(before);
  return res;
}

}  // namespace ballast::runtime

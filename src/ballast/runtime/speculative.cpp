#include "ballast/runtime/speculative.h"

#include "ballast/core/clock.h"
#include "ballast/core/error.h"

namespace ballast::runtime {

std::optional<eplb::Recorder::PauseGuard> Engine::pause_mtp_recording() {
  // SGLang's mode keeps the draft layer's load out of every record.
  std::optional<eplb::Recorder::PauseGuard> paused;
  if (opts_.ep.mtp_experts == MtpExperts::sglang && mtp_ep_) paused.emplace(mtp_ep_->domain.recorder.pause());
  return paused;
}

bool Engine::drafts_early(std::span<const Scheduled> pass) {
  // Every sequence verifies, so every one drafts from its S + 1 rows padded whatever it keeps. One
  // draft step only: with chained steps a round downloads twice either way (they need the host's
  // positions), and issuing the first step early measured 2-3% slower there (docs/perf.md).
  if (steps_ != 1 || !runner_->pads_first_drafts()) return false;  // the same on every rank
  bool mine = true;
  for (const Scheduled& s : pass) mine = mine && s.verify;
  // Under EP the step's collectives come in another order when early: every rank must agree (one
  // without sequences has no say).
  if (!comm_) return mine && !pass.empty();
  return !comm_->all_reduce_or(!mine);
}

Engine::DraftRound Engine::first_draft_step(std::span<const Scheduled> pass, const ModelRunner::Result& trunk,
                                            std::span<const int64_t> kept, const Tensor& verdicts, Tensor early_ids) {
  const double t0 = now_seconds();
  const int S = steps_;
  const int64_t V = config().vocab_size;
  const bool early = verdicts.defined();
  const auto paused = pause_mtp_recording();
  DraftRound round;
  // Every sequence of the trunk pass that goes on enters its kept rows, pairs (hidden state of row
  // t, token t + 1); the ones whose rows reached their last token draft from the last. Where the
  // runner replays graphs and every such sequence drafts from at most S + 1 kept rows (a decode or
  // verification pass), each is padded to S + 1 rows (rolled back after the pass), so that the step
  // is one graph whatever was accepted. Issued early (before the verification's download), every
  // verifying sequence enters all S + 1 rows, tokens and drafting row read from the verdicts on the
  // device; what it did not keep is rolled back once the host has them.
  bool pad = runner_->pads_first_drafts();
  for (size_t i = 0; i < pass.size() && pad && !early; ++i)
    pad = pass[i].seq->finished() || (pass[i].draws && kept[i] <= S + 1);
  std::vector<ModelRunner::Entry> entries;
  std::vector<std::vector<int32_t>> hidden_rows, padded_tokens;
  hidden_rows.reserve(pass.size());
  padded_tokens.reserve(pass.size());
  for (size_t i = 0; i < pass.size(); ++i) {
    Sequence& q = *pass[i].seq;
    if (q.finished()) continue;
    const int64_t n = early ? S + 1 : kept[i], first = q.cache.length - n, extra = pad && !early ? S + 1 - n : 0;
    check(q.cache.mtp_length == first, "MTP cache of {} rows behind a trunk of {}", q.cache.mtp_length, first);
    check(cache_->append(q.cache, {.mtp_rows = n + extra}), "MTP cache: no room reserved for {} rows", n + extra);
    auto& rows = hidden_rows.emplace_back();
    for (int64_t t = 0; t < n + extra; ++t) rows.push_back(int32_t(trunk.first_row[i] + std::min(t, n - 1)));
    std::span<const int32_t> tokens;  // early: read from the verdicts
    if (!early) tokens = std::span<const int32_t>(q.tokens).subspan(size_t(first + 1), size_t(n));
    if (extra > 0 || early) {
      auto& t = padded_tokens.emplace_back(tokens.begin(), tokens.end());
      t.resize(size_t(n + extra), 0);
      tokens = t;
    }
    const bool drafts = pass[i].draws;
    entries.push_back({&q.cache, tokens, drafts ? ModelRunner::Logits::last : ModelRunner::Logits::none, false, rows,
                       int(extra)});
    if (drafts) round.drafting.push_back(&q), round.padding.push_back(extra);
  }
  for (const Sequence* q : round.drafting) round.samples = round.samples || !q->sampling.greedy();
  if (round.samples && !kept_probs_.defined())
    kept_probs_ = backend_->alloc({int64_t(opts_.cache.max_running_requests) * S, V}, DType::F32);
  const int64_t D = int64_t(round.drafting.size());
  // Without expert parallelism an empty pass has nothing to do; under it every rank takes part.
  if (entries.empty() && !comm_) return round;
  round.last = runner_->mtp_forward(entries, trunk.hidden, {}, verdicts);
  // The first step's drafts: downloaded with the verification's results when issued early, else
  // after the chained steps' (the last S * D words of the round), or now when there are none.
  round.first_ids = early ? early_ids : mtp_out_.results(S * D).rows((S - 1) * D, S * D);
  sample_drafts(round, 0, round.first_ids);
  int64_t pass_rows = 0;
  for (const auto& e : entries) pass_rows += int64_t(e.tokens.size());
  const std::span<const int32_t> host = finish_pass(mtp_out_, mtp_ep_.get(), !early && S == 1 ? D : 0, pass_rows);
  if (!early && S == 1) round.first_drafts.assign(host.begin(), host.end());
  spec_stats_.draft_seconds += seconds_since(t0);
  return round;
}

void Engine::sample_drafts(const DraftRound& round, int step, Tensor ids) {
  const int S = steps_;
  const int64_t D = int64_t(round.drafting.size());
  if (D == 0) return;
  // A draft's uniform is the sequence's next draft draw's: a fresh one for every draft (its
  // position in the sequence depends on what the verification before kept, which the host may not
  // have seen when it issues the round).
  std::vector<Sampler::Row> rows;
  std::vector<int32_t> kept_rows;
  for (const Sequence* q : round.drafting) {
    rows.push_back(row_of(*q, q->draft_draws + step));
    kept_rows.push_back(q->place * S + step);
  }
  sampler_->sample(runner_->workspace(), round.last.logits.rows(0, D), rows, kernels::Draw::draft, ids,
                   round.samples ? kept_probs_ : Tensor(), kept_rows);
}

void Engine::draft(DraftRound& round) {
  const double t0 = now_seconds();
  const int S = steps_;
  const auto paused = pause_mtp_recording();
  for (size_t j = 0; j < round.drafting.size(); ++j) cache_->rollback(round.drafting[j]->cache, 0, round.padding[j]);

  // The chained steps stay on the device until the round is drafted: each takes its token from the
  // step before on the device (its entries' tokens are placeholders), so the host issues every step
  // without waiting, and the last step's download brings them all (with its domain's load).
  const int64_t D = int64_t(round.drafting.size());
  const std::vector<int32_t> placeholder{0};
  auto step_ids = [&](int step) { return mtp_out_.results(step * D).rows((step - 1) * D, step * D); };
  std::vector<ModelRunner::Entry> entries;
  std::vector<std::vector<int32_t>> hidden_rows(round.drafting.size());
  std::span<const int32_t> host;
  for (int step = 1; step < S; ++step) {
    entries.clear();
    for (size_t j = 0; j < round.drafting.size(); ++j) {
      Sequence& q = *round.drafting[j];
      check(cache_->append(q.cache, {.mtp_rows = 1}), "MTP cache: no room reserved for a chained draft");
      hidden_rows[j] = {round.last.first_logit[j]};
      entries.push_back({&q.cache, placeholder, ModelRunner::Logits::last, false, hidden_rows[j]});
    }
    if (entries.empty() && !comm_) break;
    const Tensor previous = step == 1 ? round.first_ids : step_ids(step - 1);
    round.last = runner_->mtp_forward(entries, round.last.hidden, previous);
    sample_drafts(round, step, step_ids(step));
    const bool last = step == S - 1;
    host = finish_pass(mtp_out_, mtp_ep_.get(), last ? S * D : 0, int64_t(entries.size()));
  }
  if (round.first_drafts.empty() && D > 0) round.first_drafts.assign(host.begin() + (S - 1) * D, host.end());
  for (size_t j = 0; j < round.drafting.size(); ++j) {
    Sequence& q = *round.drafting[j];
    q.drafts.push_back(round.first_drafts[j]);
    for (int k = 1; k < S; ++k) q.drafts.push_back(host[size_t((k - 1) * D) + j]);
    q.draft_draws += S;
    // Chained entries came from the head's own outputs: the next round re-enters those positions
    // from the trunk's hidden states.
    cache_->rollback(q.cache, 0, S - 1);
  }
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

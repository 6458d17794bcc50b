#include "ballast/runtime/scheduler.h"

#include <algorithm>

#include "ballast/core/error.h"

namespace ballast::runtime {

Scheduler::Scheduler(StateCache& cache, const SchedulerOptions& o, dist::Communicator* control)
    : cache_(cache), opt_(o), control_(control) {
  check(o.max_running >= 1 && o.draft_steps >= 0 && o.token_budget >= 1 + o.draft_steps,
        "scheduler: {} running requests, a budget of {} rows per pass and {} draft steps", o.max_running,
        o.token_budget, o.draft_steps);
  for (int p = o.max_running - 1; p >= 0; --p) free_places_.push_back(p);
}

Growth Scheduler::growth(int64_t rows, bool verify) const {
  // With speculation the MTP head runs ahead of the trunk by up to the drafts of one round.
  return {.rows = rows, .mtp_rows = 0, .verify = verify, .headroom = opt_.draft_steps};
}

void Scheduler::add(Sequence& s) {
  check(!s.tokens.empty() && s.max_new_tokens > 0, "request {}: an empty prompt or no tokens to generate", s.id);
  // At most: every token but the last generated one, a verification's drafts and the head's
  // headroom past them.
  const int64_t rows = int64_t(s.prompt_len) + s.max_new_tokens + 2 * int64_t(opt_.draft_steps);
  check(cache_.blocks_for(rows) <= cache_.total_blocks(),
        "request {}: a prompt of {} tokens and {} new ones need {} cache rows, the cache holds {}", s.id, s.prompt_len,
        s.max_new_tokens, rows, cache_.total_blocks() * cache_.block_size());
  s.status = SequenceStatus::waiting;
  waiting_.push_back(&s);
}

void Scheduler::preempt(Sequence& s) {
  // Recomputed later from its tokens: the cache (and any drafts) are dropped.
  running_.erase(std::find(running_.begin(), running_.end(), &s));
  cache_.release(s.cache);
  s.drafts.clear();
  free_places_.push_back(s.place);
  s.place = -1;
  s.status = SequenceStatus::waiting;
  waiting_.push_front(&s);
  ++preemptions_;
}

void Scheduler::retire(Sequence& s) {
  if (auto it = std::find(running_.begin(), running_.end(), &s); it != running_.end()) running_.erase(it);
  if (auto it = std::find(waiting_.begin(), waiting_.end(), &s); it != waiting_.end()) waiting_.erase(it);
  cache_.release(s.cache);
  if (s.place >= 0) free_places_.push_back(s.place);
  s.place = -1;
  s.drafts.clear();
}

std::optional<std::vector<Scheduled>> Scheduler::schedule() {
  const bool mine = has_work();
  if (control_ ? !control_->all_reduce_or(mine) : !mine) return std::nullopt;
  std::vector<Scheduled> pass;
  int64_t budget = opt_.token_budget;
  auto draws = [](const Sequence& s) { return s.cache.length == int64_t(s.tokens.size()); };

  // Running sequences, oldest first. A preemption takes the newest, which is never one already
  // scheduled (they come before it).
  for (size_t i = 0; i < running_.size() && budget > 0; ++i) {
    Sequence& s = *running_[i];
    const bool verify = !s.drafts.empty() && int64_t(s.drafts.size()) + 1 <= budget;
    if (!verify) s.drafts.clear();  // no room to verify them in this pass: decode plainly
    const int64_t rows = verify ? int64_t(s.drafts.size()) + 1 : std::min(s.pending(), budget);
    bool preempted_self = false;
    while (!cache_.append(s.cache, growth(rows, verify))) {
      Sequence& victim = *running_.back();
      preempt(victim);
      if (&victim == &s) {
        preempted_self = true;
        break;
      }
    }
    if (preempted_self) break;
    pass.push_back({&s, rows, verify, verify || draws(s)});
    budget -= rows;
  }

  // Waiting sequences in arrival order (preempted ones first), while a place, rows and cache room last.
  while (budget > 0 && !waiting_.empty() && !free_places_.empty()) {
    Sequence& s = *waiting_.front();
    if (!cache_.allocate(s.cache)) break;
    const int64_t rows = std::min(s.pending(), budget);
    if (!cache_.append(s.cache, growth(rows, false))) {
      cache_.release(s.cache);
      break;
    }
    waiting_.pop_front();
    running_.push_back(&s);
    s.status = SequenceStatus::running;
    s.place = free_places_.back();
    free_places_.pop_back();
    pass.push_back({&s, rows, false, draws(s)});
    budget -= rows;
  }
  return pass;
}

}  // namespace ballast::runtime

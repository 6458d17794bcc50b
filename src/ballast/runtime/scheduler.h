#pragma once
// Forms each pass from waiting and running sequences (nano-vllm's scheduler with vLLM's chunked
// prefill): running sequences first, oldest first (a decode is one row, a verification one row
// per draft plus one, an unfinished prefill its next chunk), then waiting sequences are admitted
// in arrival order while the pass has rows left under the token budget, a free running place and
// cache room. When the cache cannot take a running sequence's rows, the newest running sequence
// is preempted: its cache is released and it waits to be recomputed from its tokens.
//
// Under expert parallelism every rank has its own scheduler and sequences; the ranks agree on
// whether to take another pass together (all of them, or none: every MoE layer is a collective).
#include <deque>
#include <optional>
#include <vector>

#include "ballast/dist/communicator.h"
#include "ballast/runtime/sequence.h"
#include "ballast/runtime/state_cache.h"

namespace ballast::runtime {

struct SchedulerOptions {
  int max_running = 256;       // --max-running-requests
  int64_t token_budget = 2048; // --chunked-prefill-size: rows per pass over all sequences
  int draft_steps = 0;         // MTP speculation: drafts per round (0: none)
};

// One sequence's share of a pass.
struct Scheduled {
  Sequence* seq;
  int64_t rows;  // trunk rows: a prefill chunk, 1 (decode), or 1 + drafts (verify)
  bool verify;   // rows are [last token, drafts...]
  bool draws;    // the rows reach the last known token: the last one's logits draw the next
};

class Scheduler {
 public:
  // control: the ranks that must agree on each pass (null: this rank alone).
  Scheduler(StateCache& cache, const SchedulerOptions& options, dist::Communicator* control = nullptr);

  const SchedulerOptions& options() const { return opt_; }
  // Queues a sequence; throws if it could never fit the cache even alone.
  void add(Sequence& seq);
  // The next pass on this rank (possibly empty under expert parallelism), or nullopt once no rank
  // has anything left to run.
  std::optional<std::vector<Scheduled>> schedule();
  // Removes a finished (or aborted) sequence and releases its cache.
  void retire(Sequence& seq);

  bool has_work() const { return !waiting_.empty() || !running_.empty(); }
  size_t waiting() const { return waiting_.size(); }
  size_t running() const { return running_.size(); }
  int64_t preemptions() const { return preemptions_; }

 private:
  void preempt(Sequence& seq);
  Growth growth(int64_t rows, bool verify) const;

  StateCache& cache_;
  SchedulerOptions opt_;
  dist::Communicator* control_;
  std::deque<Sequence*> waiting_, running_;
  std::vector<int> free_places_;  // Sequence::place values not taken
  int64_t preemptions_ = 0;
};

}  // namespace ballast::runtime

#pragma once
// The rebalance schedule of one expert domain, run identically on every rank after each forward
// pass: close the pass (recorder, per-pass balance), and every `interval` passes all-reduce the
// recorded counts, plan a new placement (deterministic, so every rank plans the same), and move
// expert weights rank to rank through the communicator, `layers_per_chunk` layers per pass. A
// layer's tables switch only once all its weights are in place on every rank; a failed transfer
// anywhere leaves the old placement in force.
#include <functional>
#include <string>
#include <vector>

#include "ballast/core/log.h"
#include "ballast/dist/communicator.h"
#include "ballast/eplb/migration.h"
#include "ballast/moe/expert_domain.h"
#include "ballast/moe/slot_store.h"

namespace ballast::moe {

struct RebalanceEvent {
  std::string domain;
  int64_t pass = 0;          // pass after which it was planned
  int layers_changed = 0;
  int experts_moved = 0;     // copies between ranks
  int64_t bytes_moved = 0;
  double plan_seconds = 0, total_seconds = 0;  // total: planning + all chunks of migration
  double balancedness_before = 0, balancedness_after = 0;  // in-sample, on the window it planned from
  bool failed = false;
  bool done = false;
};

class Rebalancer {
 public:
  Rebalancer(ExpertDomain& domain, SlotStore& slots, dist::Communicator& comm, Logger log = {});

  // Called by every rank after each forward pass of the domain.
  void after_pass();

  const std::vector<RebalanceEvent>& events() const { return events_; }
  // Per pass: mean over layers of balancedness (mean/max rank load) of what was dispatched.
  const std::vector<double>& balancedness() const { return balancedness_; }
  bool migrating() const { return !layers_left_.empty(); }

  // Test hook: return true to make the transfer of a copy fail on this rank.
  std::function<bool(const eplb::Copy&)> fail_copy;

 private:
  void close_pass();
  void start_rebalance();
  void migrate_chunk();

  ExpertDomain& d_;
  SlotStore& slots_;
  dist::Communicator& comm_;
  Logger log_;
  std::vector<RebalanceEvent> events_;
  std::vector<double> balancedness_;
  eplb::Placement target_;
  eplb::MigrationPlan plan_;
  std::vector<int> layers_left_;
  double started_at_ = 0;
};

}  // namespace ballast::moe

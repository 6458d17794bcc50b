#pragma once
// The rebalance schedule of one expert domain, run identically on every rank after each of the
// domain's forward passes (docs/eplb.md): close the pass (per-pass balance, the recorder's
// window), and every `interval` passes plan a new placement from the window (deterministic, so
// every rank plans the same) and move expert weights rank to rank over the data plane,
// `layers_per_chunk` layers per pass. A layer's tables switch only once all its weights are in
// place on every rank; a failed transfer anywhere leaves the old placement in force.
#include <span>
#include <string>
#include <vector>

#include "ballast/core/log.h"
#include "ballast/dist/communicator.h"
#include "ballast/dist/data_plane.h"
#include "ballast/eplb/migration.h"
#include "ballast/kernels/backend.h"
#include "ballast/moe/dispatch_tables.h"
#include "ballast/moe/expert_domain.h"
#include "ballast/moe/slot_store.h"

namespace ballast::moe {

struct RebalanceEvent {
  std::string domain;
  int64_t pass = 0;          // pass after which it was planned
  int layers_changed = 0;
  int layers_trending = 0;   // layers planned for their extrapolated trend (eplb/forecast.h)
  int experts_moved = 0;     // copies between ranks
  int64_t bytes_moved = 0;
  double plan_seconds = 0, total_seconds = 0;  // total: planning + all chunks of migration
  double balancedness_before = 0, balancedness_after = 0;  // in-sample, on the window it planned from
  bool failed = false;
  bool done = false;
};

class Rebalancer {
 public:
  // Staging for one chunk of migration is allocated here, once.
  Rebalancer(ExpertDomain& domain, DispatchTables& tables, SlotStore& slots, kernels::Backend& backend,
             dist::Communicator& control, dist::DataPlane& data, Logger log = {});

  // Called by every rank after each forward pass of the domain with the pass's load [L][P], summed
  // over ranks (the same on every rank), and for a per_token recorder this rank's chosen slots.
  void after_pass(std::span<const int32_t> load, std::vector<std::vector<int32_t>> tokens = {});

  const std::vector<RebalanceEvent>& events() const { return events_; }
  // Per pass: mean over layers of balancedness (mean/max rank load) of what was dispatched.
  const std::vector<double>& balancedness() const { return balancedness_; }
  bool migrating() const { return !layers_left_.empty(); }
  // Device memory held for migration (a chunk's received weights), 0 while rebalancing is off.
  size_t staging_bytes() const { return staging_.defined() ? staging_.nbytes() : 0; }

 private:
  void close_pass(std::span<const int32_t> load, std::vector<std::vector<int32_t>> tokens);
  void start_rebalance();
  void migrate_chunk();

  ExpertDomain& d_;
  DispatchTables& tables_;
  SlotStore& slots_;
  kernels::Backend& be_;
  dist::Communicator& control_;
  dist::DataPlane& data_;
  Logger log_;
  int chunk_layers_;  // layers migrated per pass
  Tensor staging_;    // [chunk_layers * K] blobs: where received weights wait for the switch
  std::vector<RebalanceEvent> events_;
  std::vector<double> balancedness_;
  eplb::Placement target_;
  eplb::MigrationPlan plan_;
  std::vector<int> layers_left_;
  double started_at_ = 0;
};

}  // namespace ballast::moe

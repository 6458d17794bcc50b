#pragma once
// An expert domain: a set of MoE layers sharing one placement, one load recorder, one dispatch
// policy and one rebalance schedule (docs/eplb.md). The trunk's MoE layers form one domain, the
// MTP head's another; each rank holds its own copy of each domain's host state, and the ranks
// keep them identical by running the same deterministic decisions on all-reduced counts.
#include <string>

#include "ballast/eplb/dispatch.h"
#include "ballast/eplb/placement.h"
#include "ballast/eplb/plan.h"
#include "ballast/eplb/recorder.h"

namespace ballast::moe {

struct RebalanceOptions {
  bool enabled = false;              // --enable-eplb
  int interval = 1000;               // --eplb-rebalance-num-iterations (passes of this domain)
  int layers_per_chunk = 0;          // --eplb-rebalance-layers-per-chunk (0: all layers at once)
  eplb::Algorithm algorithm = eplb::Algorithm::ballast;  // --eplb-algorithm
  int slices = 4;                    // ballast: time slices of the window
  double migration_weight = 0.0;     // ballast: cost of moving an expert
  bool forecast = true;              // ballast: plan for the next interval's forecast (--no-eplb-forecast: off)
};

struct DomainOptions {
  int redundant = 0;                 // --ep-num-redundant-experts
  int ranks_per_node = 0;            // 0: all ranks on one node
  eplb::Dispatch dispatch = eplb::Dispatch::static_;  // --ep-dispatch-algorithm
  eplb::RecorderMode recorder_mode = eplb::RecorderMode::stat;  // --expert-distribution-recorder-mode
  int recorder_window = 1000;        // --expert-distribution-recorder-buffer-size
  RebalanceOptions rebalance;
};

// The planner's options for a domain's settings: algorithm, time slices, migration weight and the
// dispatch policy its placements are served with. (current: the placement in force, or nullptr.)
inline eplb::PlanOptions plan_options(const DomainOptions& o, int ranks, int redundant,
                                      const eplb::Placement* current = nullptr) {
  eplb::PlanOptions po;
  po.algorithm = o.rebalance.algorithm;
  po.ranks = ranks, po.redundant = redundant;
  po.slices = o.rebalance.slices;
  po.migration_weight = o.rebalance.migration_weight;
  po.dispatch = o.dispatch;
  // The placement serves the next `interval` passes: layers whose window shows a trend are
  // planned for where it leads (eplb/forecast.h).
  po.forecast = o.rebalance.forecast, po.horizon = o.rebalance.interval;
  po.current = current;
  return po;
}

struct ExpertDomain {
  ExpertDomain(std::string name, eplb::Placement initial, const DomainOptions& opts)
      : name(std::move(name)),
        placement(std::move(initial)),
        options(opts),
        recorder(placement.layers, placement.physical, opts.recorder_mode, opts.recorder_window) {
    placement.validate();
  }

  std::string name;
  eplb::Placement placement;  // in force; a layer's row switches once its weights are in place
  DomainOptions options;
  eplb::Recorder recorder;
  int64_t passes = 0;  // forward passes of this domain so far
};

}  // namespace ballast::moe

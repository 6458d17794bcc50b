#pragma once
// Evaluation over time: (1) the synthetic quality suite (plan on a window, evaluate in-sample and
// on later passes), (2) online rebalancing replayed over a trace.
#include "ballast/eplb/dispatch.h"
#include "ballast/eplb/load.h"
#include "ballast/eplb/plan.h"
#include "ballast/eplb/synth.h"

#include <string>
#include <vector>

namespace ballast::eplb {

// Per-pass balancedness of one layer under a dispatch policy (mean over passes).
//   counts: [T][E] rows of stride `stride`
double mean_pass_balancedness(std::span<const int32_t> row, int ranks, int ranks_per_node, Dispatch policy,
                              const double* counts, int passes, size_t stride, int experts, uint64_t seed = 0);

struct SuiteWorkload {
  SynthSpec spec;
  int ranks = 64, redundant = 64;
};
// The suite of the README: each model shape x {lognormal 0.5 (mild), lognormal 1.0, zipf 0.9}
// x each steady-drift strength of `trends` (SynthSpec::trend; empty: noise.trend only; a workload
// with a trend is named ".../trend-X").
// noise: tokens per pass (global batch), drift, burst and seed of every workload (the popularity
// kind, skew and shape come from the suite).
std::vector<SuiteWorkload> default_suite(int window, int eval_passes, const SynthSpec& noise = SynthSpec(),
                                         const std::vector<double>& trends = {});

struct SuiteRow {
  std::string workload, algorithm;
  std::string planned_for;       // ballast: the dispatch policy it planned for ("" for the others)
  double in_sample = 0;          // window's sum, even split over replicas (what the planner sees)
  double in_static = 0;          // per pass over the window, static dispatch
  double out_static = 0;         // per pass after the window, static dispatch
  double in_balanced = 0;        // per pass over the window, balanced dispatch
  double out_balanced = 0;       // per pass after the window, balanced dispatch
  double achieved_over_bound = 0;  // in-sample max load / lower bound
  double plan_ms = 0;            // planning time for all layers
};

// Plans on passes [0, window) of each workload with each algorithm (ballast twice: planned for
// static and for balanced dispatch), evaluates on passes [window, window + eval). Rows: per
// workload, per algorithm (and target). max_layers > 0 limits the layers evaluated (a quick run).
// forecast: ballast plans for the forecast of the evaluated passes (PlanOptions::forecast).
std::vector<SuiteRow> run_suite(const std::vector<SuiteWorkload>& suite, int window,
                                const std::vector<Algorithm>& algorithms, int slices = 4, int max_layers = 0,
                                bool forecast = true, double damping = -1);

struct ReplayOptions {
  int interval = 1000;       // passes between rebalances (the window is the last interval)
  int ranks = 64, redundant = 64;
  int ranks_per_node = 0;
  int nodes = 1, groups = 1;  // deepseek_hierarchical
  int slices = 4;
  double migration_weight = 0.05;
  bool forecast = true;      // ballast: plan for the forecast of the next interval (PlanOptions::forecast)
  std::vector<Algorithm> algorithms{Algorithm::deepseek, Algorithm::ballast};
  std::vector<Dispatch> dispatches{Dispatch::static_, Dispatch::balanced};
};

struct ReplaySeries {
  std::string algorithm, dispatch;
  std::vector<double> per_pass;    // [T] mean over layers of the pass's balancedness
  std::vector<int> moved;          // experts moved between ranks at each rebalance
  double mean_after_first = 0;     // mean over passes after the first rebalance
  double min_after_first = 1;
  int64_t total_moved = 0;
};

// Starts from the trivial placement, rebalances every `interval` passes on the last interval.
std::vector<ReplaySeries> replay(const LoadTrace& trace, const ReplayOptions& opt);

}  // namespace ballast::eplb

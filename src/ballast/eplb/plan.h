#pragma once
// One entry point over the balancing algorithms, as the CLI, Python and the engine call it.
#include "ballast/eplb/ballast_algorithm.h"
#include "ballast/eplb/forecast.h"
#include "ballast/eplb/load.h"
#include "ballast/eplb/placement.h"

#include <string>
#include <vector>

namespace ballast::eplb {

enum class Algorithm { deepseek, deepseek_hierarchical, ballast };
Algorithm parse_algorithm(const std::string& name);  // throws on an unknown name
std::string algorithm_name(Algorithm a);

struct PlanOptions {
  Algorithm algorithm = Algorithm::ballast;
  int ranks = 0;       // G
  int redundant = 0;   // R; P = E + R
  // deepseek_hierarchical and ballast: server nodes and expert groups (groups % nodes == 0, else
  // refused, as SGLang refuses it; deepseek_hierarchical never falls back to the global policy).
  // ballast with nodes = 1 ignores groups.
  int nodes = 1;
  int groups = 1;
  int slices = 4;      // ballast: time slices of the window (when the load has passes)
  double migration_weight = 0.0;        // ballast: see BallastOptions
  Dispatch dispatch = Dispatch::static_;  // ballast: the dispatch policy served with (BallastOptions)
  const Placement* current = nullptr;   // ballast: placement in force
  // ballast with a window of passes: plan for the forecast of the next `horizon` passes
  // (forecast.h: each layer whose load has a significant trend gets its trend extrapolated, as
  // `slices` time slices; the other layers keep the window's own slices, and expect_recent_level
  // below). false: the window's own slices for every layer. horizon 0: the window's length.
  bool forecast = true;
  int horizon = 0;
  double damping = -1;  // ForecastOptions::damping (< 0: estimated, and the significance test)
  // With the forecast, static and random dispatch: the layers without a significant trend are
  // also balanced for the level of the window's last quarter (the best forecast of a random walk;
  // BallastOptions::expected), the window keeping a balance at least deepseek's. false: the
  // window's slices alone (as before this option). Balanced dispatch never uses it.
  bool expect_recent_level = true;
  std::vector<LayerTrend>* trends = nullptr;  // out (optional): the forecast's decision per layer (empty: none made)
};

// load: [T][L][E] (T = 1: a summed matrix). deepseek algorithms plan on the sum over passes;
// ballast on `slices` consecutive time slices of it, or on the forecast (PlanOptions::forecast).
Placement plan(const LoadTrace& load, const PlanOptions& opt, std::vector<LayerPlanStats>* stats = nullptr);

}  // namespace ballast::eplb

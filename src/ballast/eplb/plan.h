#pragma once
// One entry point over the balancing algorithms, as the CLI, Python and the engine call it.
#include "ballast/eplb/ballast_algorithm.h"
#include "ballast/eplb/load.h"
#include "ballast/eplb/placement.h"

#include <string>

namespace ballast::eplb {

enum class Algorithm { deepseek, deepseek_hierarchical, ballast };
Algorithm parse_algorithm(const std::string& name);  // throws on an unknown name
std::string algorithm_name(Algorithm a);

struct PlanOptions {
  Algorithm algorithm = Algorithm::ballast;
  int ranks = 0;       // G
  int redundant = 0;   // R; P = E + R
  int nodes = 1;       // deepseek_hierarchical: server nodes
  int groups = 1;      // deepseek_hierarchical: expert groups
  int slices = 4;      // ballast: time slices of the window (when the load has passes)
  double migration_weight = 0.0;        // ballast: see BallastOptions
  Dispatch dispatch = Dispatch::static_;  // ballast: the dispatch policy served with (BallastOptions)
  const Placement* current = nullptr;   // ballast: placement in force
};

// load: [T][L][E] (T = 1: a summed matrix). deepseek algorithms plan on the sum over passes;
// ballast on `slices` consecutive time slices of it.
Placement plan(const LoadTrace& load, const PlanOptions& opt, std::vector<LayerPlanStats>* stats = nullptr);

}  // namespace ballast::eplb

#include "ballast/eplb/plan.h"

#include "ballast/core/error.h"
#include "ballast/eplb/deepseek.h"
#include "ballast/eplb/limits.h"

#include <cmath>

namespace ballast::eplb {

Algorithm parse_algorithm(const std::string& name) {
  if (name == "deepseek") return Algorithm::deepseek;
  if (name == "deepseek_hierarchical") return Algorithm::deepseek_hierarchical;
  if (name == "ballast") return Algorithm::ballast;
  fail("unknown EPLB algorithm '{}' (expected deepseek, deepseek_hierarchical or ballast)", name);
}

std::string algorithm_name(Algorithm a) {
  switch (a) {
    case Algorithm::deepseek: return "deepseek";
    case Algorithm::deepseek_hierarchical: return "deepseek_hierarchical";
    case Algorithm::ballast: return "ballast";
  }
  return "?";
}

Placement plan(const LoadTrace& load, const PlanOptions& opt, std::vector<LayerPlanStats>* stats) {
  load.validate("plan: load");
  check(opt.ranks > 0, "plan: number of ranks must be positive, got {}", opt.ranks);
  check(opt.redundant >= 0, "plan: number of redundant slots must be >= 0, got {}", opt.redundant);
  check(opt.ranks <= kMaxRanks, "plan: {} ranks, more than the limit of {}", opt.ranks, kMaxRanks);
  check(int64_t(load.experts) + opt.redundant <= kMaxSlots,
        "plan: {} experts + {} redundant slots, more than the limit of {} slots per layer", load.experts, opt.redundant,
        kMaxSlots);
  check(opt.nodes >= 1 && opt.nodes <= opt.ranks && opt.groups >= 1 && opt.groups <= load.experts,
        "plan: {} nodes and {} expert groups must be >= 1 and at most the {} ranks and {} experts", opt.nodes,
        opt.groups, opt.ranks, load.experts);
  check(opt.slices >= 1 && opt.slices <= kMaxSlots, "plan: {} slices must be in [1, {}]", opt.slices, kMaxSlots);
  check(opt.horizon >= 0, "plan: horizon {} must be >= 0", opt.horizon);
  check(std::isfinite(opt.migration_weight) && opt.migration_weight >= 0,
        "plan: migration weight {} must be a finite number >= 0", opt.migration_weight);
  check(!std::isnan(opt.damping) && opt.damping <= 1, "plan: damping {} must be a number <= 1 (< 0: estimated)",
        opt.damping);
  const int E = load.experts, P = E + opt.redundant;
  check(P % opt.ranks == 0, "plan: {} physical slots ({} experts + {} redundant) are not divisible by {} ranks", P, E,
        opt.redundant, opt.ranks);
  if (opt.algorithm == Algorithm::ballast) {
    BallastOptions b;
    b.ranks = opt.ranks, b.physical = P, b.migration_weight = opt.migration_weight, b.current = opt.current;
    b.dispatch = opt.dispatch, b.nodes = opt.nodes, b.groups = opt.nodes > 1 ? opt.groups : 1;
    LoadTrace sl, level;
    if (opt.trends) opt.trends->clear();
    if (load.passes == 1) {
      sl = load;
    } else if (opt.forecast) {
      ForecastOptions fo;
      fo.slices = std::max(1, opt.slices), fo.horizon = opt.horizon, fo.damping = opt.damping;
      // Static (and random) dispatch: the layers without a trend are also balanced for their recent
      // level (BallastOptions::expected); balanced dispatch evens out each pass and plans for the
      // window's spread of loads (docs/eplb.md).
      const bool ahead = opt.dispatch != Dispatch::balanced && opt.expect_recent_level;
      std::vector<LayerTrend> own;
      std::vector<LayerTrend>* tr = opt.trends ? opt.trends : ahead ? &own : nullptr;
      sl = forecast_slices(load, fo, tr, ahead ? &level : nullptr);
      if (ahead) {
        b.expected = &level;
        b.expected_layers.resize(load.layers);
        for (int l = 0; l < load.layers; ++l) b.expected_layers[l] = !(*tr)[l].extrapolated;
      }
    } else {
      sl = load.slices(0, load.passes, std::max(1, opt.slices));
    }
    return ballast_rebalance(sl, b, stats);
  }
  LoadTrace sum = load.passes == 1 ? load : load.sum();
  int groups = opt.algorithm == Algorithm::deepseek ? 1 : opt.groups;
  int nodes = opt.algorithm == Algorithm::deepseek ? 1 : opt.nodes;
  auto r = deepseek::rebalance_hierarchical(sum.count.data(), load.layers, E, P, groups, nodes, opt.ranks);
  Placement out(load.layers, E, P, opt.ranks);
  std::copy(r.phy2log.begin(), r.phy2log.end(), out.phy2log.begin());
  return out;
}

}  // namespace ballast::eplb

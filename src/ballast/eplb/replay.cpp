#include "ballast/eplb/replay.h"

#include "ballast/core/clock.h"

#include "ballast/core/error.h"
#include "ballast/eplb/deepseek.h"
#include "ballast/eplb/limits.h"
#include "ballast/eplb/metrics.h"
#include "ballast/eplb/migration.h"

#include <algorithm>

namespace ballast::eplb {

double mean_pass_balancedness(std::span<const int32_t> row, int G, int rpn, Dispatch policy, const double* counts,
                              int T, size_t stride, int E, uint64_t seed) {
  double s = 0;
  if (policy == Dispatch::static_) {
    // The table does not depend on the pass: made once, then dispatch_static's sums per pass.
    const auto table = static_table(row, G, rpn, E);
    std::vector<double> slot(row.size());
    for (int t = 0; t < T; ++t) {
      const double* c = counts + t * stride;
      std::fill(slot.begin(), slot.end(), 0.0);
      for (int g = 0; g < G; ++g)
        for (int e = 0; e < E; ++e) slot[table[size_t(g) * E + e]] += c[e] / G;
      s += balancedness(rank_loads_from_slots(slot, G));
    }
    return T > 0 ? s / T : 1.0;
  }
  for (int t = 0; t < T; ++t) {
    auto slot = dispatch(policy, row, G, rpn, counts + t * stride, E, seed + uint64_t(t));
    auto rl = rank_loads_from_slots(slot, G);
    s += balancedness(rl);
  }
  return T > 0 ? s / T : 1.0;
}

std::vector<SuiteWorkload> default_suite(int window, int eval_passes, const SynthSpec& noise,
                                         const std::vector<double>& trends) {
  const std::vector<double> strengths = trends.empty() ? std::vector<double>{noise.trend} : trends;
  std::vector<SuiteWorkload> out;
  for (std::string model : {"qwen3-next", "qwen3.5-397b", "deepseek-v3"}) {
    struct V { const char* tag; Popularity p; double skew; };
    for (V v : {V{"lognormal-0.5", Popularity::lognormal, 0.5}, V{"lognormal-1.0", Popularity::lognormal, 1.0},
                V{"zipf-0.9", Popularity::zipf, 0.9}})
      for (double trend : strengths) {
        SuiteWorkload w;
        w.spec = model_shape(model);
        w.spec.name = model + "/" + v.tag + (trend != 0 ? fmt::format("/trend-{}", trend) : "");
        w.spec.popularity = v.p, w.spec.skew = v.skew;
        w.spec.passes = window + eval_passes;
        w.spec.tokens = noise.tokens, w.spec.drift = noise.drift, w.spec.burst = noise.burst, w.spec.seed = noise.seed;
        w.spec.trend = trend;
        if (model == "deepseek-v3") w.ranks = 32, w.redundant = 32;
        out.push_back(w);
      }
  }
  return out;
}

std::vector<SuiteRow> run_suite(const std::vector<SuiteWorkload>& suite, int window,
                                const std::vector<Algorithm>& algorithms, int slices, int max_layers, bool forecast, double damping) {
  // ballast plans for a dispatch policy (a row each); the others have one placement for both.
  struct Variant { Algorithm algorithm; Dispatch target; };
  std::vector<Variant> variants;
  for (Algorithm a : algorithms) {
    variants.push_back({a, Dispatch::static_});
    if (a == Algorithm::ballast) variants.push_back({a, Dispatch::balanced});
  }
  std::vector<SuiteRow> rows;
  for (const auto& w : suite) {
    const int E = w.spec.experts, P = E + w.redundant, G = w.ranks, T = w.spec.passes;
    check(window > 0 && window < T, "suite: window {} must be inside the {} passes", window, T);
    const int L = max_layers > 0 ? std::min(max_layers, w.spec.layers) : w.spec.layers;
    std::vector<SuiteRow> acc(variants.size());
    for (size_t v = 0; v < variants.size(); ++v) {
      acc[v].workload = w.spec.name, acc[v].algorithm = algorithm_name(variants[v].algorithm);
      if (variants[v].algorithm == Algorithm::ballast) acc[v].planned_for = dispatch_name(variants[v].target);
    }
    for (int l = 0; l < L; ++l) {
      auto counts = synth_layer(w.spec, l);  // [T][E]
      LoadTrace win(window, 1, E);
      std::copy(counts.begin(), counts.begin() + size_t(window) * E, win.count.begin());
      LoadTrace sum = win.sum();
      const double* later = counts.data() + size_t(window) * E;
      for (size_t v = 0; v < variants.size(); ++v) {
        PlanOptions po;
        po.algorithm = variants[v].algorithm, po.ranks = G, po.redundant = w.redundant, po.slices = slices;
        po.dispatch = variants[v].target, po.forecast = forecast, po.horizon = T - window, po.damping = damping;
        const double t0 = now_seconds();
        Placement pl = plan(win, po);
        SuiteRow& r = acc[v];
        r.plan_ms += seconds_since(t0) * 1e3;
        auto row = pl.layer(0);
        auto rl = rank_loads_even(row, G, sum.at(0, 0), E);
        r.in_sample += balancedness(rl);
        r.achieved_over_bound += *std::max_element(rl.begin(), rl.end()) / max_load_lower_bound(sum.at(0, 0), E, P, G);
        auto per_pass = [&](Dispatch d, const double* c, int n) { return mean_pass_balancedness(row, G, 0, d, c, n, E, E); };
        r.in_static += per_pass(Dispatch::static_, counts.data(), window);
        r.out_static += per_pass(Dispatch::static_, later, T - window);
        r.in_balanced += per_pass(Dispatch::balanced, counts.data(), window);
        r.out_balanced += per_pass(Dispatch::balanced, later, T - window);
      }
    }
    for (auto& r : acc) {
      for (double* x : {&r.in_sample, &r.in_static, &r.out_static, &r.in_balanced, &r.out_balanced, &r.achieved_over_bound})
        *x /= L;
      r.plan_ms *= double(w.spec.layers) / L;  // all layers
      rows.push_back(r);
    }
  }
  return rows;
}

std::vector<ReplaySeries> replay(const LoadTrace& trace, const ReplayOptions& opt) {
  trace.validate("replay: trace");
  check(opt.interval > 0, "replay: interval must be >= 1 pass");
  check(opt.ranks > 0 && opt.ranks <= kMaxRanks, "replay: ranks must be in [1, {}], got {}", kMaxRanks, opt.ranks);
  check(opt.redundant >= 0 && int64_t(trace.experts) + opt.redundant <= kMaxSlots,
        "replay: {} redundant slots must be >= 0 and with the {} experts at most {} slots", opt.redundant,
        trace.experts, kMaxSlots);
  check(opt.ranks_per_node >= 0 && (opt.ranks_per_node == 0 || opt.ranks % opt.ranks_per_node == 0),
        "replay: {} ranks are not divisible into nodes of {} ranks", opt.ranks, opt.ranks_per_node);
  const int T = trace.passes, L = trace.layers, E = trace.experts, G = opt.ranks, P = E + opt.redundant;
  check(P % G == 0, "replay: {} slots ({} experts + {} redundant) are not divisible by {} ranks", P, E, opt.redundant,
        G);
  std::vector<ReplaySeries> out;
  // Each (algorithm, dispatch) pair runs its own schedule: ballast plans for the dispatch policy
  // it will be served with.
  for (Algorithm alg : opt.algorithms)
    for (Dispatch d : opt.dispatches) {
      ReplaySeries s;
      s.algorithm = algorithm_name(alg), s.dispatch = dispatch_name(d);
      s.per_pass.assign(T, 0.0);
      Placement current = Placement::trivial(L, E, P, G);
      for (int t = 0; t < T; ++t) {
        if (t > 0 && t % opt.interval == 0) {
          PlanOptions po;
          po.algorithm = alg, po.ranks = G, po.redundant = opt.redundant, po.nodes = opt.nodes, po.groups = opt.groups;
          po.slices = opt.slices, po.migration_weight = opt.migration_weight, po.current = &current, po.dispatch = d;
          po.forecast = opt.forecast, po.horizon = opt.interval;
          Placement next = plan(trace.range(t - opt.interval, t), po);
          s.moved.push_back(plan_migration(current, next, opt.ranks_per_node).experts_moved);
          current = std::move(next);
        }
        double sum = 0;
        for (int l = 0; l < L; ++l) {
          auto slot = dispatch(d, current.layer(l), G, opt.ranks_per_node, trace.at(t, l), E, uint64_t(t) * 1000003u + l);
          sum += balancedness(rank_loads_from_slots(slot, G));
        }
        s.per_pass[t] = sum / L;
      }
      for (int m : s.moved) s.total_moved += m;
      int n = 0;
      double sum = 0;
      for (int t = std::min(opt.interval, T - 1); t < T; ++t)
        sum += s.per_pass[t], n++, s.min_after_first = std::min(s.min_after_first, s.per_pass[t]);
      s.mean_after_first = n ? sum / n : 0;
      out.push_back(std::move(s));
    }
  return out;
}

}  // namespace ballast::eplb

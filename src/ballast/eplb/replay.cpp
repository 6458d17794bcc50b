#include "ballast/eplb/replay.h"

#include "ballast/core/error.h"
#include "ballast/eplb/deepseek.h"
#include "ballast/eplb/metrics.h"
#include "ballast/eplb/migration.h"

#include <algorithm>
#include <chrono>

namespace ballast::eplb {

double mean_pass_balancedness(std::span<const int32_t> row, int G, int rpn, Dispatch policy, const double* counts,
                              int T, size_t stride, int E, uint64_t seed) {
  double s = 0;
  for (int t = 0; t < T; ++t) {
    auto slot = dispatch(policy, row, G, rpn, counts + t * stride, E, seed + uint64_t(t));
    auto rl = rank_loads_from_slots(slot, G);
    s += balancedness(rl);
  }
  return T > 0 ? s / T : 1.0;
}

std::vector<SuiteWorkload> default_suite(int window, int eval_passes, const SynthSpec& noise) {
  std::vector<SuiteWorkload> out;
  for (std::string model : {"qwen3-next", "qwen3.5-397b", "deepseek-v3"}) {
    struct V { const char* tag; Popularity p; double skew; };
    for (V v : {V{"lognormal-0.5", Popularity::lognormal, 0.5}, V{"lognormal-1.0", Popularity::lognormal, 1.0},
                V{"zipf-0.9", Popularity::zipf, 0.9}}) {
      SuiteWorkload w;
      w.spec = model_shape(model);
      w.spec.name = model + "/" + v.tag;
      w.spec.popularity = v.p, w.spec.skew = v.skew;
      w.spec.passes = window + eval_passes;
      w.spec.tokens = noise.tokens, w.spec.drift = noise.drift, w.spec.burst = noise.burst, w.spec.seed = noise.seed;
      if (model == "deepseek-v3") w.ranks = 32, w.redundant = 32;
      out.push_back(w);
    }
  }
  return out;
}

std::vector<SuiteRow> run_suite(const std::vector<SuiteWorkload>& suite, int window,
                                const std::vector<Algorithm>& algorithms, int slices, int max_layers) {
  std::vector<SuiteRow> rows;
  for (const auto& w : suite) {
    const int E = w.spec.experts, P = E + w.redundant, G = w.ranks, T = w.spec.passes;
    check(window > 0 && window < T, "suite: window {} must be inside the {} passes", window, T);
    const int L = max_layers > 0 ? std::min(max_layers, w.spec.layers) : w.spec.layers;
    std::vector<SuiteRow> acc(algorithms.size());
    for (size_t a = 0; a < algorithms.size(); ++a) acc[a].workload = w.spec.name, acc[a].algorithm = algorithm_name(algorithms[a]);
    for (int l = 0; l < L; ++l) {
      auto counts = synth_layer(w.spec, l);  // [T][E]
      LoadTrace win(window, 1, E);
      std::copy(counts.begin(), counts.begin() + size_t(window) * E, win.count.begin());
      LoadTrace sum = win.sum();
      for (size_t a = 0; a < algorithms.size(); ++a) {
        PlanOptions po;
        po.algorithm = algorithms[a], po.ranks = G, po.redundant = w.redundant, po.slices = slices;
        auto t0 = std::chrono::steady_clock::now();
        Placement pl = plan(win, po);
        acc[a].plan_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        auto row = pl.layer(0);
        auto rl = rank_loads_even(row, G, sum.at(0, 0), E);
        acc[a].in_sample += balancedness(rl);
        double mx = *std::max_element(rl.begin(), rl.end());
        acc[a].achieved_over_bound += mx / max_load_lower_bound(sum.at(0, 0), E, P, G);
        acc[a].in_sample_pass +=
            mean_pass_balancedness(row, G, 0, Dispatch::static_, counts.data(), window, E, E);
        const double* later = counts.data() + size_t(window) * E;
        acc[a].out_static += mean_pass_balancedness(row, G, 0, Dispatch::static_, later, T - window, E, E);
        acc[a].out_balanced += mean_pass_balancedness(row, G, 0, Dispatch::balanced, later, T - window, E, E);
      }
    }
    for (auto& r : acc) {
      r.in_sample /= L, r.in_sample_pass /= L, r.out_static /= L, r.out_balanced /= L, r.achieved_over_bound /= L;
      r.plan_ms *= double(w.spec.layers) / L;  // all layers
      rows.push_back(r);
    }
  }
  return rows;
}

std::vector<ReplaySeries> replay(const LoadTrace& trace, const ReplayOptions& opt) {
  trace.validate("replay: trace");
  check(opt.interval > 0, "replay: interval must be >= 1 pass");
  const int T = trace.passes, L = trace.layers, E = trace.experts, G = opt.ranks, P = E + opt.redundant;
  check(P % G == 0, "replay: {} slots ({} experts + {} redundant) are not divisible by {} ranks", P, E, opt.redundant,
        G);
  std::vector<ReplaySeries> out;
  for (Algorithm alg : opt.algorithms) {
    std::vector<ReplaySeries> series;
    for (Dispatch d : opt.dispatches) {
      ReplaySeries s;
      s.algorithm = algorithm_name(alg), s.dispatch = dispatch_name(d);
      s.per_pass.assign(T, 0.0);
      series.push_back(s);
    }
    Placement current = Placement::trivial(L, E, P, G);
    std::vector<int> moved;
    for (int t = 0; t < T; ++t) {
      if (t > 0 && t % opt.interval == 0) {
        PlanOptions po;
        po.algorithm = alg, po.ranks = G, po.redundant = opt.redundant, po.nodes = opt.nodes, po.groups = opt.groups;
        po.slices = opt.slices, po.migration_weight = opt.migration_weight, po.current = &current;
        Placement next = plan(trace.range(t - opt.interval, t), po);
        moved.push_back(plan_migration(current, next, opt.ranks_per_node).experts_moved);
        current = std::move(next);
      }
      for (size_t i = 0; i < opt.dispatches.size(); ++i) {
        double s = 0;
        for (int l = 0; l < L; ++l) {
          auto slot = dispatch(opt.dispatches[i], current.layer(l), G, opt.ranks_per_node, trace.at(t, l), E,
                               uint64_t(t) * 1000003u + l);
          s += balancedness(rank_loads_from_slots(slot, G));
        }
        series[i].per_pass[t] = s / L;
      }
    }
    for (auto& s : series) {
      s.moved = moved;
      for (int m : moved) s.total_moved += m;
      int n = 0;
      double sum = 0;
      for (int t = std::min(opt.interval, T - 1); t < T; ++t) sum += s.per_pass[t], n++, s.min_after_first = std::min(s.min_after_first, s.per_pass[t]);
      s.mean_after_first = n ? sum / n : 0;
      out.push_back(std::move(s));
    }
  }
  return out;
}

}  // namespace ballast::eplb

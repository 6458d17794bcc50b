// ballast eplb plan | report | replay | synth — the EPLB library from the command line.
#include "ballast/cli/commands.h"
#include "ballast/cli/option_checks.h"
#include "ballast/core/clock.h"
#include "ballast/core/error.h"
#include "ballast/eplb/limits.h"
#include "ballast/eplb/load.h"
#include "ballast/eplb/metrics.h"
#include "ballast/eplb/migration.h"
#include "ballast/eplb/placement.h"
#include "ballast/eplb/plan.h"
#include "ballast/eplb/replay.h"
#include "ballast/eplb/svg.h"
#include "ballast/eplb/synth.h"

#include <fmt/format.h>

#include <cmath>
#include <memory>

namespace ballast::cli {
namespace {

using namespace ballast::eplb;

struct PlanArgs {
  std::string load, current, output, algorithm = "ballast";
  int ranks = 0, redundant = 0, nodes = 1, groups = 1, slices = 4;
  double migration_weight = 0.05;
  std::string dispatch = "static";
  bool forecast = true;
  int horizon = 0;
};

int run_plan(const PlanArgs& a) {
  LoadTrace load = read_load(a.load);
  PlanOptions po;
  po.algorithm = parse_algorithm(a.algorithm);
  po.ranks = a.ranks, po.redundant = a.redundant, po.nodes = a.nodes, po.groups = a.groups, po.slices = a.slices;
  po.migration_weight = a.migration_weight;
  po.dispatch = parse_dispatch(a.dispatch);
  po.forecast = a.forecast, po.horizon = a.horizon;
  std::vector<LayerTrend> trends;
  po.trends = &trends;
  const int P = load.experts + a.redundant;
  check(a.ranks > 0 && P % a.ranks == 0, "plan: {} slots ({} experts + {} redundant) are not divisible by {} ranks",
        P, load.experts, a.redundant, a.ranks);
  std::unique_ptr<Placement> current;
  if (!a.current.empty()) {
    current = std::make_unique<Placement>(read_placement(a.current, a.ranks));
    check(current->layers == load.layers && current->logical == load.experts && current->physical == P,
          "{}: placement is {} layers x {} experts x {} slots, the load needs {} x {} x {}", a.current,
          current->layers, current->logical, current->physical, load.layers, load.experts, P);
    po.current = current.get();
  }
  Placement before = current ? *current : Placement::trivial(load.layers, load.experts, P, a.ranks);
  const double t0 = now_seconds();
  Placement after = plan(load, po);
  const double ms = seconds_since(t0) * 1e3;
  LoadTrace sum = load.passes == 1 ? load : load.sum();
  auto b0 = evaluate_even(before, sum), b1 = evaluate_even(after, sum);
  auto mig = plan_migration(before, after, 0);
  fmt::print("algorithm {}: {} layers x {} experts, {} slots on {} ranks\n", a.algorithm, load.layers, load.experts, P,
             a.ranks);
  fmt::print("balancedness before {:.4f} (worst layer {} {:.4f})  after {:.4f} (worst layer {} {:.4f})\n", b0.mean,
             b0.worst_layer, b0.worst, b1.mean, b1.worst_layer, b1.worst);
  fmt::print("max load / lower bound: before {:.4f}  after {:.4f}\n", b0.achieved_over_bound, b1.achieved_over_bound);
  auto components = [&](const Placement& pl) {
    int n = 0;
    for (int l = 0; l < pl.layers; ++l) n = std::max(n, replica_graph_components(pl.layer(l), pl.ranks, pl.logical));
    return n;
  };
  fmt::print("replica graph components (most in a layer; 1: balanced dispatch can move load between any ranks): "
             "before {}  after {}\n", components(before), components(after));
  fmt::print("experts moved {} ({} local copies) relative to the {} placement\n", mig.experts_moved, mig.local,
             current ? "current" : "trivial");
  if (!trends.empty()) {
    int n = 0;
    for (const auto& t : trends) n += t.extrapolated;
    fmt::print("forecast: {} of {} layers have a significant trend and were planned for where it leads over the "
               "next {} passes; the others for the window's own slices{}\n", n, load.layers,
               a.horizon > 0 ? a.horizon : load.passes,
               po.algorithm == Algorithm::ballast && po.dispatch != Dispatch::balanced
                   ? " and, for static dispatch, for their last quarter's level"
                   : "");
  }
  fmt::print("planned in {:.2f} ms\n", ms);
  if (!a.output.empty()) {
    write_placement(a.output, after);
    fmt::print("wrote {}\n", a.output);
  }
  return 0;
}

struct ReportArgs {
  std::string load, before, after, svg;
  int ranks = 0;
};

int run_report(const ReportArgs& a) {
  LoadTrace load = read_load(a.load);
  LoadTrace sum = load.passes == 1 ? load : load.sum();
  Placement after = read_placement(a.after, a.ranks);
  Placement before = a.before.empty() ? Placement::trivial(after.layers, after.logical, after.physical, after.ranks)
                                      : read_placement(a.before, a.ranks);
  auto b0 = evaluate_even(before, sum), b1 = evaluate_even(after, sum);
  fmt::print("| layer | balancedness before | after | max/bound before | after |\n|---|---|---|---|---|\n");
  for (int l = 0; l < sum.layers; ++l)
    fmt::print("| {} | {:.4f} | {:.4f} | {:.4f} | {:.4f} |\n", l, b0.balancedness[l], b1.balancedness[l],
               b0.max_load[l] / std::max(b0.bound[l], 1e-300), b1.max_load[l] / std::max(b1.bound[l], 1e-300));
  fmt::print("| mean | {:.4f} | {:.4f} | {:.4f} | {:.4f} |\n", b0.mean, b1.mean, b0.achieved_over_bound,
             b1.achieved_over_bound);
  if (!a.svg.empty()) {
    std::vector<Heatmap> panels(2);
    panels[0].title = "before", panels[1].title = "after";
    for (int l = 0; l < sum.layers; ++l) {
      panels[0].value.push_back(rank_loads_even(before.layer(l), before.ranks, sum.at(0, l), sum.experts));
      panels[1].value.push_back(rank_loads_even(after.layer(l), after.ranks, sum.at(0, l), sum.experts));
    }
    write_text_file(a.svg, svg_heatmaps("rank load per layer, relative to the layer mean", "layer", "rank", panels));
    fmt::print("wrote {}\n", a.svg);
  }
  return 0;
}

struct ReplayArgs {
  std::string trace, svg, algorithms = "deepseek,ballast", dispatches = "static,balanced";
  int interval = 1000, ranks = 0, redundant = 0, ranks_per_node = 0, nodes = 1, groups = 1, slices = 4;
  double migration_weight = 0.05;
  bool forecast = true;
};

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  size_t b = 0;
  while (b <= s.size()) {
    size_t e = s.find(',', b);
    if (e == std::string::npos) e = s.size();
    if (e > b) out.push_back(s.substr(b, e - b));
    b = e + 1;
  }
  return out;
}

int run_replay(const ReplayArgs& a) {
  LoadTrace trace = read_load(a.trace);
  ReplayOptions o;
  o.interval = a.interval, o.ranks = a.ranks, o.redundant = a.redundant, o.ranks_per_node = a.ranks_per_node;
  o.nodes = a.nodes, o.groups = a.groups, o.slices = a.slices, o.migration_weight = a.migration_weight;
  o.forecast = a.forecast;
  o.algorithms.clear(), o.dispatches.clear();
  for (auto& s : split(a.algorithms)) o.algorithms.push_back(parse_algorithm(s));
  for (auto& s : split(a.dispatches)) o.dispatches.push_back(parse_dispatch(s));
  auto series = replay(trace, o);
  fmt::print("replay: {} passes, {} layers x {} experts, {} ranks, {} redundant, rebalance every {} passes\n",
             trace.passes, trace.layers, trace.experts, a.ranks, a.redundant, a.interval);
  fmt::print("| algorithm | dispatch | mean per-pass balancedness | min | experts moved (total) | per rebalance |\n"
             "|---|---|---|---|---|---|\n");
  for (auto& s : series)
    fmt::print("| {} | {} | {:.4f} | {:.4f} | {} | {} |\n", s.algorithm, s.dispatch, s.mean_after_first,
               s.min_after_first, s.total_moved, fmt::join(s.moved, " "));
  if (!a.svg.empty()) {
    std::vector<Series> lines;
    for (auto& s : series) lines.push_back({s.algorithm + " / " + s.dispatch, s.per_pass});
    write_text_file(a.svg, svg_lines("per-pass balancedness (mean over layers)", "pass", "balancedness", lines));
    fmt::print("wrote {}\n", a.svg);
  }
  return 0;
}

struct SynthArgs {
  std::string model = "qwen3-next", popularity = "lognormal", output;
  double skew = 1.0, drift = 0.1, burst = 0.05, trend = 0.0;
  std::string trends, only;
  int passes = 1000, tokens = 16384, layers = 0;
  uint64_t seed = 1;
  bool suite = false;
  int window = 1000, eval = 1000, slices = 4;
  bool forecast = true;
  double damping = -1;
  std::string algorithms = "deepseek,ballast";
};

int run_synth(const SynthArgs& a) {
  if (a.suite) {
    SynthSpec noise;
    noise.tokens = a.tokens, noise.drift = a.drift, noise.burst = a.burst, noise.seed = a.seed, noise.trend = a.trend;
    std::vector<double> trends;
    for (auto& t : split(a.trends)) {
      double v = 0;
      check(CLI::detail::lexical_cast(t, v) && std::isfinite(v) && std::abs(v) <= 100,
            "synth --trends: '{}' is not a finite number in [-100, 100]", t);
      trends.push_back(v);
    }
    auto suite = default_suite(a.window, a.eval, noise, trends);
    if (!a.only.empty()) std::erase_if(suite, [&](const SuiteWorkload& w) { return w.spec.name.find(a.only) == std::string::npos; });
    check(!suite.empty(), "synth --suite: no workload name contains '{}'", a.only);
    std::vector<Algorithm> algs;
    for (auto& n : split(a.algorithms)) algs.push_back(parse_algorithm(n));
    check(!algs.empty(), "synth --suite: no algorithm given");
    auto rows = run_suite(suite, a.window, algs, a.slices, a.layers, a.forecast, a.damping);
    fmt::print("suite: plan on {} passes, evaluate on the next {}; {} tokens/pass, drift {}, burst {}{}\n", a.window,
               a.eval, a.tokens, a.drift, a.burst,
               a.layers > 0 ? fmt::format(" ({} layers per workload)", a.layers) : "");
    fmt::print("| workload | G+R | algorithm | planned for | in-sample (window sum) | max/bound | per pass, static: "
               "in-sample | out-of-sample | per pass, balanced: in-sample | out-of-sample | plan ms (all layers) |\n"
               "|---|---|---|---|---|---|---|---|---|---|---|\n");
    const size_t per_workload = rows.size() / suite.size();
    for (size_t i = 0; i < rows.size(); ++i) {
      const auto& r = rows[i];
      const auto& w = suite[i / per_workload];
      fmt::print("| {} | {}+{} | {} | {} | {:.4f} | {:.4f} | {:.4f} | {:.4f} | {:.4f} | {:.4f} | {:.1f} |\n", r.workload,
                 w.ranks, w.redundant, r.algorithm, r.planned_for.empty() ? "-" : r.planned_for, r.in_sample,
                 r.achieved_over_bound, r.in_static, r.out_static, r.in_balanced, r.out_balanced, r.plan_ms);
    }
    return 0;
  }
  SynthSpec s = model_shape(a.model);
  s.popularity = parse_popularity(a.popularity);
  s.skew = a.skew, s.drift = a.drift, s.burst = a.burst, s.passes = a.passes, s.tokens = a.tokens, s.seed = a.seed;
  s.trend = a.trend;
  if (a.layers > 0) s.layers = a.layers;
  check(!a.output.empty(), "synth: --output is required (or --suite)");
  auto t = synth_trace(s);
  write_load(a.output, t);
  fmt::print("wrote {}: {} passes x {} layers x {} experts ({} tokens/pass, top-{})\n", a.output, t.passes, t.layers,
             t.experts, s.tokens, s.topk);
  return 0;
}

}  // namespace

void add_eplb(CLI::App& app, Runner& run) {
  auto* eplb = app.add_subcommand("eplb", "expert-parallel load balancing: plan, report, replay, synth");
  eplb->require_subcommand(1);

  auto pa = std::make_shared<PlanArgs>();
  auto* plan = eplb->add_subcommand("plan", "compute a placement from load statistics");
  plan->add_option("--load", pa->load, "JSON {logical_count: [L][E] or [T][L][E]} or .safetensors")->required();
  plan->add_option("--ranks", pa->ranks, "EP ranks G")->required()->check(CLI::Range(1, kMaxRanks));
  plan->add_option("--redundant", pa->redundant, "redundant slots R (P = E + R)")->required()->check(CLI::Range(0, kMaxSlots));
  plan->add_option("--nodes", pa->nodes, "nodes (deepseek_hierarchical, ballast)")->check(CLI::Range(1, kMaxRanks));
  plan->add_option("--groups", pa->groups, "expert groups, a multiple of nodes (deepseek_hierarchical, ballast)")
      ->check(CLI::Range(1, kMaxExperts));
  plan->add_option("--algorithm", pa->algorithm, "deepseek | deepseek_hierarchical | ballast");
  plan->add_option("--current", pa->current, "placement in force (JSON physical_to_logical_map)");
  plan->add_option("--migration-weight", pa->migration_weight, "ballast: balance traded per moved expert")
      ->check(finite_range(0, 1e6));
  plan->add_option("--slices", pa->slices, "ballast: time slices of a [T][L][E] load")->check(CLI::Range(1, 1 << 16));
  plan->add_option("--dispatch", pa->dispatch,
                   "ballast: dispatch policy the placement is served with (static | random | balanced)");
  plan->add_flag("--forecast,!--no-forecast", pa->forecast,
                 "ballast, a [T][L][E] load: plan for the forecast of the next passes where a layer's load has a "
                 "significant trend (default; --no-forecast: the window's own slices)");
  plan->add_option("--horizon", pa->horizon, "ballast: passes the plan will serve, for the forecast (default: T)")
      ->check(CLI::Range(0, 1 << 30));
  plan->add_option("--output", pa->output, "placement JSON to write");
  plan->callback([pa, &run] { run = [pa] { return run_plan(*pa); }; });

  auto ra = std::make_shared<ReportArgs>();
  auto* report = eplb->add_subcommand("report", "per-layer balance of placements and an SVG heatmap");
  report->add_option("--load", ra->load, "load statistics")->required();
  report->add_option("--after", ra->after, "placement to report")->required();
  report->add_option("--before", ra->before, "placement to compare (default: trivial)");
  report->add_option("--ranks", ra->ranks, "EP ranks (when the JSON has no num_ranks)")->check(CLI::Range(1, kMaxRanks));
  report->add_option("--svg", ra->svg, "heatmap SVG to write");
  report->callback([ra, &run] { run = [ra] { return run_report(*ra); }; });

  auto pl = std::make_shared<ReplayArgs>();
  auto* replay = eplb->add_subcommand("replay", "simulate online rebalancing over a trace");
  replay->add_option("--trace", pl->trace, "trace [T][L][E] (JSON or .safetensors)")->required();
  replay->add_option("--interval", pl->interval, "passes between rebalances")->check(CLI::Range(1, INT32_MAX));
  replay->add_option("--ranks", pl->ranks, "EP ranks")->required()->check(CLI::Range(1, kMaxRanks));
  replay->add_option("--redundant", pl->redundant, "redundant slots")->required()->check(CLI::Range(0, kMaxSlots));
  replay->add_option("--ranks-per-node", pl->ranks_per_node, "ranks per node (static dispatch, migration)")
      ->check(CLI::Range(0, kMaxRanks));
  replay->add_option("--nodes", pl->nodes, "nodes (deepseek_hierarchical, ballast)")->check(CLI::Range(1, kMaxRanks));
  replay->add_option("--groups", pl->groups, "expert groups, a multiple of nodes (deepseek_hierarchical, ballast)")
      ->check(CLI::Range(1, kMaxExperts));
  replay->add_option("--slices", pl->slices, "ballast: time slices of the window")->check(CLI::Range(1, 1 << 16));
  replay->add_option("--migration-weight", pl->migration_weight, "ballast: balance traded per moved expert")
      ->check(finite_range(0, 1e6));
  replay->add_option("--algorithms", pl->algorithms, "comma-separated algorithms");
  replay->add_option("--dispatch", pl->dispatches, "comma-separated dispatch policies (static,random,balanced)");
  replay->add_flag("--forecast,!--no-forecast", pl->forecast,
                   "ballast: plan for the forecast of the next interval where a layer has a significant trend (default)");
  replay->add_option("--svg", pl->svg, "plot of per-pass balancedness to write");
  replay->callback([pl, &run] { run = [pl] { return run_replay(*pl); }; });

  auto sa = std::make_shared<SynthArgs>();
  auto* synth = eplb->add_subcommand("synth", "synthetic routing traces, or the quality suite (--suite)");
  synth->add_option("--model", sa->model, "qwen3-next | qwen3.5-397b | deepseek-v3");
  synth->add_option("--popularity", sa->popularity, "lognormal | zipf");
  synth->add_option("--skew", sa->skew, "log-normal sigma or Zipf exponent")->check(finite_range(0, 100));
  synth->add_option("--drift", sa->drift, "std of log-popularity change per 1000 passes")->check(finite_range(0, 100));
  synth->add_option("--burst", sa->burst, "std of per-pass log-popularity jitter")->check(finite_range(0, 100));
  synth->add_option("--trend", sa->trend,
                    "steady drift: log-popularity moves by this times a random direction every 1000 passes")
      ->check(finite_range(-100, 100));
  synth->add_option("--trends", sa->trends, "suite: comma-separated trend strengths, each workload at each");
  synth->add_option("--only", sa->only, "suite: only workloads whose name contains this");
  synth->add_option("--passes", sa->passes, "passes")->check(CLI::Range(1, INT32_MAX));
  synth->add_option("--tokens", sa->tokens, "tokens per pass")->check(CLI::Range(0, 1 << 30));
  synth->add_option("--layers", sa->layers, "layers (default: the model's; with --suite: layers per workload)")
      ->check(CLI::Range(0, kMaxLayers));
  synth->add_option("--seed", sa->seed, "seed")->check(unsigned_integer());
  synth->add_option("--output", sa->output, "trace to write (.safetensors or .json)");
  synth->add_flag("--suite", sa->suite, "run the quality suite and print its tables");
  synth->add_option("--window", sa->window, "suite: passes planned on")->check(CLI::Range(1, 1 << 24));
  synth->add_option("--eval", sa->eval, "suite: later passes evaluated")->check(CLI::Range(1, 1 << 24));
  synth->add_option("--slices", sa->slices, "suite: ballast time slices")->check(CLI::Range(1, 1 << 16));
  synth->add_option("--algorithms", sa->algorithms, "suite: comma-separated algorithms");
  synth->add_flag("--forecast,!--no-forecast", sa->forecast,
                  "suite: ballast plans for the forecast of the evaluated passes (default; --no-forecast: the window)");
  synth->add_option("--damping", sa->damping,
                    "suite: share of the trend extrapolated, every layer (< 0: estimated, and only significant trends)")
      ->check(finite_range(-1e6, 1));
  synth->callback([sa, &run] { run = [sa] { return run_synth(*sa); }; });
}

}  // namespace ballast::cli

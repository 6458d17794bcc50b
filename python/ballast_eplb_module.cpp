// Python module `ballast_eplb`: the EPLB library of ballast from Python, a drop-in for the users of
// deepseek-ai/EPLB, SGLang and vLLM.
//   rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus, enable_hierarchical=None)
//       deepseek-ai/EPLB's function (identical outputs); SGLang's enable_hierarchical switch; weight
//       [L, E] or SGLang's [passes, L, E] (summed over the passes)
//   balanced_packing, replicate_experts: its two steps, standalone
//   compute_logical_maps(phy2log, num_logical_experts): phy2log -> (log2phy, logcnt)
//   rebalance_experts_ballast(...): ballast's algorithm
//   rebalance_experts_vllm, preserve_intragpu_slots, slots_kept, DeepseekPolicy / BallastPolicy:
//       vLLM's policy interface (vllm_policy.cpp)
//   measured_balancedness, rank_loads, balancedness, lower_bound, evaluate, evaluate_passes,
//   replica_graph_components: the metrics
// log2phy order: every function here lists an expert's replicas in ascending slot order (what
// SGLang and vLLM derive from phy2log themselves), except rebalance_experts, which by default keeps
// deepseek-ai/EPLB's order (by replica rank) so that its three outputs equal the original's, and
// gives the ascending order with log2phy_order="slot".
// Arrays in and out: tensors.h. Bad input raises ballast_eplb.EplbError (ValueError and AssertionError).
#include "ballast/core/error.h"
#include "ballast/eplb/deepseek.h"
#include "ballast/eplb/dispatch.h"
#include "ballast/eplb/load.h"
#include "ballast/eplb/metrics.h"
#include "ballast/eplb/placement.h"
#include "ballast/eplb/plan.h"
#include "module.h"
#include "tensors.h"

#include <pybind11/stl.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

namespace ballast::python {
using namespace ballast::eplb;

// [L, E] as given, or [T, L, E] summed over T.
Dense summed(const Dense& d) {
  if (d.shape.size() == 2) return d;
  const size_t T = d.dim(0), n = d.dim(1) * d.dim(2);
  Dense out;
  out.shape = {d.dim(1), d.dim(2)};
  out.data.assign(n, 0.0);
  for (size_t t = 0; t < T; ++t)
    for (size_t i = 0; i < n; ++i) out.data[i] += d.data[t * n + i];
  return out;
}

LoadTrace to_trace(const Dense& d) {
  LoadTrace t = d.shape.size() == 2 ? LoadTrace(1, int(d.dim(0)), int(d.dim(1)))
                                    : LoadTrace(int(d.dim(0)), int(d.dim(1)), int(d.dim(2)));
  t.count = d.data;
  return t;
}

Placement to_placement(py::handle obj, const std::string& name, int experts, int ranks, int expect_layers,
                       int expect_physical, Origin* origin) {
  Dense d = to_dense(obj, name, 2, 2, origin);
  const int L = int(d.dim(0)), P = int(d.dim(1));
  if (expect_layers >= 0) check(L == expect_layers, "{} has {} layers, the load has {}", name, L, expect_layers);
  if (expect_physical >= 0)
    check(P == expect_physical, "{} has {} slots per layer, expected {}", name, P, expect_physical);
  check(ranks > 0, "num_gpus must be positive, got {}", ranks);
  check(P % ranks == 0, "{}: {} physical slots are not divisible by {} GPUs", name, P, ranks);
  check(P >= experts, "{}: {} physical slots are fewer than {} logical experts", name, P, experts);
  Placement pl(L, experts, P, ranks);
  for (size_t i = 0; i < d.data.size(); ++i) {
    double x = d.data[i];
    check(x == std::floor(x) && x >= 0 && x < experts, "{}[{}][{}] is {}: expected a logical expert id in [0, {})",
          name, i / P, i % P, x, experts);
    pl.phy2log[i] = int32_t(x);
  }
  pl.validate();
  return pl;
}

void check_plan_args(int E, int num_replicas, int num_gpus) {
  check(num_replicas > 0, "num_replicas must be positive, got {}", num_replicas);
  check(num_gpus > 0, "num_gpus must be positive, got {}", num_gpus);
  check(num_replicas >= E, "num_replicas ({}) is smaller than the number of logical experts ({})", num_replicas, E);
  check(num_replicas % num_gpus == 0, "num_replicas ({}) is not divisible by num_gpus ({})", num_replicas, num_gpus);
}

deepseek::Result deepseek_plan(const Dense& w, int num_replicas, std::optional<int> num_groups, int num_nodes,
                               int num_gpus, std::optional<bool> enable_hierarchical) {
  const int L = int(w.dim(0)), E = int(w.dim(1));
  check_plan_args(E, num_replicas, num_gpus);
  check(num_nodes > 0, "num_nodes must be positive, got {}", num_nodes);
  check(!num_groups || *num_groups > 0, "num_groups must be positive, got {}", num_groups.value_or(0));
  // deepseek-ai/EPLB (and vLLM): hierarchical exactly when groups divide over nodes, else global.
  // SGLang: enable_hierarchical says which, and a hierarchical request that cannot be is refused.
  const bool divisible = num_groups && *num_groups % num_nodes == 0;
  if (enable_hierarchical && *enable_hierarchical)
    check(divisible, "enable_hierarchical: {} expert groups are not divisible over {} nodes",
          num_groups ? std::to_string(*num_groups) : "no", num_nodes);
  const bool hierarchical = enable_hierarchical.value_or(divisible);
  py::gil_scoped_release nogil;
  return hierarchical ? deepseek::rebalance_hierarchical(w.data.data(), L, E, num_replicas, *num_groups, num_nodes,
                                                         num_gpus)
                      : deepseek::rebalance_hierarchical(w.data.data(), L, E, num_replicas, 1, 1, num_gpus);
}

namespace {

py::tuple py_rebalance_experts(py::object weight, int num_replicas, std::optional<int> num_groups, int num_nodes,
                               int num_gpus, std::optional<bool> enable_hierarchical, const std::string& log2phy_order) {
  check(log2phy_order == "replica" || log2phy_order == "slot",
        "log2phy_order must be \"replica\" (the original's) or \"slot\", got \"{}\"", log2phy_order);
  Origin o;
  Dense w = summed(to_dense(weight, "weight", 2, 3, &o));
  check_counts(w, "weight");
  const int L = int(w.dim(0)), E = int(w.dim(1));
  auto r = deepseek_plan(w, num_replicas, num_groups, num_nodes, num_gpus, enable_hierarchical);
  if (log2phy_order == "slot") {
    Placement pl(L, E, num_replicas, num_gpus);
    pl.phy2log = r.phy2log;
    return placement_tuple(pl, o);
  }
  return py::make_tuple(int64_out(r.phy2log, {L, num_replicas}, o), int64_out(r.log2phy, {L, E, r.max_replicas}, o),
                        int64_out(r.logcnt, {L, E}, o));
}

py::tuple py_balanced_packing(py::object weight, int num_packs) {
  Origin o;
  Dense w = to_dense(weight, "weight", 2, 2, &o);
  const int X = int(w.dim(0)), n = int(w.dim(1));
  check(num_packs > 0, "num_packs must be positive, got {}", num_packs);
  check(n % num_packs == 0, "balanced_packing: {} items are not divisible into {} packs", n, num_packs);
  for (double x : w.data) check(!std::isnan(x), "weight holds NaN");
  std::vector<int32_t> pack(size_t(X) * n), rank(size_t(X) * n);
  std::vector<float> row(n);
  for (int i = 0; i < X; ++i) {
    for (int j = 0; j < n; ++j) row[j] = float(w.data[size_t(i) * n + j]);  // weight.float(), as the original
    deepseek::balanced_packing(row.data(), n, num_packs, pack.data() + size_t(i) * n, rank.data() + size_t(i) * n);
  }
  return py::make_tuple(int64_out(pack, {X, n}, o), int64_out(rank, {X, n}, o));
}

py::tuple py_replicate_experts(py::object weight, int num_phy) {
  Origin o;
  Dense w = to_dense(weight, "weight", 2, 2, &o);
  check_counts(w, "weight");
  const int X = int(w.dim(0)), n = int(w.dim(1));
  check(num_phy >= n, "replicate_experts: {} physical experts are fewer than {} logical experts", num_phy, n);
  std::vector<int32_t> phy2log(size_t(X) * num_phy), rank(size_t(X) * num_phy), logcnt(size_t(X) * n);
  std::vector<float> row(n);
  for (int i = 0; i < X; ++i) {
    for (int j = 0; j < n; ++j) row[j] = float(w.data[size_t(i) * n + j]);
    deepseek::replicate_experts(row.data(), n, num_phy, phy2log.data() + size_t(i) * num_phy,
                                rank.data() + size_t(i) * num_phy, logcnt.data() + size_t(i) * n);
  }
  return py::make_tuple(int64_out(phy2log, {X, num_phy}, o), int64_out(rank, {X, num_phy}, o),
                        int64_out(logcnt, {X, n}, o));
}

py::tuple py_rebalance_ballast(py::object weight, int num_replicas, int num_gpus, std::optional<int> slices,
                               py::object current, double migration_weight, const std::string& dispatch,
                               int num_groups, int num_nodes, std::optional<bool> forecast, int horizon,
                               bool expect_recent_level) {
  Origin o;
  Dense w = to_dense(weight, "weight", 2, 3, &o);
  check_counts(w, "weight");
  LoadTrace load = to_trace(w);
  const int E = load.experts;
  check_plan_args(E, num_replicas, num_gpus);
  check(std::isfinite(migration_weight) && migration_weight >= 0, "migration_weight must be >= 0, got {}",
        migration_weight);
  if (slices) check(*slices >= 1, "slices must be >= 1, got {}", *slices);
  check(horizon >= 0, "horizon must be >= 0, got {}", horizon);
  std::optional<Placement> cur;
  if (!current.is_none()) cur = to_placement(current, "current", E, num_gpus, load.layers, num_replicas, &o);
  PlanOptions po;
  po.algorithm = Algorithm::ballast;
  po.ranks = num_gpus, po.redundant = num_replicas - E, po.migration_weight = migration_weight;
  po.dispatch = parse_dispatch(dispatch);
  po.nodes = num_nodes, po.groups = num_groups;
  if (slices) po.slices = *slices;
  if (forecast) po.forecast = *forecast;
  po.horizon = horizon;
  po.expect_recent_level = expect_recent_level;
  po.current = cur ? &*cur : nullptr;
  Placement pl;
  {
    py::gil_scoped_release nogil;
    pl = plan(load, po);
  }
  return placement_tuple(pl, o);
}

py::tuple py_compute_logical_maps(py::object phy2log, int num_logical_experts) {
  Origin o;
  Dense d = to_dense(phy2log, "phy2log", 1, 2, &o);
  const bool one_layer = d.shape.size() == 1;
  const int L = one_layer ? 1 : int(d.dim(0)), P = int(d.shape.back()), E = num_logical_experts;
  check(E > 0, "num_logical_experts must be positive, got {}", E);
  std::vector<int32_t> row(d.data.size());
  for (size_t i = 0; i < d.data.size(); ++i) {
    const double x = d.data[i];
    // -1 marks an empty slot (vLLM's elastic scale-up leaves some).
    check(x == std::floor(x) && x >= -1 && x < E, "phy2log[{}][{}] is {}: expected a logical expert id in [0, {}) or -1",
          i / P, i % P, x, E);
    row[i] = int32_t(x);
  }
  auto [log2phy, logcnt, X] = logical_maps(row, L, P, E);
  if (one_layer) return py::make_tuple(int64_out(log2phy, {E, X}, o), int64_out(logcnt, {E}, o));
  return py::make_tuple(int64_out(log2phy, {L, E, X}, o), int64_out(logcnt, {L, E}, o));
}

// weight [L,E] or [T,L,E] (summed over T) and a placement [L,P].
struct Evaluated {
  LoadTrace sum;
  Placement pl;
};

Evaluated read_eval(py::object phy2log, py::object weight, int num_gpus, Origin* o) {
  Dense w = to_dense(weight, "weight", 2, 3, o);
  check_counts(w, "weight");
  LoadTrace load = to_trace(w);
  Evaluated ev{load.passes == 1 ? load : load.sum(), {}};
  ev.pl = to_placement(phy2log, "phy2log", load.experts, num_gpus, load.layers, -1, o);
  return ev;
}

py::object py_rank_loads(py::object phy2log, py::object weight, int num_gpus) {
  Origin o;
  auto ev = read_eval(phy2log, weight, num_gpus, &o);
  std::vector<double> out;
  for (int l = 0; l < ev.pl.layers; ++l) {
    auto rl = rank_loads_even(ev.pl.layer(l), num_gpus, ev.sum.at(0, l), ev.sum.experts);
    out.insert(out.end(), rl.begin(), rl.end());
  }
  return float_out(out, {ev.pl.layers, num_gpus}, o);
}

py::dict py_evaluate(py::object phy2log, py::object weight, int num_gpus) {
  Origin o;
  auto ev = read_eval(phy2log, weight, num_gpus, &o);
  LayerBalance b = evaluate_even(ev.pl, ev.sum);
  const int L = ev.pl.layers;
  py::dict d;
  d["balancedness"] = float_out(b.balancedness, {L}, o);
  d["max_load"] = float_out(b.max_load, {L}, o);
  d["lower_bound"] = float_out(b.bound, {L}, o);
  d["mean_balancedness"] = b.mean;
  d["worst_balancedness"] = b.worst;
  d["worst_layer"] = b.worst_layer;
  d["mean_imbalance"] = b.mean_imbalance;
  d["achieved_over_bound"] = b.achieved_over_bound;
  return d;
}

py::object py_balancedness(py::object phy2log, py::object weight, int num_gpus) {
  Origin o;
  auto ev = read_eval(phy2log, weight, num_gpus, &o);
  LayerBalance b = evaluate_even(ev.pl, ev.sum);
  return float_out(b.balancedness, {ev.pl.layers}, o);
}

py::object py_lower_bound(py::object weight, int num_replicas, int num_gpus) {
  Origin o;
  Dense w = summed(to_dense(weight, "weight", 2, 3, &o));
  check_counts(w, "weight");
  const int L = int(w.dim(0)), E = int(w.dim(1));
  check_plan_args(E, num_replicas, 1);
  check(num_gpus > 0, "num_gpus must be positive, got {}", num_gpus);
  std::vector<double> out(L);
  for (int l = 0; l < L; ++l) out[l] = max_load_lower_bound(w.data.data() + size_t(l) * E, E, num_replicas, num_gpus);
  return float_out(out, {L}, o);
}

py::object py_evaluate_passes(py::object phy2log, py::object trace, int num_gpus, const std::string& dispatch,
                              int ranks_per_node) {
  Origin o;
  Dense w = to_dense(trace, "trace", 3, 3, &o);
  check_counts(w, "trace");
  LoadTrace t = to_trace(w);
  Placement pl = to_placement(phy2log, "phy2log", t.experts, num_gpus, t.layers, -1, &o);
  Dispatch d = parse_dispatch(dispatch);
  if (d != Dispatch::static_)
    for (size_t i = 0; i < t.count.size(); ++i)
      check(t.count[i] == std::floor(t.count[i]), "trace: {} dispatch needs whole token counts, found {}", dispatch,
            t.count[i]);
  std::vector<double> out(t.passes, 0.0);
  {
    py::gil_scoped_release nogil;
    for (int p = 0; p < t.passes; ++p) {
      double s = 0;
      for (int l = 0; l < t.layers; ++l) {
        auto slot = eplb::dispatch(d, pl.layer(l), num_gpus, ranks_per_node, t.at(p, l), t.experts,
                                   uint64_t(p) * 1000003u + uint64_t(l));
        s += eplb::balancedness(rank_loads_from_slots(slot, num_gpus));
      }
      out[p] = s / t.layers;
    }
  }
  return float_out(out, {t.passes}, o);
}

py::dict py_measured_balancedness(py::object num_tokens_per_rank) {
  Origin o;
  Dense d = to_dense(num_tokens_per_rank, "num_tokens_per_rank", 2, 3, &o);
  check_counts(d, "num_tokens_per_rank");
  const bool passes = d.shape.size() == 3;
  const int T = passes ? int(d.dim(0)) : 1, L = int(d.dim(passes ? 1 : 0)), G = int(d.shape.back());
  std::vector<double> avg(T), mx(T), bal(T), mean(T), per_layer;
  for (int t = 0; t < T; ++t) {
    auto m = measured_balance(d.data.data() + size_t(t) * L * G, L, G);
    avg[t] = m.avg_tokens, mx[t] = m.max_tokens, bal[t] = m.balancedness, mean[t] = m.mean;
    per_layer.insert(per_layer.end(), m.per_layer.begin(), m.per_layer.end());
  }
  py::dict r;
  if (!passes) {
    r["avg_tokens"] = avg[0], r["max_tokens"] = mx[0], r["balancedness"] = bal[0], r["mean_balancedness"] = mean[0];
    r["per_layer"] = float_out(per_layer, {L}, o);
  } else {
    r["avg_tokens"] = float_out(avg, {T}, o), r["max_tokens"] = float_out(mx, {T}, o);
    r["balancedness"] = float_out(bal, {T}, o), r["mean_balancedness"] = float_out(mean, {T}, o);
    r["per_layer"] = float_out(per_layer, {T, L}, o);
  }
  return r;
}

py::object py_replica_graph_components(py::object phy2log, int num_gpus, int num_logical_experts) {
  Origin o;
  Placement pl = to_placement(phy2log, "phy2log", num_logical_experts, num_gpus, -1, -1, &o);
  std::vector<int32_t> out(pl.layers);
  for (int l = 0; l < pl.layers; ++l) out[l] = replica_graph_components(pl.layer(l), num_gpus, num_logical_experts);
  return int64_out(out, {pl.layers}, o);
}

}  // namespace

LogicalMaps logical_maps(const std::vector<int32_t>& phy2log, int L, int P, int E) {
  LogicalMaps m;
  m.logcnt.assign(size_t(L) * E, 0);
  for (int l = 0; l < L; ++l)
    for (int p = 0; p < P; ++p)
      if (int32_t e = phy2log[size_t(l) * P + p]; e >= 0) m.max_replicas = std::max(m.max_replicas, ++m.logcnt[size_t(l) * E + e]);
  const int X = m.max_replicas;
  m.log2phy.assign(size_t(L) * E * X, -1);
  std::vector<int32_t> fill(size_t(L) * E, 0);
  for (int l = 0; l < L; ++l)
    for (int p = 0; p < P; ++p)
      if (int32_t e = phy2log[size_t(l) * P + p]; e >= 0) m.log2phy[(size_t(l) * E + e) * X + fill[size_t(l) * E + e]++] = p;
  return m;
}

py::tuple placement_tuple(const Placement& pl, const Origin& o) {
  const int L = pl.layers, E = pl.logical, P = pl.physical;
  auto [log2phy, logcnt, X] = logical_maps(pl.phy2log, L, P, E);
  return py::make_tuple(int64_out(pl.phy2log, {L, P}, o), int64_out(log2phy, {L, E, X}, o), int64_out(logcnt, {L, E}, o));
}

}  // namespace ballast::python

using namespace ballast::python;

PYBIND11_MODULE(ballast_eplb, m) {
  m.doc() = "ballast's expert-parallel load balancer (EPLB): deepseek-ai/EPLB's rebalance_experts (identical "
            "outputs), SGLang's and vLLM's interfaces, ballast's own algorithm, and balance metrics.";
  register_errors(m);

  m.def("rebalance_experts", &py_rebalance_experts, py::arg("weight"), py::arg("num_replicas"),
        py::arg("num_groups"), py::arg("num_nodes"), py::arg("num_gpus"), py::arg("enable_hierarchical") = py::none(),
        py::arg("log2phy_order") = "replica",
        R"(The expert-parallelism load balancer of deepseek-ai/EPLB (same arguments, identical results).

weight: [layers, num_logical_experts] load statistics, or SGLang's [passes, layers, num_logical_experts]
    (summed over the passes); numpy array, nested lists or a torch tensor (any device or dtype)
num_replicas: physical experts (a multiple of num_gpus, >= num_logical_experts)
num_groups, num_nodes, num_gpus: as the original, the hierarchical policy is used when
    num_groups % num_nodes == 0, else the global policy.
enable_hierarchical: SGLang's switch: True = hierarchical (refused when num_groups % num_nodes != 0),
    False = global; None = the original's rule. num_groups may be None for the global policy.
Returns (phy2log [layers, num_replicas], log2phy [layers, num_logical_experts, X] padded with -1
where X is the largest replica count, logcnt [layers, num_logical_experts]), int64: numpy arrays, or
torch tensors on the weight's device.
log2phy_order: "replica" (default, the original's): log2phy[l, e, r] is the slot of expert e's
    replica of rank r, r being the order in which replicate_experts made the replicas (0 = the
    first); the packing places each replica on its own, so these slots are in no fixed order (the
    original's output, kept so that all three outputs equal it). "slot": each expert's slots
    ascending, the order of every other function of this module and of compute_logical_maps (what
    SGLang and vLLM derive from phy2log). phy2log and logcnt are the same either way.)");

  m.def("balanced_packing", &py_balanced_packing, py::arg("weight"), py::arg("num_packs"),
        R"(deepseek-ai/EPLB's balanced packing: n weighted items into num_packs packs of n / num_packs items,
heaviest first into the lightest pack with room (weights compared as float32, as the original).

weight: [X, n]. Returns (pack_index [X, n], rank_in_pack [X, n]), int64.)");
  m.def("replicate_experts", &py_replicate_experts, py::arg("weight"), py::arg("num_phy"),
        R"(deepseek-ai/EPLB's replication: num_log experts to num_phy replicas, each further replica to the
expert with the largest load per replica (lowest index on ties).

weight: [X, num_log]. Returns (phy2log [X, num_phy], rank [X, num_phy] (replica rank of each
physical expert), logcnt [X, num_log]), int64.)");
  m.def("compute_logical_maps", &py_compute_logical_maps, py::arg("phy2log"), py::arg("num_logical_experts"),
        R"(log2phy and logcnt of a placement, as vLLM's compute_logical_maps and SGLang derive them.

phy2log: [layers, P] or [P]; -1 marks an empty slot. Returns (log2phy [layers, E, X]: the slots of
each expert in ascending order, padded with -1, X the largest replica count; logcnt [layers, E]), int64.)");

  m.def("rebalance_experts_ballast", &py_rebalance_ballast, py::arg("weight"), py::arg("num_replicas"),
        py::arg("num_gpus"), py::arg("slices") = py::none(), py::arg("current") = py::none(),
        py::arg("migration_weight") = 0.0, py::arg("dispatch") = "static", py::arg("num_groups") = 1,
        py::arg("num_nodes") = 1, py::arg("forecast") = py::none(), py::arg("horizon") = 0,
        py::arg("expect_recent_level") = true,
        R"(ballast's balancing algorithm (replicas of one expert on distinct GPUs, replica counts and
packing chosen together, balance over time slices, optional migration cost, node hierarchy).

weight: [layers, E] (a window's sum) or [passes, layers, E] (a window of passes)
num_replicas: physical experts P (multiple of num_gpus, >= E); num_gpus: EP ranks
slices: time slices balanced together (default 4; 1 = plan on the window's sum)
current: the placement in force, phy2log [layers, P]; with migration_weight > 0 the plan trades
    balance for fewer moved experts (0.05: moving every slot of a layer is worth 5% of its balance)
dispatch: the policy the placement is served with: "static" or "random" (balance the even split),
    "balanced" (also link all GPUs through shared experts, so that per-pass balanced dispatch can
    move any GPU's excess)
num_groups, num_nodes: with num_nodes > 1, expert groups are packed onto nodes first and each node
    planned on its own GPUs (num_groups % num_nodes == 0, else refused)
forecast: with a window of passes, each layer whose load has a significant trend (one that persists
    from the window's first half to its second) is planned for the forecast of the next `horizon`
    passes (per-expert trends, damped by how much they persist), the others for the window's own
    slices; None or True: so (the default), False: every layer for the window's own slices
horizon: passes the placement will serve (0 = the window's length)
expect_recent_level: with the forecast and dispatch "static" or "random", the layers without a
    significant trend are also balanced (under static shares) for the level of the window's last
    quarter, the best forecast of popularity that random-walks, keeping the window's balance within
    0.3% of its bound and at least deepseek's (default True; False: the window's slices alone;
    "balanced" dispatch never uses it)
Returns (phy2log, log2phy, logcnt), int64; log2phy lists each expert's slots ascending (as
compute_logical_maps; rebalance_experts gives this order with log2phy_order="slot").)");

  bind_vllm_policy(m);

  m.def("measured_balancedness", &py_measured_balancedness, py::arg("num_tokens_per_rank"),
        R"(Balance from the tokens each rank computed, no placement needed.

num_tokens_per_rank: [layers, ranks] (one pass or a window), or [passes, layers, ranks].
Returns a dict: avg_tokens (sum over layers of the mean over ranks), max_tokens (sum over layers of
the max), balancedness = avg_tokens / max_tokens (vLLM's figure; 0 when no token), per_layer (mean /
max of each layer) and mean_balancedness (their mean: SGLang's figure); per pass for a 3-D input.)");
  m.def("rank_loads", &py_rank_loads, py::arg("phy2log"), py::arg("weight"), py::arg("num_gpus"),
        "Load of each GPU [layers, num_gpus] when each expert's load is split evenly over its replicas. "
        "weight: [layers, E] or [passes, layers, E] (summed).");
  m.def("balancedness", &py_balancedness, py::arg("phy2log"), py::arg("weight"), py::arg("num_gpus"),
        "Per-layer balancedness [layers] = mean GPU load / max GPU load (1 is perfect), even splits over "
        "replicas. SGLang's figure is its mean.");
  m.def("lower_bound", &py_lower_bound, py::arg("weight"), py::arg("num_replicas"), py::arg("num_gpus"),
        "Per-layer lower bound [layers] on the max GPU load of any placement with num_replicas slots: "
        "max(sum(w) / G, min over replica counts of max_e w_e / c_e).");
  m.def("evaluate", &py_evaluate, py::arg("phy2log"), py::arg("weight"), py::arg("num_gpus"),
        "In-sample balance of a placement: dict with balancedness, max_load, lower_bound (arrays [layers]), "
        "mean_balancedness, worst_balancedness, worst_layer, mean_imbalance, achieved_over_bound.");
  m.def("evaluate_passes", &py_evaluate_passes, py::arg("phy2log"), py::arg("trace"), py::arg("num_gpus"),
        py::arg("dispatch") = "static", py::arg("ranks_per_node") = 0,
        "Per-pass balancedness [passes] (mean over layers) of a placement on a trace [passes, layers, E] "
        "under a dispatch policy: 'static', 'random' or 'balanced' (exact min-max split of each pass).");
  m.def("replica_graph_components", &py_replica_graph_components, py::arg("phy2log"), py::arg("num_gpus"),
        py::arg("num_logical_experts"),
        "Components [layers] of the replica graph (GPUs linked by the experts they share): 1 means balanced "
        "dispatch can move load between any two GPUs.");
}

// Python module `ballast_eplb`: the EPLB library of ballast from Python.
//   rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)
//       the function of deepseek-ai/EPLB (eplb.py), same arguments, same returns (numpy int64)
//   rebalance_experts_ballast(weight, num_replicas, num_gpus, slices=None, current=None, migration_weight=0.0,
//                             dispatch="static")
//       ballast's default algorithm, returns of the same form
//   rank_loads, balancedness, lower_bound, evaluate, evaluate_passes, replica_graph_components: the metrics
// Inputs are numpy arrays (any integer or float dtype), nested lists/tuples or anything numpy can
// convert (e.g. CPU torch tensors). Bad input raises ballast_eplb.EplbError (a ValueError).
#include "ballast/core/error.h"
#include "ballast/eplb/ballast_algorithm.h"
#include "ballast/eplb/deepseek.h"
#include "ballast/eplb/dispatch.h"
#include "ballast/eplb/load.h"
#include "ballast/eplb/metrics.h"
#include "ballast/eplb/placement.h"
#include "ballast/eplb/plan.h"
#include "ballast/eplb/replay.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

namespace py = pybind11;
using namespace ballast;
using namespace ballast::eplb;

namespace {

// A dense array of doubles read from Python, row-major.
struct Dense {
  std::vector<double> data;
  std::vector<size_t> shape;
  size_t dim(int i) const { return shape[size_t(i)]; }
};

std::string where(const std::vector<size_t>& idx) {
  std::string s;
  for (size_t i : idx) s += "[" + std::to_string(i) + "]";
  return s;
}

// Nested lists / tuples: walks them, refusing ragged rows and non-numbers with their position.
void walk(py::handle obj, const std::string& name, std::vector<size_t>& idx, Dense& out, size_t depth) {
  bool seq = py::isinstance<py::list>(obj) || py::isinstance<py::tuple>(obj);
  if (depth < out.shape.size()) {
    check(seq, "{}{} is a number where a row of {} entries was expected (ragged array)", name, where(idx),
          out.shape[depth]);
    auto s = py::reinterpret_borrow<py::sequence>(obj);
    check(size_t(py::len(s)) == out.shape[depth], "{} is ragged: {}{} has {} entries, expected {} like the first row",
          name, name, where(idx), py::len(s), out.shape[depth]);
    for (size_t i = 0; i < out.shape[depth]; ++i) {
      idx.push_back(i);
      walk(s[i], name, idx, out, depth + 1);
      idx.pop_back();
    }
    return;
  }
  check(!seq, "{} is ragged: {}{} is a list where a number was expected", name, name, where(idx));
  check(!py::isinstance<py::str>(obj) && !py::isinstance<py::bytes>(obj) && !obj.is_none(),
        "{}{} is not a number ({})", name, where(idx), std::string(py::str(py::type::of(obj).attr("__name__"))));
  double x;
  try {
    x = py::cast<double>(obj);
  } catch (const py::cast_error&) {
    fail("{}{} is not a number ({})", name, where(idx), std::string(py::str(py::type::of(obj).attr("__name__"))));
  }
  out.data.push_back(x);
}

Dense to_dense(py::handle obj, const std::string& name, int min_ndim, int max_ndim) {
  Dense d;
  if (py::isinstance<py::list>(obj) || py::isinstance<py::tuple>(obj)) {
    // Shape from the first element at each depth, then a full walk checks every row against it.
    py::handle cur = obj;
    while (py::isinstance<py::list>(cur) || py::isinstance<py::tuple>(cur)) {
      auto s = py::reinterpret_borrow<py::sequence>(cur);
      d.shape.push_back(size_t(py::len(s)));
      if (py::len(s) == 0) break;
      cur = s[0];
    }
    check(int(d.shape.size()) >= min_ndim && int(d.shape.size()) <= max_ndim,
          "{} must have {} dimensions, got {}", name,
          min_ndim == max_ndim ? std::to_string(min_ndim) : fmt::format("{} to {}", min_ndim, max_ndim),
          d.shape.size());
    size_t n = 1;
    for (size_t s : d.shape) n *= s;
    d.data.reserve(n);
    std::vector<size_t> idx;
    walk(obj, name, idx, d, 0);
  } else {
    py::object np = py::module_::import("numpy");
    py::array a;
    try {
      a = np.attr("asarray")(obj);
    } catch (const py::error_already_set& e) {
      fail("{} cannot be read as an array: {}", name, e.what());
    }
    char kind = a.dtype().kind();
    check(kind == 'i' || kind == 'u' || kind == 'f' || kind == 'b',
          "{} must hold numbers (integer or float), got numpy dtype {}", name,
          std::string(py::str(a.dtype())));
    check(a.ndim() >= min_ndim && a.ndim() <= max_ndim, "{} must have {} dimensions, got {}", name,
          min_ndim == max_ndim ? std::to_string(min_ndim) : fmt::format("{} to {}", min_ndim, max_ndim), a.ndim());
    auto c = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(a);
    check(bool(c), "{} cannot be converted to float64", name);
    for (int i = 0; i < c.ndim(); ++i) d.shape.push_back(size_t(c.shape(i)));
    d.data.assign(c.data(), c.data() + c.size());
  }
  for (size_t i = 0; i < d.shape.size(); ++i)
    check(d.shape[i] > 0, "{} has an empty dimension (shape [{}])", name, fmt::join(d.shape, ", "));
  return d;
}

// Load counts: finite and >= 0, with the position of the first bad one.
void check_counts(const Dense& d, const std::string& name) {
  for (size_t i = 0; i < d.data.size(); ++i) {
    double x = d.data[i];
    if (std::isfinite(x) && x >= 0) continue;
    std::vector<size_t> idx(d.shape.size());
    size_t r = i;
    for (size_t k = d.shape.size(); k-- > 0;) idx[k] = r % d.shape[k], r /= d.shape[k];
    fail("{}{} is {}: loads must be finite and >= 0", name, where(idx), x);
  }
}

LoadTrace to_trace(const Dense& d) {
  LoadTrace t;
  if (d.shape.size() == 2) t = LoadTrace(1, int(d.dim(0)), int(d.dim(1)));
  else t = LoadTrace(int(d.dim(0)), int(d.dim(1)), int(d.dim(2)));
  t.count = d.data;
  return t;
}

Placement to_placement(py::handle obj, const std::string& name, int experts, int ranks, int expect_layers = -1,
                       int expect_physical = -1) {
  Dense d = to_dense(obj, name, 2, 2);
  const int L = int(d.dim(0)), P = int(d.dim(1));
  if (expect_layers >= 0)
    check(L == expect_layers, "{} has {} layers, the load has {}", name, L, expect_layers);
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

py::array_t<int64_t> int64_array(const std::vector<int32_t>& v, std::vector<py::ssize_t> shape) {
  py::array_t<int64_t> a(shape);
  int64_t* p = a.mutable_data();
  for (size_t i = 0; i < v.size(); ++i) p[i] = v[i];
  return a;
}

py::array_t<double> float_array(const std::vector<double>& v, std::vector<py::ssize_t> shape) {
  py::array_t<double> a(shape);
  std::copy(v.begin(), v.end(), a.mutable_data());
  return a;
}

// (phy2log [L,P], log2phy [L,E,X] padded with -1, logcnt [L,E]) of a placement, replicas of an
// expert listed in ascending slot order.
py::tuple placement_tuple(const Placement& pl) {
  const int L = pl.layers, E = pl.logical, P = pl.physical;
  std::vector<int32_t> logcnt(size_t(L) * E);
  int X = 1;
  for (int l = 0; l < L; ++l) {
    auto c = pl.replica_count(l);
    for (int e = 0; e < E; ++e) logcnt[size_t(l) * E + e] = c[e], X = std::max(X, int(c[e]));
  }
  std::vector<int32_t> log2phy(size_t(L) * E * X, -1);
  for (int l = 0; l < L; ++l) {
    auto rep = pl.logical_to_physical(l);
    for (int e = 0; e < E; ++e)
      for (size_t k = 0; k < rep[e].size(); ++k) log2phy[(size_t(l) * E + e) * X + k] = rep[e][k];
  }
  return py::make_tuple(int64_array(pl.phy2log, {L, P}), int64_array(log2phy, {L, E, X}),
                        int64_array(logcnt, {L, E}));
}

py::tuple py_rebalance_experts(py::object weight, int num_replicas, int num_groups, int num_nodes, int num_gpus) {
  Dense w = to_dense(weight, "weight", 2, 2);
  check_counts(w, "weight");
  const int L = int(w.dim(0)), E = int(w.dim(1));
  check(num_replicas > 0, "num_replicas must be positive, got {}", num_replicas);
  check(num_gpus > 0, "num_gpus must be positive, got {}", num_gpus);
  check(num_nodes > 0, "num_nodes must be positive, got {}", num_nodes);
  check(num_groups > 0, "num_groups must be positive, got {}", num_groups);
  check(num_replicas >= E, "num_replicas ({}) is smaller than the number of logical experts ({})", num_replicas, E);
  check(num_replicas % num_gpus == 0, "num_replicas ({}) is not divisible by num_gpus ({})", num_replicas, num_gpus);
  deepseek::Result r;
  {
    py::gil_scoped_release nogil;
    r = deepseek::rebalance_experts(w.data.data(), L, E, num_replicas, num_groups, num_nodes, num_gpus);
  }
  const int X = r.max_replicas;
  return py::make_tuple(int64_array(r.phy2log, {L, num_replicas}), int64_array(r.log2phy, {L, E, X}),
                        int64_array(r.logcnt, {L, E}));
}

py::tuple py_rebalance_ballast(py::object weight, int num_replicas, int num_gpus, std::optional<int> slices,
                               py::object current, double migration_weight, const std::string& dispatch) {
  Dense w = to_dense(weight, "weight", 2, 3);
  check_counts(w, "weight");
  LoadTrace load = to_trace(w);
  const int E = load.experts;
  check(num_gpus > 0, "num_gpus must be positive, got {}", num_gpus);
  check(num_replicas >= E, "num_replicas ({}) is smaller than the number of logical experts ({})", num_replicas, E);
  check(num_replicas % num_gpus == 0, "num_replicas ({}) is not divisible by num_gpus ({})", num_replicas, num_gpus);
  check(std::isfinite(migration_weight) && migration_weight >= 0, "migration_weight must be >= 0, got {}",
        migration_weight);
  if (slices) check(*slices >= 1, "slices must be >= 1, got {}", *slices);
  std::optional<Placement> cur;
  if (!current.is_none()) cur = to_placement(current, "current", E, num_gpus, load.layers, num_replicas);
  PlanOptions po;
  po.algorithm = Algorithm::ballast;
  po.ranks = num_gpus, po.redundant = num_replicas - E, po.migration_weight = migration_weight;
  po.dispatch = parse_dispatch(dispatch);
  if (slices) po.slices = *slices;
  po.current = cur ? &*cur : nullptr;
  Placement pl;
  {
    py::gil_scoped_release nogil;
    pl = plan(load, po);
  }
  return placement_tuple(pl);
}

// weight [L,E] or [T,L,E] (summed over T) and a placement [L,P].
struct Evaluated {
  LoadTrace sum;
  Placement pl;
};

Evaluated read_eval(py::object phy2log, py::object weight, int num_gpus) {
  Dense w = to_dense(weight, "weight", 2, 3);
  check_counts(w, "weight");
  LoadTrace load = to_trace(w);
  Evaluated ev{load.passes == 1 ? load : load.sum(), {}};
  ev.pl = to_placement(phy2log, "phy2log", load.experts, num_gpus, load.layers);
  return ev;
}

py::array_t<double> py_rank_loads(py::object phy2log, py::object weight, int num_gpus) {
  auto ev = read_eval(phy2log, weight, num_gpus);
  std::vector<double> out;
  for (int l = 0; l < ev.pl.layers; ++l) {
    auto rl = rank_loads_even(ev.pl.layer(l), num_gpus, ev.sum.at(0, l), ev.sum.experts);
    out.insert(out.end(), rl.begin(), rl.end());
  }
  return float_array(out, {ev.pl.layers, num_gpus});
}

py::dict py_evaluate(py::object phy2log, py::object weight, int num_gpus) {
  auto ev = read_eval(phy2log, weight, num_gpus);
  LayerBalance b = evaluate_even(ev.pl, ev.sum);
  const int L = ev.pl.layers;
  py::dict d;
  d["balancedness"] = float_array(b.balancedness, {L});
  d["max_load"] = float_array(b.max_load, {L});
  d["lower_bound"] = float_array(b.bound, {L});
  d["mean_balancedness"] = b.mean;
  d["worst_balancedness"] = b.worst;
  d["worst_layer"] = b.worst_layer;
  d["mean_imbalance"] = b.mean_imbalance;
  d["achieved_over_bound"] = b.achieved_over_bound;
  return d;
}

py::array_t<double> py_balancedness(py::object phy2log, py::object weight, int num_gpus) {
  auto ev = read_eval(phy2log, weight, num_gpus);
  LayerBalance b = evaluate_even(ev.pl, ev.sum);
  return float_array(b.balancedness, {ev.pl.layers});
}

py::array_t<double> py_lower_bound(py::object weight, int num_replicas, int num_gpus) {
  Dense w = to_dense(weight, "weight", 2, 2);
  check_counts(w, "weight");
  const int L = int(w.dim(0)), E = int(w.dim(1));
  check(num_gpus > 0, "num_gpus must be positive, got {}", num_gpus);
  check(num_replicas >= E, "num_replicas ({}) is smaller than the number of logical experts ({})", num_replicas, E);
  std::vector<double> out(L);
  for (int l = 0; l < L; ++l) out[l] = max_load_lower_bound(w.data.data() + size_t(l) * E, E, num_replicas, num_gpus);
  return float_array(out, {L});
}

py::array_t<double> py_evaluate_passes(py::object phy2log, py::object trace, int num_gpus, const std::string& dispatch,
                                       int ranks_per_node) {
  Dense w = to_dense(trace, "trace", 3, 3);
  check_counts(w, "trace");
  LoadTrace t = to_trace(w);
  Placement pl = to_placement(phy2log, "phy2log", t.experts, num_gpus, t.layers);
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
  return float_array(out, {t.passes});
}

py::array_t<int64_t> py_replica_graph_components(py::object phy2log, int num_gpus, int num_logical_experts) {
  Placement pl = to_placement(phy2log, "phy2log", num_logical_experts, num_gpus);
  std::vector<int32_t> out(pl.layers);
  for (int l = 0; l < pl.layers; ++l) out[l] = replica_graph_components(pl.layer(l), num_gpus, num_logical_experts);
  return int64_array(out, {pl.layers});
}

}  // namespace

PYBIND11_MODULE(ballast_eplb, m) {
  m.doc() = "ballast's expert-parallel load balancer (EPLB): deepseek-ai/EPLB-compatible rebalance_experts, "
            "ballast's own algorithm, and balance metrics.";
  py::register_exception<ballast::Error>(m, "EplbError", PyExc_ValueError);

  m.def("rebalance_experts", &py_rebalance_experts, py::arg("weight"), py::arg("num_replicas"),
        py::arg("num_groups"), py::arg("num_nodes"), py::arg("num_gpus"),
        R"(The expert-parallelism load balancer of deepseek-ai/EPLB (same arguments, same results).

weight: [layers, num_logical_experts] load statistics (numpy array, nested lists, CPU tensor)
num_replicas: physical experts (a multiple of num_gpus, >= num_logical_experts)
num_groups, num_nodes, num_gpus: the hierarchical policy is used when num_groups % num_nodes == 0,
    else the global policy.
Returns (phy2log [layers, num_replicas], log2phy [layers, num_logical_experts, X] padded with -1
where X is the largest replica count, logcnt [layers, num_logical_experts]), numpy int64.)");

  m.def("rebalance_experts_ballast", &py_rebalance_ballast, py::arg("weight"), py::arg("num_replicas"),
        py::arg("num_gpus"), py::arg("slices") = py::none(), py::arg("current") = py::none(),
        py::arg("migration_weight") = 0.0, py::arg("dispatch") = "static",
        R"(ballast's balancing algorithm (replicas of one expert on distinct GPUs, replica counts and
packing chosen together, balance over time slices, optional migration cost).

weight: [layers, E] (a window's sum) or [passes, layers, E] (a window of passes)
num_replicas: physical experts P (multiple of num_gpus, >= E); num_gpus: EP ranks
slices: for a [passes, layers, E] load, the number of consecutive time slices balanced together
    (default 4; 1 = plan on the window's sum)
current: the placement in force, phy2log [layers, P]; with migration_weight > 0 the plan trades
    balance for fewer moved experts (0.05: moving every slot of a layer is worth 5% of its balance)
dispatch: the policy the placement is served with: "static" or "random" (balance the even split),
    "balanced" (also link all GPUs through shared experts, so that per-pass balanced dispatch can
    move any GPU's excess)
Returns (phy2log, log2phy, logcnt) as rebalance_experts; log2phy lists replicas by ascending slot.)");

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

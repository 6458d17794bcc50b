// vLLM's EPLB policy interface: rebalance_experts(weight, num_replicas, num_groups, num_nodes,
// num_ranks, old_global_expert_indices=None) -> phy2log, where experts that stay on a GPU keep
// their old slots (vLLM's preserve_intragpu_slots post-pass). Two policies behind it:
//   deepseek: vLLM's DefaultEplbPolicy (deepseek-ai/EPLB, then the post-pass);
//   ballast:  ballast's planner given the old placement as the current one (migration-aware:
//             it keeps experts on their GPUs where that costs little balance), then the post-pass.
#include "ballast/core/error.h"
#include "ballast/eplb/migration.h"
#include "ballast/eplb/plan.h"
#include "module.h"

#include <pybind11/stl.h>

#include <cmath>

namespace ballast::python {
using namespace ballast::eplb;

namespace {

// old_global_expert_indices [L, P] as read: -1 allowed (an empty slot after vLLM's scale-up).
struct OldPlacement {
  std::vector<int32_t> rows;
  int layers = 0, physical = 0;
  bool complete = true;  // every slot holds an expert and every expert has a replica, in every layer
};

OldPlacement read_old(py::handle obj, int experts, Origin* o) {
  Dense d = to_dense(obj, "old_global_expert_indices", 2, 2, o);
  OldPlacement old;
  old.layers = int(d.dim(0)), old.physical = int(d.dim(1));
  old.rows.resize(d.data.size());
  std::vector<int> cnt(experts);
  for (int l = 0; l < old.layers; ++l) {
    std::fill(cnt.begin(), cnt.end(), 0);
    for (int p = 0; p < old.physical; ++p) {
      const double x = d.data[size_t(l) * old.physical + p];
      check(x == std::floor(x) && x >= -1 && x < experts,
            "old_global_expert_indices[{}][{}] is {}: expected a logical expert id in [0, {}) or -1", l, p, x, experts);
      old.rows[size_t(l) * old.physical + p] = int32_t(x);
      if (x >= 0) cnt[int(x)]++; else old.complete = false;
    }
    for (int c : cnt) old.complete &= c > 0;
  }
  return old;
}

std::vector<int32_t> vllm_rebalance(const Dense& w, int num_replicas, int num_groups, int num_nodes, int num_ranks,
                                    const std::optional<OldPlacement>& old, const std::string& algorithm,
                                    double migration_weight, const std::string& dispatch) {
  const int L = int(w.dim(w.shape.size() - 2)), E = int(w.shape.back());
  std::vector<int32_t> phy2log;
  if (algorithm == "deepseek") {
    phy2log = deepseek_plan(summed(w), num_replicas, num_groups, num_nodes, num_ranks, std::nullopt).phy2log;
  } else {
    check(algorithm == "ballast", "unknown algorithm '{}' (expected ballast or deepseek)", algorithm);
    check_plan_args(E, num_replicas, num_ranks);
    check(num_groups > 0 && num_nodes > 0, "num_groups and num_nodes must be positive, got {} and {}", num_groups,
          num_nodes);
    check(std::isfinite(migration_weight) && migration_weight >= 0, "migration_weight must be >= 0, got {}",
          migration_weight);
    PlanOptions po;
    po.algorithm = Algorithm::ballast;
    po.ranks = num_ranks, po.redundant = num_replicas - E, po.migration_weight = migration_weight;
    po.dispatch = parse_dispatch(dispatch);
    // vLLM's rule: hierarchical when the groups divide over the nodes, else global.
    if (num_nodes > 1 && num_groups % num_nodes == 0 && num_ranks % num_nodes == 0) po.nodes = num_nodes, po.groups = num_groups;
    std::optional<Placement> cur;
    if (old && old->complete && old->layers == L && old->physical == num_replicas) {
      cur.emplace(L, E, num_replicas, num_ranks);
      cur->phy2log = old->rows;
      po.current = &*cur;
    }
    LoadTrace load = to_trace(w);
    py::gil_scoped_release nogil;
    phy2log = plan(load, po).phy2log;
  }
  // The post-pass applies when the GPUs and their slots are unchanged (as vLLM's).
  if (old && old->layers == L && old->physical == num_replicas)
    phy2log = keep_slots(phy2log, old->rows, L, num_replicas, num_ranks);
  return phy2log;
}

py::object py_rebalance_vllm(py::object weight, int num_replicas, int num_groups, int num_nodes, int num_ranks,
                             py::object old_global_expert_indices, const std::string& algorithm,
                             double migration_weight, const std::string& dispatch) {
  Origin o;
  Dense w = to_dense(weight, "weight", 2, 3, &o);
  check_counts(w, "weight");
  const int L = int(w.dim(w.shape.size() - 2)), E = int(w.shape.back());
  std::optional<OldPlacement> old;
  if (!old_global_expert_indices.is_none()) old = read_old(old_global_expert_indices, E, &o);
  auto phy2log = vllm_rebalance(w, num_replicas, num_groups, num_nodes, num_ranks, old, algorithm, migration_weight,
                                dispatch);
  return int64_out(phy2log, {L, num_replicas}, o);
}

py::object py_preserve_intragpu_slots(py::object phy2log, int num_ranks, py::object old_phy2log) {
  Origin o;
  Dense n = to_dense(phy2log, "phy2log", 2, 2, &o), d = to_dense(old_phy2log, "old_phy2log", 2, 2, &o);
  const int L = int(n.dim(0)), P = int(n.dim(1));
  std::vector<int32_t> next(n.data.size()), old(d.data.size());
  for (size_t i = 0; i < n.data.size(); ++i) next[i] = int32_t(n.data[i]);
  for (size_t i = 0; i < d.data.size(); ++i) old[i] = int32_t(d.data[i]);
  // As vLLM's: nothing to keep when the ranks or their slots differ.
  if (num_ranks <= 0 || P % num_ranks != 0 || n.shape != d.shape) return int64_out(next, {L, P}, o);
  return int64_out(keep_slots(next, old, L, P, num_ranks), {L, P}, o);
}

py::object py_slots_kept(py::object old_phy2log, py::object new_phy2log) {
  Origin o;
  Dense a = to_dense(old_phy2log, "old_phy2log", 2, 2, &o), b = to_dense(new_phy2log, "new_phy2log", 2, 2, &o);
  check(a.shape == b.shape, "slots_kept: the placements have shapes [{}] and [{}]", fmt::join(a.shape, ", "),
        fmt::join(b.shape, ", "));
  const int L = int(a.dim(0)), P = int(a.dim(1));
  std::vector<int64_t> kept(L, 0);
  for (int l = 0; l < L; ++l)
    for (int p = 0; p < P; ++p) kept[l] += a.data[size_t(l) * P + p] == b.data[size_t(l) * P + p];
  return int64_out(kept, {L}, o);
}

// vLLM's replicate_experts returns (phy2log, logcnt) only.
py::tuple py_vllm_replicate(py::object weight, int num_phy) {
  py::tuple t = py::module_::import("ballast_eplb").attr("replicate_experts")(weight, num_phy);
  return py::make_tuple(t[0], t[2]);
}

// A policy class: static methods named and shaped as vLLM's DefaultEplbPolicy's.
struct DeepseekPolicy {};
struct BallastPolicy {};

}  // namespace

void bind_vllm_policy(py::module_& m) {
  m.def("rebalance_experts_vllm", &py_rebalance_vllm, py::arg("weight"), py::arg("num_replicas"),
        py::arg("num_groups"), py::arg("num_nodes"), py::arg("num_ranks"),
        py::arg("old_global_expert_indices") = py::none(), py::arg("algorithm") = "ballast",
        py::arg("migration_weight") = 0.05, py::arg("dispatch") = "static",
        R"(vLLM's policy interface: returns phy2log [layers, num_replicas] (int64, torch on the weight's device
when given tensors).

weight: [layers, E] (ballast also takes [passes, layers, E]); num_ranks: EP ranks (vLLM's num_gpus)
old_global_expert_indices: the placement in force [layers, num_replicas] (-1 = empty slot) or None.
    Experts that stay on a GPU keep their old slots (vLLM's preserve_intragpu_slots).
algorithm: "ballast" (plans with the old placement as the current one, trading balance for moved
    experts by migration_weight; hierarchical when num_groups % num_nodes == 0 as vLLM) or
    "deepseek" (vLLM's DefaultEplbPolicy: deepseek-ai/EPLB, then the post-pass).)");
  m.def("preserve_intragpu_slots", &py_preserve_intragpu_slots, py::arg("phy2log"), py::arg("num_ranks"),
        py::arg("old_phy2log"),
        "vLLM's post-pass: the same experts per GPU as phy2log, reordered so that an expert the GPU held "
        "before keeps its old slot; the others fill the free slots in order. Unchanged when the ranks or "
        "slots per rank differ.");
  m.def("slots_kept", &py_slots_kept, py::arg("old_phy2log"), py::arg("new_phy2log"),
        "Slots per layer [layers] whose expert is the same in both placements (their weights need no copy).");

  auto policy = [&](auto tag, const char* name, const char* algorithm, const char* doc) {
    using Tag = decltype(tag);
    const std::string alg = algorithm;
    py::class_<Tag>(m, name, doc)
        .def_static(
            "rebalance_experts",
            [alg](py::object weight, int num_replicas, int num_groups, int num_nodes, int num_ranks,
                  py::object old_global_expert_indices) {
              return py_rebalance_vllm(weight, num_replicas, num_groups, num_nodes, num_ranks,
                                       old_global_expert_indices, alg, 0.05, "static");
            },
            py::arg("weight"), py::arg("num_replicas"), py::arg("num_groups"), py::arg("num_nodes"),
            py::arg("num_ranks"), py::arg("old_global_expert_indices") = py::none())
        .def_static("preserve_intragpu_slots", &py_preserve_intragpu_slots, py::arg("phy2log"), py::arg("num_ranks"),
                    py::arg("old_phy2log"))
        .def_static(
            "balanced_packing",
            [](py::object w, int n) { return py::module_::import("ballast_eplb").attr("balanced_packing")(w, n); },
            py::arg("weight"), py::arg("num_packs"))
        .def_static("replicate_experts", &py_vllm_replicate, py::arg("weight"), py::arg("num_phy"));
  };
  policy(DeepseekPolicy{}, "DeepseekPolicy", "deepseek",
         "vLLM's DefaultEplbPolicy, as a class of static methods (rebalance_experts, preserve_intragpu_slots, "
         "balanced_packing, replicate_experts): deepseek-ai/EPLB, then the slot-keeping post-pass.");
  policy(BallastPolicy{}, "BallastPolicy", "ballast",
         "vLLM's policy interface over ballast's planner: the old placement is the current one (migration "
         "weight 0.05), then the slot-keeping post-pass. Same static methods as DeepseekPolicy.");
}

}  // namespace ballast::python

#include "ballast/eplb/deepseek.h"

#include "ballast/core/error.h"

#include <algorithm>
#include <numeric>

namespace ballast::eplb::deepseek {

TieOrder parse_tie_order(const std::string& name) {
  if (name == "stable") return TieOrder::stable;
  if (name == "std_sort") return TieOrder::std_sort;
  fail("unknown tie order '{}' (expected stable or std_sort)", name);
}

void balanced_packing(const float* weight, int n, int num_packs, int32_t* pack_index, int32_t* rank_in_pack,
                      TieOrder tie_order, const int32_t* label, Ties* ties) {
  check(num_packs > 0 && n % num_packs == 0, "balanced_packing: {} items are not divisible into {} packs", n,
        num_packs);
  const int per_pack = n / num_packs;
  if (per_pack == 1) {
    for (int i = 0; i < n; ++i) pack_index[i] = i, rank_in_pack[i] = 0;
    return;
  }
  // Descending by weight; equal weights as TieOrder says (see deepseek.h and docs/eplb.md).
  std::vector<int32_t> order(n);
  if (tie_order == TieOrder::stable) {
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return weight[a] > weight[b]; });
  } else {
    // PyTorch's sort_kernel_impl: std::sort over (value, index) pairs with KeyValueCompDesc.
    std::vector<std::pair<float, int64_t>> kv(n);
    for (int i = 0; i < n; ++i) kv[i] = {weight[i], i};
    std::sort(kv.begin(), kv.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    for (int i = 0; i < n; ++i) order[i] = int32_t(kv[i].second);
  }
  if (ties)
    for (int i = 1; i < n; ++i)
      if (weight[order[i]] == weight[order[i - 1]]) {
        bool same = label && label[order[i]] == label[order[i - 1]];
        (same ? ties->same : ties->cross)++;
      }
  std::vector<float> pack_weight(num_packs, 0.0f);
  std::vector<int32_t> pack_items(num_packs, 0);
  for (int32_t item : order) {
    int best = -1;
    for (int p = 0; p < num_packs; ++p)
      if (pack_items[p] < per_pack && (best < 0 || pack_weight[p] < pack_weight[best])) best = p;
    pack_index[item] = best;
    rank_in_pack[item] = pack_items[best];
    pack_weight[best] += weight[item];
    pack_items[best]++;
  }
}

void replicate_experts(const float* weight, int num_log, int num_phy, int32_t* phy2log, int32_t* rank,
                       int32_t* logcnt) {
  check(num_phy >= num_log, "replicate_experts: {} physical slots are fewer than {} logical experts", num_phy,
        num_log);
  for (int i = 0; i < num_log; ++i) phy2log[i] = i, rank[i] = 0, logcnt[i] = 1;
  // Per-replica loads in float32 as the original computes weight / logcnt.
  std::vector<float> ratio(weight, weight + num_log);
  for (int i = num_log; i < num_phy; ++i) {
    int best = 0;
    for (int e = 1; e < num_log; ++e)
      if (ratio[e] > ratio[best]) best = e;
    phy2log[i] = best;
    rank[i] = logcnt[best];
    logcnt[best]++;
    ratio[best] = weight[best] / float(logcnt[best]);
  }
}

Result rebalance_hierarchical(const double* weight_in, int L, int E, int P, int num_groups, int num_nodes,
                              int num_gpus, TieOrder order) {
  check(L >= 1 && E >= 1, "deepseek: empty load ({} layers x {} experts)", L, E);
  check(num_groups >= 1 && num_nodes >= 1 && num_gpus >= 1, "deepseek: groups, nodes and GPUs must be >= 1");
  check(E % num_groups == 0, "deepseek: {} logical experts are not divisible into {} groups", E, num_groups);
  check(num_groups % num_nodes == 0, "deepseek: {} groups are not divisible over {} nodes", num_groups, num_nodes);
  check(num_gpus % num_nodes == 0, "deepseek: {} GPUs are not divisible over {} nodes", num_gpus, num_nodes);
  check(P % num_gpus == 0, "deepseek: {} physical slots are not divisible by {} GPUs", P, num_gpus);
  check(P >= E, "deepseek: {} physical slots are fewer than {} logical experts", P, E);
  const int group_size = E / num_groups, groups_per_node = num_groups / num_nodes;
  const int per_gpu = P / num_gpus, E_node = E / num_nodes, P_node = P / num_nodes;
  const int gpus_per_node = num_gpus / num_nodes;

  Result r;
  r.layers = L, r.logical = E, r.physical = P;
  r.phy2log.resize(size_t(L) * P), r.phyrank.resize(size_t(L) * P), r.logcnt.resize(size_t(L) * E);

  std::vector<float> w(E), group_w(num_groups), mlog_w(E), phy_w(P_node);
  std::vector<int32_t> gpack(num_groups), grank(num_groups), log2mlog(E), mlog2log(E);
  std::vector<int32_t> phy2mlog(P), phyrank(P), mlogcnt(E);
  std::vector<int32_t> pack(P_node), rip(P_node), pphy2phy(P_node);
  for (int l = 0; l < L; ++l) {
    const double* wl = weight_in + size_t(l) * E;
    for (int e = 0; e < E; ++e) {
      check(wl[e] >= 0, "deepseek: negative load {} at layer {} expert {}", wl[e], l, e);
      w[e] = float(wl[e]);
    }
    // Step 1: pack groups onto nodes. Group sums are float32 of the exact sum.
    for (int g = 0; g < num_groups; ++g) {
      double s = 0;
      for (int i = 0; i < group_size; ++i) s += double(w[g * group_size + i]);
      group_w[g] = float(s);
    }
    balanced_packing(group_w.data(), num_groups, num_nodes, gpack.data(), grank.data(), order, nullptr, &r.ties);
    for (int e = 0; e < E; ++e) {
      int g = e / group_size;
      log2mlog[e] = (gpack[g] * groups_per_node + grank[g]) * group_size + e % group_size;
    }
    for (int e = 0; e < E; ++e) mlog2log[log2mlog[e]] = e;
    for (int m = 0; m < E; ++m) mlog_w[m] = w[mlog2log[m]];
    // Step 2: replicate within each node; Step 3: pack the node's replicas onto its GPUs.
    for (int n = 0; n < num_nodes; ++n) {
      int32_t* p2m = phy2mlog.data() + size_t(n) * P_node;
      int32_t* prank = phyrank.data() + size_t(n) * P_node;
      int32_t* mcnt = mlogcnt.data() + size_t(n) * E_node;
      const float* nw = mlog_w.data() + size_t(n) * E_node;
      replicate_experts(nw, E_node, P_node, p2m, prank, mcnt);
      for (int q = 0; q < P_node; ++q) phy_w[q] = nw[p2m[q]] / float(mcnt[p2m[q]]);
      balanced_packing(phy_w.data(), P_node, gpus_per_node, pack.data(), rip.data(), order, p2m, &r.ties);
      for (int q = 0; q < P_node; ++q) pphy2phy[pack[q] * per_gpu + rip[q]] = q;
      for (int p = 0; p < P_node; ++p) {
        int q = pphy2phy[p];
        r.phy2log[size_t(l) * P + n * P_node + p] = mlog2log[p2m[q] + n * E_node];
        r.phyrank[size_t(l) * P + n * P_node + p] = prank[q];
      }
    }
    for (int e = 0; e < E; ++e) r.logcnt[size_t(l) * E + e] = mlogcnt[log2mlog[e]];
  }
  int X = 0;
  for (int32_t c : r.logcnt) X = std::max(X, int(c));
  r.max_replicas = X;
  r.log2phy.assign(size_t(L) * E * X, -1);
  for (int l = 0; l < L; ++l)
    for (int p = 0; p < P; ++p) {
      size_t i = size_t(l) * P + p;
      r.log2phy[(size_t(l) * E + r.phy2log[i]) * X + r.phyrank[i]] = p;
    }
  return r;
}

Result rebalance_experts(const double* weight, int layers, int num_logical, int num_replicas, int num_groups,
                         int num_nodes, int num_gpus, TieOrder order) {
  check(num_nodes >= 1, "deepseek: number of nodes must be >= 1, got {}", num_nodes);
  if (num_groups % num_nodes == 0)
    return rebalance_hierarchical(weight, layers, num_logical, num_replicas, num_groups, num_nodes, num_gpus, order);
  return rebalance_hierarchical(weight, layers, num_logical, num_replicas, 1, 1, num_gpus, order);
}

}  // namespace ballast::eplb::deepseek

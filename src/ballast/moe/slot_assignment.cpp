#include "ballast/moe/slot_assignment.h"

#include <algorithm>

#include "ballast/core/error.h"

namespace ballast::moe {

namespace {

// balanced: the exact per-pass split of eplb::dispatch_balanced gives each slot a quota; the
// quotas are shared out to source ranks (own replicas first, then in rank and slot order), and
// each rank hands its tokens of an expert to its shares in token order.
std::vector<int32_t> assign_balanced(const SlotAssignmentInput& in, const Routing& r) {
  const int G = in.ranks, E = in.experts, P = int(in.row.size()), K = P / G;
  check(int64_t(in.counts_by_rank.size()) == int64_t(G) * E, "balanced dispatch needs [G][E] counts");
  std::vector<double> total(size_t(E), 0.0);
  for (int g = 0; g < G; ++g)
    for (int e = 0; e < E; ++e) total[size_t(e)] += double(in.counts_by_rank[size_t(g) * E + e]);
  std::vector<double> quota = eplb::dispatch_balanced(in.row, G, total.data(), E);
  const auto rep = eplb::replicas_of(in.row, E);
  // share[e] = list of (slot, tokens) for this rank, in the order tokens are handed out.
  std::vector<std::vector<std::pair<int32_t, int64_t>>> mine(static_cast<size_t>(E));
  for (int e = 0; e < E; ++e) {
    std::vector<int64_t> need(static_cast<size_t>(G));
    for (int g = 0; g < G; ++g) need[size_t(g)] = in.counts_by_rank[size_t(g) * E + e];
    auto give = [&](int g, int32_t s) {
      const int64_t take = std::min<int64_t>(need[size_t(g)], int64_t(quota[size_t(s)]));
      if (take <= 0) return;
      need[size_t(g)] -= take;
      quota[size_t(s)] -= double(take);
      if (g == in.rank) mine[size_t(e)].push_back({s, take});
    };
    for (int g = 0; g < G; ++g)
      for (int32_t s : rep[size_t(e)])
        if (s / K == g) give(g, s);
    for (int g = 0; g < G; ++g)
      for (int32_t s : rep[size_t(e)]) give(g, s);
    check(need[size_t(in.rank)] == 0, "balanced dispatch left {} tokens of expert {} unassigned", need[size_t(in.rank)], e);
  }
  std::vector<int32_t> slots(r.experts.size());
  std::vector<size_t> cursor(size_t(E), 0);
  std::vector<int64_t> used(size_t(E), 0);
  for (size_t i = 0; i < r.experts.size(); ++i) {
    const int e = r.experts[i];
    auto& shares = mine[size_t(e)];
    size_t& c = cursor[size_t(e)];
    while (used[size_t(e)] >= shares[c].second) {
      used[size_t(e)] = 0;
      ++c;
    }
    slots[i] = shares[c].first;
    ++used[size_t(e)];
  }
  return slots;
}

}  // namespace

std::vector<int64_t> routed_counts(const Routing& routing, int experts) {
  std::vector<int64_t> c(size_t(experts), 0);
  for (int32_t e : routing.experts) ++c[size_t(e)];
  return c;
}

std::vector<int32_t> assign_slots(const SlotAssignmentInput& in, const Routing& r) {
  const int E = in.experts;
  switch (in.policy) {
    case eplb::Dispatch::static_: {
      const auto table = eplb::static_table(in.row, in.ranks, in.ranks_per_node, E);
      std::vector<int32_t> slots(r.experts.size());
      for (size_t i = 0; i < slots.size(); ++i) slots[i] = table[size_t(in.rank) * E + size_t(r.experts[i])];
      return slots;
    }
    case eplb::Dispatch::random: {
      const auto rep = eplb::replicas_of(in.row, E);
      std::vector<int32_t> slots(r.experts.size());
      for (size_t i = 0; i < slots.size(); ++i) {
        const auto& c = rep[size_t(r.experts[i])];
        slots[i] = c[eplb::mix64(in.seed ^ eplb::mix64(uint64_t(in.rank) << 40 ^ uint64_t(i))) % c.size()];
      }
      return slots;
    }
    case eplb::Dispatch::balanced:
      return assign_balanced(in, r);
  }
  return {};
}

}  // namespace ballast::moe

#include "ballast/eplb/migration.h"

#include "ballast/core/error.h"

#include <algorithm>

namespace ballast::eplb {

MigrationPlan plan_migration(const Placement& a, const Placement& b, int ranks_per_node, int64_t bytes_per_expert) {
  check(a.layers == b.layers && a.logical == b.logical && a.physical == b.physical && a.ranks == b.ranks,
        "migration: placements differ in shape ({}x{}x{} on {} ranks vs {}x{}x{} on {} ranks)", a.layers, a.logical,
        a.physical, a.ranks, b.layers, b.logical, b.physical, b.ranks);
  const int G = a.ranks, K = a.slots_per_rank(), rpn = ranks_per_node > 0 ? ranks_per_node : G;
  check(G % rpn == 0, "migration: {} ranks are not divisible into nodes of {}", G, rpn);
  MigrationPlan m;
  m.sent.assign(G, 0), m.received.assign(G, 0), m.bytes_sent.assign(G, 0), m.bytes_received.assign(G, 0);
  for (int l = 0; l < a.layers; ++l) {
    auto src = a.layer(l), dst = b.layer(l);
    auto holders = a.logical_to_physical(l);
    for (int p = 0; p < a.physical; ++p) {
      int e = dst[p];
      if (src[p] == e) continue;
      int r = p / K;
      Copy c{l, e, -1, -1, p, r, CopyKind::local};
      for (int q : holders[e])
        if (q / K == r) { c.src_slot = q; break; }
      if (c.src_slot < 0) {
        check(!holders[e].empty(), "migration: layer {} slot {} needs expert {}, which the old placement lacks", l, p, e);
        // Prefer the same node, then the sender with the fewest sends so far.
        int best = -1;
        for (int q : holders[e]) {
          auto key = [&](int s) { return std::make_pair((s / K) / rpn != r / rpn, m.sent[s / K]); };
          if (best < 0 || key(q) < key(best)) best = q;
        }
        c.src_slot = best;
        c.kind = (best / K) / rpn == r / rpn ? CopyKind::intra_node : CopyKind::inter_node;
        m.sent[best / K]++, m.received[r]++;
        m.bytes_sent[best / K] += bytes_per_expert, m.bytes_received[r] += bytes_per_expert;
      }
      c.src_rank = c.src_slot / K;
      m.copies.push_back(c);
    }
  }
  std::stable_sort(m.copies.begin(), m.copies.end(), [](const Copy& x, const Copy& y) { return x.kind < y.kind; });
  for (const auto& c : m.copies) {
    if (c.kind == CopyKind::local) m.local++;
    else if (c.kind == CopyKind::intra_node) m.intra_node++;
    else m.inter_node++;
  }
  m.experts_moved = m.intra_node + m.inter_node;
  m.bytes_moved = int64_t(m.experts_moved) * bytes_per_expert;
  return m;
}

std::vector<int32_t> keep_slots(std::span<const int32_t> next, std::span<const int32_t> old, int L, int P, int G) {
  check(L >= 0 && P > 0 && G > 0 && P % G == 0, "keep_slots: {} slots are not divisible by {} ranks", P, G);
  check(next.size() == size_t(L) * P && old.size() == size_t(L) * P,
        "keep_slots: the placements hold {} and {} slots, expected {} layers x {}", next.size(), old.size(), L, P);
  const int K = P / G;
  std::vector<int32_t> out(next.begin(), next.end());
  std::vector<uint8_t> used(K), kept(K);
  for (int l = 0; l < L; ++l)
    for (int g = 0; g < G; ++g) {
      const int32_t* nx = next.data() + size_t(l) * P + g * K;
      const int32_t* od = old.data() + size_t(l) * P + g * K;
      int32_t* dst = out.data() + size_t(l) * P + g * K;
      std::fill(used.begin(), used.end(), 0), std::fill(kept.begin(), kept.end(), 0);
      // An old slot keeps its expert when the rank still holds it (first unused copy in `next`).
      for (int k = 0; k < K; ++k)
        for (int j = 0; j < K; ++j)
          if (!used[j] && od[k] >= 0 && nx[j] == od[k]) {
            dst[k] = nx[j], used[j] = kept[k] = 1;
            break;
          }
      // The rest, in order, into the remaining slots in order.
      for (int k = 0, j = 0; k < K; ++k) {
        if (kept[k]) continue;
        while (used[j]) ++j;
        dst[k] = nx[j], used[j] = 1;
      }
    }
  return out;
}

Placement keep_slots(const Placement& next, const Placement& old) {
  check(next.layers == old.layers && next.physical == old.physical && next.ranks == old.ranks,
        "keep_slots: placements differ in shape ({} x {} on {} ranks vs {} x {} on {})", next.layers, next.physical,
        next.ranks, old.layers, old.physical, old.ranks);
  Placement out = next;
  out.phy2log = keep_slots(next.phy2log, old.phy2log, next.layers, next.physical, next.ranks);
  return out;
}

std::vector<int> slots_kept(const Placement& a, const Placement& b) {
  check(a.layers == b.layers && a.physical == b.physical, "slots_kept: placements differ in shape");
  std::vector<int> out(a.layers, 0);
  for (int l = 0; l < a.layers; ++l)
    for (int p = 0; p < a.physical; ++p) out[l] += a.layer(l)[p] == b.layer(l)[p];
  return out;
}

}  // namespace ballast::eplb

// CpuOps: the mixture-of-experts ops (docs/expert-parallel.md): routing, dispatch to physical
// slots, grouping rows by slot, the grouped SwiGLU experts and the weighted combine.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "ballast/core/error.h"
#include "ballast/core/hash.h"
#include "ballast/eplb/dispatch.h"
#include "ballast/kernels/cpu/cpu_ops.h"
#include "ballast/kernels/cpu/matmul.h"
#include "ballast/kernels/cpu/op_support.h"
#include "ballast/kernels/op_checks.h"

namespace ballast::kernels {

using namespace cpu;

void CpuOps::topk_softmax(const Tensor& logits, int k, bool normalize, const Tensor& routed, Tensor& ids,
                          Tensor& weights) {
  auto timed = time_op("topk_softmax");
  const TopkShape shape = check_topk_softmax(logits, k, routed, ids, weights);
  const int64_t T = shape.T;
  const int E = int(shape.E);
  const float* lp = f32(logits);
  const int32_t* rp = routed.defined() ? i32(routed) : nullptr;
  int32_t* idp = i32_mut(ids);
  float* wp = f32_mut(weights);
  parallel(&pool_, T, 16, [&](int64_t t0, int64_t t1) {
    thread_local std::vector<float> p;
    thread_local std::vector<int32_t> idx;
    p.resize(size_t(E));
    idx.resize(size_t(E));
    for (int64_t t = t0; t < t1; ++t) {
      if (rp && rp[t] == 0) {
        std::fill(idp + t * k, idp + (t + 1) * k, -1);
        std::fill(wp + t * k, wp + (t + 1) * k, 0.0f);
        continue;
      }
      const float* l = lp + t * E;
      const float mx = *std::max_element(l, l + E);
      float sum = 0;
      for (int e = 0; e < E; ++e) sum += (p[size_t(e)] = std::exp(l[e] - mx));
      for (int e = 0; e < E; ++e) p[size_t(e)] /= sum;
      std::iota(idx.begin(), idx.end(), 0);
      std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int32_t a, int32_t b) {
        return p[size_t(a)] > p[size_t(b)] || (p[size_t(a)] == p[size_t(b)] && a < b);
      });
      float ksum = 0;
      for (int j = 0; j < k; ++j) ksum += p[size_t(idx[size_t(j)])];
      for (int j = 0; j < k; ++j) {
        const float pj = p[size_t(idx[size_t(j)])];
        idp[t * k + j] = idx[size_t(j)];
        wp[t * k + j] = normalize ? pj / ksum : pj;
      }
    }
  });
}

namespace {

// balanced: the exact per-pass split of eplb::dispatch_balanced gives each slot a quota; the
// quotas are shared out to source ranks (own replicas first, then in rank and slot order), and
// each rank hands its tokens of an expert to its shares in token order.
void dispatch_balanced(const DispatchTables& tables, std::span<const int32_t> row, int E, const int32_t* ids,
                       int64_t N, const int32_t* counts, int32_t* slots) {
  const int G = tables.ranks, K = tables.slots_per_rank;
  std::vector<double> total(size_t(E), 0.0);
  for (int g = 0; g < G; ++g)
    for (int e = 0; e < E; ++e) total[size_t(e)] += double(counts[size_t(g) * E + e]);
  std::vector<double> quota = eplb::dispatch_balanced(row, G, total.data(), E);
  const auto rep = eplb::replicas_of(row, E);
  // mine[e] = this rank's shares of expert e: (slot, tokens), in the order tokens are handed out.
  std::vector<std::vector<std::pair<int32_t, int64_t>>> mine(static_cast<size_t>(E));
  std::vector<int64_t> need(static_cast<size_t>(G));
  for (int e = 0; e < E; ++e) {
    for (int g = 0; g < G; ++g) need[size_t(g)] = counts[size_t(g) * E + e];
    auto give = [&](int g, int32_t s) {
      const int64_t take = std::min<int64_t>(need[size_t(g)], int64_t(quota[size_t(s)]));
      if (take <= 0) return;
      need[size_t(g)] -= take;
      quota[size_t(s)] -= double(take);
      if (g == tables.rank) mine[size_t(e)].push_back({s, take});
    };
    for (int g = 0; g < G; ++g)
      for (int32_t s : rep[size_t(e)])
        if (s / K == g) give(g, s);
    for (int g = 0; g < G; ++g)
      for (int32_t s : rep[size_t(e)]) give(g, s);
    check(need[size_t(tables.rank)] == 0, "dispatch: balanced left {} tokens of expert {} unassigned",
          need[size_t(tables.rank)], e);
  }
  std::vector<size_t> cursor(size_t(E), 0);
  std::vector<int64_t> used(size_t(E), 0);
  for (int64_t i = 0; i < N; ++i) {
    const int e = ids[i];
    if (e < 0) {
      slots[i] = -1;
      continue;
    }
    const auto& shares = mine[size_t(e)];
    size_t& c = cursor[size_t(e)];
    while (c < shares.size() && used[size_t(e)] >= shares[c].second) {
      used[size_t(e)] = 0;
      ++c;
    }
    check(c < shares.size(), "dispatch: rank {} routes more tokens to expert {} than counts_by_rank[{}][{}] = {}",
          tables.rank, e, tables.rank, e, counts[size_t(tables.rank) * E + e]);
    slots[i] = shares[c].first;
    ++used[size_t(e)];
  }
}

}  // namespace

void CpuOps::dispatch(const DispatchTables& tables, const Tensor& ids, const Tensor& counts_by_rank, Tensor& slots) {
  auto timed = time_op("dispatch");
  const DispatchShape shape = check_dispatch(tables, ids, counts_by_rank, slots);
  const int64_t N = shape.N, E = shape.E;
  const int32_t* id = i32(ids);
  int32_t* out = i32_mut(slots);
  for (int64_t i = 0; i < N; ++i) check(id[i] < E, "dispatch: ids[{}] = {} not below {}", i, id[i], E);
  switch (tables.policy) {
    case eplb::Dispatch::static_: {
      const int32_t* table = i32(tables.static_slot);
      for (int64_t i = 0; i < N; ++i) out[i] = id[i] < 0 ? -1 : table[id[i]];
      return;
    }
    case eplb::Dispatch::random: {
      const int64_t R = shape.R;
      const int32_t* count = i32(tables.replica_count);
      for (int64_t e = 0; e < E; ++e)
        check(count[e] >= 1 && count[e] <= R, "dispatch: replica_count[{}] = {} not in [1, {}]", e, count[e], R);
      // The seed differs per pass and layer; the hash of (rank, choice) spreads one pass's choices.
      const uint64_t seed = uint64_t(*static_cast<const int64_t*>(tables.pass_seed.raw())) * 1000003u +
                            uint64_t(tables.layer);
      const int32_t* rep = i32(tables.replicas);
      for (int64_t i = 0; i < N; ++i) {
        const int64_t e = id[i];
        if (e < 0) {
          out[i] = -1;
          continue;
        }
        const uint64_t h = mix64(seed ^ mix64(uint64_t(tables.rank) << 40 ^ uint64_t(i)));
        out[i] = rep[e * R + int64_t(h % uint64_t(count[e]))];
      }
      return;
    }
    case eplb::Dispatch::balanced:
      dispatch_balanced(tables, std::span<const int32_t>(i32(tables.phy2log), size_t(shape.P)), int(E), id, N,
                        i32(counts_by_rank), out);
      return;
  }
}

void CpuOps::histogram(const Tensor& keys, Tensor& counts) {
  auto timed = time_op("histogram");
  check_histogram(keys, counts);
  const int64_t N = keys.numel(), bins = counts.numel();
  const int32_t* k = i32(keys);
  int32_t* c = i32_mut(counts);
  for (int64_t i = 0; i < N; ++i)
    check(k[i] < bins, "histogram: keys[{}] = {} not below {} bins", i, k[i], bins);
  for (int64_t i = 0; i < N; ++i)
    if (k[i] >= 0) ++c[k[i]];
}

void CpuOps::group_by(const Tensor& keys, const Tensor& valid, int div, int groups, Tensor& perm, Tensor& counts,
                      Tensor& offsets, Tensor& inverse) {
  auto timed = time_op("group_by");
  const int64_t N = check_group_by(keys, valid, div, groups, perm, counts, offsets, inverse);
  int64_t n = N;
  if (valid.defined()) {
    n = 0;
    for (int64_t i = 0; i < valid.numel(); ++i) n += i32(valid)[i];
    check(n >= 0 && n <= N, "group_by: valid sums to {} of {} keys", n, N);
  }
  const int32_t* k = i32(keys);
  int32_t* p = i32_mut(perm);
  int32_t* c = i32_mut(counts);
  int32_t* off = i32_mut(offsets);
  int32_t* inv = inverse.defined() ? i32_mut(inverse) : nullptr;
  const auto group_of = [&](int32_t key) { return (key / div) % groups; };
  std::fill(c, c + groups, 0);
  for (int64_t i = 0; i < n; ++i)
    if (k[i] >= 0) ++c[group_of(k[i])];
  off[0] = 0;
  for (int g = 0; g < groups; ++g) off[g + 1] = off[g] + c[g];
  // counts doubles as the fill cursor of each group: it ends where it began.
  std::fill(c, c + groups, 0);
  std::fill(p + off[groups], p + N, -1);
  if (inv) std::fill(inv, inv + N, -1);
  for (int64_t i = 0; i < n; ++i) {
    if (k[i] < 0) continue;
    const int g = group_of(k[i]);
    const int32_t at = off[g] + c[g]++;
    p[at] = int32_t(i);
    if (inv) inv[i] = at;
  }
}

void CpuOps::moe_experts(const Tensor& x, const Tensor& perm, const Tensor& offsets, int row_div,
                         std::span<const SwigluWeights> experts, Tensor& y) {
  auto timed = time_op("moe_experts");
  const auto [M, H, Ny] = check_moe_experts(x, perm, offsets, row_div, experts, y);
  const int groups = int(experts.size());
  const int32_t* p = i32(perm);
  const int32_t* off = i32(offsets);
  check(off[0] >= 0 && off[groups] <= perm.numel(), "moe_experts: offsets span [{}, {}) of perm {}", off[0],
        off[groups], perm);
  int64_t busy = 0, max_rows = 0, max_inter = 0;
  for (int g = 0; g < groups; ++g) {
    const int64_t n = off[g + 1] - off[g];
    check(n >= 0, "moe_experts: offsets decrease at group {}", g);
    if (n == 0) continue;
    // Defined experts' shapes are checked already; one with rows must be defined.
    const SwigluWeights& w = experts[size_t(g)];
    check(w.gate.defined(), "moe_experts: expert {} has gate{} up{} down{} for rows of {}", g, w.gate, w.up, w.down, H);
    const int64_t I = w.gate.dim(0);
    for (int64_t j = off[g]; j < off[g + 1]; ++j)
      check(p[j] >= 0 && p[j] < Ny && p[j] / row_div < M, "moe_experts: perm[{}] = {} out of range for x{} y{}", j,
            p[j], x, y);
    ++busy;
    max_rows = std::max(max_rows, n);
    max_inter = std::max(max_inter, I);
  }
  if (busy == 0) return;
  // Groups run side by side, each single-threaded, taken in turn by the pool's threads, unless
  // one group holds so many of the rows that the others would wait for it: then one group at a
  // time with the pool inside its products (which pays a wake of the pool per product). Few rows
  // per group (decode) always side by side: splitting a product of a streamed weight buys little.
  // Scratch per worker: X [n, H] (then Y), G and U [n, I].
  const int threads = pool_.size();
  const int64_t listed = off[groups] - off[0];
  const bool side_by_side =
      threads > 1 && busy >= 2 && (max_rows <= 8 || (busy >= threads && 2 * max_rows * threads <= 3 * listed));
  const int64_t per_worker = max_rows * (H + 2 * max_inter);
  // Scratch for the most any call of these shapes can need (every listed row in one group, or
  // 8 rows on every thread, or side by side 3/2 of the listed rows over the threads), whatever the
  // routing: it grows with the shapes only, never with the data, so steady-state passes allocate
  // nothing.
  int64_t widest = 0;
  for (const SwigluWeights& w : experts) widest = std::max(widest, w.gate.defined() ? w.gate.dim(0) : 0);
  const int64_t bound =
      std::max(perm.numel() * 3 / 2, threads * std::min<int64_t>(perm.numel(), 8)) * (H + 2 * widest);
  float* scratch = expert_scratch_.floats(size_t(bound));
  const float* xp = f32(x);
  float* yp = f32_mut(y);
  auto run_group = [&, H = H](int g, float* s, ThreadPool* pool) {
    const int64_t j0 = off[g], n = off[g + 1] - j0;
    if (n == 0) return;
    const SwigluWeights& w = experts[size_t(g)];
    const int64_t I = w.gate.dim(0);
    float* X = s;
    float* G = X + n * H;
    float* U = G + n * I;
    for (int64_t j = 0; j < n; ++j) std::memcpy(X + j * H, xp + int64_t(p[j0 + j] / row_div) * H, size_t(H) * 4);
    cpu::matmul(X, n, H, w.gate, G, pool, weights_stream_);
    cpu::matmul(X, n, H, w.up, U, pool, weights_stream_);
    for (int64_t i = 0; i < n * I; ++i) G[i] = silu(G[i]) * U[i];
    cpu::matmul(G, n, I, w.down, X, pool, weights_stream_);  // X is free again: it takes Y
    for (int64_t j = 0; j < n; ++j) std::memcpy(yp + int64_t(p[j0 + j]) * H, X + j * H, size_t(H) * 4);
  };
  if (side_by_side) {
    parallel_workers(&pool_, groups, 1, [&](int worker, int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) run_group(int(g), scratch + worker * per_worker, nullptr);
    });
  } else {
    for (int g = 0; g < groups; ++g) run_group(g, scratch, &pool_);
  }
}

void CpuOps::moe_combine(const Tensor& y, const Tensor& rows, const Tensor& weights, Tensor& out) {
  auto timed = time_op("moe_combine");
  const auto [T, H, M, k] = check_moe_combine(y, rows, weights, out);
  const int32_t* r = nullptr;
  const float* wp = f32(weights);
  if (rows.defined()) {
    r = i32(rows);
    for (int64_t i = 0; i < T * k; ++i)
      check(wp[i] == 0.0f || (r[i] >= 0 && r[i] < M), "moe_combine: rows[{}] = {} not in [0, {})", i, r[i], M);
  }
  const float* yp = f32(y);
  float* op = f32_mut(out);
  parallel(&pool_, T, 4, [&, H = H, k = k](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* o = op + t * H;
      for (int64_t j = 0; j < k; ++j) {
        const float wj = wp[t * k + j];
        if (wj == 0.0f) continue;
        const float* yr = yp + (r ? int64_t(r[t * k + j]) : t * k + j) * H;
        for (int64_t i = 0; i < H; ++i) o[i] += wj * yr[i];
      }
    }
  });
}

void CpuOps::gather_routed(std::span<const RoutedRows> sources, int me, Tensor& out, Tensor& recv_counts) {
  auto timed = time_op("gather_routed");
  const size_t row = size_t(check_gather_routed(sources, me, out, recv_counts));
  // Every source's span (rows skipped, rows sent to `me`) checked before any row moves.
  struct Span {
    int64_t skip = 0, n = 0;
  };
  std::vector<Span> spans(sources.size());
  int64_t at = 0;
  for (size_t s = 0; s < sources.size(); ++s) {
    const int32_t* c = i32(sources[s].counts);
    Span& sp = spans[s];
    for (int d = 0; d < me; ++d) sp.skip += c[d];
    sp.n = c[me];
    const int64_t held = sources[s].rows.dim(0);
    check(sp.n >= 0 && sp.skip >= 0 && sp.skip + sp.n <= held,
          "gather_routed: source {}'s counts reach row {}, past the {} rows it holds", s, sp.skip + sp.n, held);
    at += sp.n;
    check(at <= out.dim(0), "gather_routed: the rows from source {} reach row {} of out, which holds {}", s, at,
          out.dim(0));
  }
  auto* dst = static_cast<std::byte*>(out.raw());
  int32_t* rc = i32_mut(recv_counts);
  for (size_t s = 0; s < sources.size(); ++s) {
    const auto* src = static_cast<const std::byte*>(sources[s].rows.raw());
    const size_t bytes = size_t(spans[s].n) * row;
    if (bytes > 0) std::memmove(dst, src + size_t(spans[s].skip) * row, bytes);
    dst += bytes;
    rc[s] = int32_t(spans[s].n);
  }
}

}  // namespace ballast::kernels

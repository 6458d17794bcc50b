#pragma once
// Support of cuda_moe.cu (internal to ballast_kernels_cuda): the faults MoE kernels report, and the
// balanced dispatch of one MoE layer as the work of one thread block.
//
// Balanced dispatch (the device form of cpu_moe.cpp's dispatch_balanced over
// eplb::dispatch_balanced): every slot's quota is the exact split of eplb::dispatch_balanced
// (binary search on the largest rank load, feasibility by Dinic's max-flow from experts to the
// ranks holding them, the final split taken from a fresh Dinic run at the optimum built and
// searched in the CPU's edge order, so that the split is the CPU's to the token); quotas are
// handed to source ranks (own replicas first, then in rank and slot order) and each expert's tokens
// of this rank go to this rank's shares in token order.
//
// The code is plain C++ over a block context `Ctx` (thread index, block size, barrier, atomics,
// fault report): cuda_moe.cu runs it as one CUDA block; a host test can run it on host threads.
// Without nvcc this header needs nothing from CUDA.
#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define BALLAST_MOE_HD __host__ __device__ __forceinline__
#define BALLAST_MOE_DEV __device__ __forceinline__
#else
#define BALLAST_MOE_HD inline
#define BALLAST_MOE_DEV inline
#endif

namespace ballast::kernels::cuda::moe {

// What a kernel found wrong in index data it was given (it skipped the entry instead of writing
// through it). The first fault of a backend is kept (Fault in mapped host memory) and thrown by the
// next MoE op on the host (cuda_moe.cu says when).
enum FaultCode : int {
  kNoFault = 0,
  kHistogramKey,         // a = i, b = key, c = bins
  kDispatchId,           // a = i, b = id, c = E
  kDispatchReplicaCount, // a = e, b = count, c = Rmax
  kDispatchPlacement,    // a = slot, b = expert, c = E
  kDispatchNoReplica,    // a = e
  kDispatchCounts,       // a = index (-1: the total), b = value, c = limit
  kDispatchOverflow,     // a = rank, b = e, c = counts_by_rank[rank][e]
  kDispatchUnassigned,   // a = tokens, b = e, c = rank
  kDispatchInternal,     // a = flow, b = needed, c = max load
  kGroupByValid,         // a = n, b = N
  kExpertsOffsets,       // a = g, b = offsets[g], c = offsets[g + 1]
  kExpertsPerm,          // a = j, b = perm[j]
  kExpertsNoWeights,     // a = g, b = rows
  kCombineRow,           // a = t*k + j, b = row, c = rows of y
  kRoutedSource,         // a = source, b = first row past its span, c = rows it holds
  kRoutedOut,            // a = source, b = first row past its span in out, c = rows of out
  kOnePassId,            // a = t*k + j, b = id, c = E
  kOnePassNoWeights,     // a = t*k + j, b = id
};

struct Fault {
  int claim;  // taken by the first reporter
  int code;   // written last, once a, b, c are in place
  long long a, b, c;
};

namespace balanced {

struct Args {
  const int32_t* phy2log;  // [P]
  const int32_t* counts;   // [G, E]
  const int32_t* ids;      // [N]
  int32_t* slots;          // [N]
  int64_t N;
  int E, P, G, K, rank;
};

// Bounds of the flow graph: forward edges (expert -> source, expert -> rank, rank -> sink) and nodes.
BALLAST_MOE_HD int64_t max_edges(int E, int P, int G) { return int64_t(E) + P + G; }
BALLAST_MOE_HD int64_t max_nodes(int E, int G) { return int64_t(E) + G + 2; }

BALLAST_MOE_HD size_t align_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

// Global scratch, from E, P and G only.
struct Global {
  int32_t *rep_cnt, *rep_start, *rep_slots, *nranks, *fidx, *ebase, *flex_e, *order;
  int32_t *erank, *eslot_b, *eslot_e, *ecap, *flow0;  // per forward edge
  int32_t *need, *share_slot, *share_take, *nshare, *running;
  long long *total, *quota;
};

// Lays Global out from `base` (nullptr: only the size); returns the bytes it takes.
BALLAST_MOE_HD size_t global_layout(void* base, int E, int P, int G, Global* out) {
  const size_t Mf = size_t(max_edges(E, P, G));
  size_t off = 0;
  char* b = static_cast<char*>(base);
  auto take = [&](size_t bytes) -> void* {
    off = align_up(off, 256);
    void* p = b ? b + off : nullptr;
    off += bytes;
    return p;
  };
  Global g;
  g.total = static_cast<long long*>(take(8 * size_t(E)));
  g.quota = static_cast<long long*>(take(8 * size_t(P)));
  g.rep_cnt = static_cast<int32_t*>(take(4 * size_t(E)));
  g.rep_start = static_cast<int32_t*>(take(4 * (size_t(E) + 1)));
  g.rep_slots = static_cast<int32_t*>(take(4 * size_t(P)));
  g.nranks = static_cast<int32_t*>(take(4 * size_t(E)));
  g.fidx = static_cast<int32_t*>(take(4 * size_t(E)));
  g.ebase = static_cast<int32_t*>(take(4 * size_t(E)));
  g.flex_e = static_cast<int32_t*>(take(4 * size_t(E)));
  g.order = static_cast<int32_t*>(take(4 * size_t(E)));
  g.erank = static_cast<int32_t*>(take(4 * Mf));
  g.eslot_b = static_cast<int32_t*>(take(4 * Mf));
  g.eslot_e = static_cast<int32_t*>(take(4 * Mf));
  g.ecap = static_cast<int32_t*>(take(4 * Mf));
  g.flow0 = static_cast<int32_t*>(take(4 * Mf));
  g.need = static_cast<int32_t*>(take(4 * size_t(E) * size_t(G)));
  g.share_slot = static_cast<int32_t*>(take(4 * 2 * size_t(P)));
  g.share_take = static_cast<int32_t*>(take(4 * 2 * size_t(P)));
  g.nshare = static_cast<int32_t*>(take(4 * size_t(E)));
  g.running = static_cast<int32_t*>(take(4 * size_t(E)));
  if (out) *out = g;
  return align_up(off, 256);
}

struct Scalars {
  long long lo, hi, need, flow0, pushed;
  unsigned long long total;
  int bad, changed, scan_total, pad;
};

// Shared memory of the block: the flow graph (residual capacities, adjacency in the CPU's edge
// order), the rank loads, a scan buffer of one int per thread.
struct Shared {
  Scalars* sc;
  long long *base, *gload;
  int *to, *cap, *adj, *adj_start, *level, *it, *stack, *pedge, *rs, *scan;
};

BALLAST_MOE_HD size_t shared_layout(void* base, int E, int P, int G, int threads, Shared* out) {
  const size_t Mf = size_t(max_edges(E, P, G)), V = size_t(max_nodes(E, G));
  size_t off = 0;
  char* b = static_cast<char*>(base);
  auto take = [&](size_t bytes) -> void* {
    off = align_up(off, 16);
    void* p = b ? b + off : nullptr;
    off += bytes;
    return p;
  };
  Shared s;
  s.sc = static_cast<Scalars*>(take(sizeof(Scalars)));
  s.base = static_cast<long long*>(take(8 * size_t(G)));
  s.gload = static_cast<long long*>(take(8 * size_t(G)));
  s.to = static_cast<int*>(take(4 * 2 * Mf));
  s.cap = static_cast<int*>(take(4 * 2 * Mf));
  s.adj = static_cast<int*>(take(4 * 2 * Mf));
  s.adj_start = static_cast<int*>(take(4 * (V + 1)));
  s.level = static_cast<int*>(take(4 * V));
  s.it = static_cast<int*>(take(4 * V));
  s.stack = static_cast<int*>(take(4 * (V + 1)));
  s.pedge = static_cast<int*>(take(4 * V));
  s.rs = static_cast<int*>(take(4 * size_t(G)));
  s.scan = static_cast<int*>(take(4 * size_t(threads)));
  if (out) *out = s;
  return align_up(off, 16);
}

template <typename T>
BALLAST_MOE_DEV T min_(T a, T b) { return b < a ? b : a; }
template <typename T>
BALLAST_MOE_DEV T max_(T a, T b) { return a < b ? b : a; }

// Exclusive prefix sums of get(0 .. n-1) handed to put(i, sum); returns the total (in every thread).
template <class Ctx, class Get, class Put>
BALLAST_MOE_DEV int block_scan(Ctx& c, const Shared& s, int n, Get get, Put put) {
  const int tid = c.tid(), nt = c.nt();
  int carry = 0;
  for (int b = 0; b < n; b += nt) {
    const int i = b + tid;
    s.scan[tid] = i < n ? get(i) : 0;
    c.sync();
    if (tid == 0) {
      int run = 0;
      for (int t = 0; t < nt; ++t) {
        const int v = s.scan[t];
        s.scan[t] = run;
        run += v;
      }
      s.sc->scan_total = run;
    }
    c.sync();
    if (i < n) put(i, carry + s.scan[tid]);
    carry += s.sc->scan_total;
    c.sync();
  }
  return carry;
}

// One Dinic phase's blocking flow by one thread: the CPU's recursive dfs, unrolled onto a stack.
// An edge is taken while it has capacity and leads one level down; a dead end advances its
// parent's edge cursor; a path reaching the sink is augmented by its bottleneck and the search
// starts again from the source with the cursors kept (as each recursive call returns at once).
BALLAST_MOE_DEV long long blocking_flow(const Shared& s, int V) {
  const int src = 0, sink = V - 1;
  long long total = 0;
  int depth = 0;
  s.stack[0] = src;
  while (true) {
    const int u = s.stack[depth];
    if (u == sink) {
      int f = 0x7fffffff;
      for (int d = 0; d < depth; ++d) f = min_(f, s.cap[s.pedge[d]]);
      for (int d = 0; d < depth; ++d) {
        s.cap[s.pedge[d]] -= f;
        s.cap[s.pedge[d] ^ 1] += f;
      }
      total += f;
      depth = 0;
      continue;
    }
    const int end = s.adj_start[u + 1], want = s.level[u] + 1;
    int q = s.it[u];
    for (; q < end; ++q) {
      const int e = s.adj[q];
      if (s.cap[e] > 0 && s.level[s.to[e]] == want) break;
    }
    s.it[u] = q;
    if (q < end) {
      const int e = s.adj[q];
      s.pedge[depth] = e;
      s.stack[++depth] = s.to[e];
    } else {
      if (depth == 0) break;
      --depth;
      ++s.it[s.stack[depth]];
    }
  }
  return total;
}

// Dinic's max-flow over the graph in `s` from its residual capacities: level graphs by a
// block-parallel BFS (levels are distances: the order of discovery does not matter; it stops at
// the sink's level, past which nothing reaches the sink), blocking flows by thread 0. Returns the
// flow pushed (in every thread).
template <class Ctx>
BALLAST_MOE_DEV long long max_flow(Ctx& c, const Shared& s, int V) {
  const int tid = c.tid(), nt = c.nt(), sink = V - 1;
  long long pushed = 0;
  while (true) {
    for (int v = tid; v < V; v += nt) s.level[v] = v == 0 ? 0 : -1;
    c.sync();
    for (int cur = 0;; ++cur) {
      if (tid == 0) s.sc->changed = 0;
      c.sync();
      for (int v = tid; v < V; v += nt) {
        if (s.level[v] != cur) continue;
        for (int q = s.adj_start[v]; q < s.adj_start[v + 1]; ++q) {
          const int e = s.adj[q];
          // Several threads may reach one node: one claims it (the level is the same either way).
          if (s.cap[e] > 0 && c.atomic_cas(&s.level[s.to[e]], -1, cur + 1) == -1) c.atomic_cas(&s.sc->changed, 0, 1);
        }
      }
      c.sync();
      const bool more = s.sc->changed != 0 && s.level[sink] < 0;
      c.sync();
      if (!more) break;
    }
    if (s.level[sink] < 0) break;
    for (int v = tid; v < V; v += nt) s.it[v] = s.adj_start[v];
    c.sync();
    if (tid == 0) pushed += blocking_flow(s, V);
    c.sync();
  }
  if (tid == 0) s.sc->pushed = pushed;
  c.sync();
  const long long result = s.sc->pushed;
  c.sync();
  return result;
}

// Residual capacities for max load T: expert edges carry their expert's tokens, rank r's sink
// edge T - base[r] (an edge the CPU leaves out when T <= base[r] has capacity 0: the same search).
// `warm`: start from the flow in g.flow0 (a flow of a smaller T, still a flow at T).
template <class Ctx>
BALLAST_MOE_DEV void set_caps(Ctx& c, const Shared& s, const Global& g, int Msink, int G, long long T, bool warm) {
  for (int m = c.tid(); m < Msink + G; m += c.nt()) {
    long long cp;
    if (m < Msink) {
      cp = g.ecap[m];
    } else {
      const long long b = s.base[m - Msink];
      cp = T > b ? T - b : 0;
    }
    const int fl = warm ? g.flow0[m] : 0;
    s.cap[2 * m] = int(cp) - fl;
    s.cap[2 * m + 1] = fl;
  }
}

template <class Ctx>
BALLAST_MOE_DEV void fail_all(Ctx& c, const Args& a) {
  for (int64_t i = c.tid(); i < a.N; i += c.nt()) a.slots[i] = -1;
}

template <class Ctx>
BALLAST_MOE_DEV void run(Ctx& c, const Args& a, const Global& g, const Shared& s) {
  const int tid = c.tid(), nt = c.nt();
  const int E = a.E, P = a.P, G = a.G, K = a.K;
  Scalars& sc = *s.sc;

  // 1. Replicas of each expert (slots ascending), with the placement and the counts checked.
  if (tid == 0) {
    sc.bad = 0;
    sc.total = 0;
    sc.need = 0;
  }
  for (int e = tid; e < E; e += nt) {
    g.rep_cnt[e] = 0;
    g.running[e] = 0;
  }
  for (int r = tid; r < G; r += nt) s.base[r] = 0;
  c.sync();
  for (int p = tid; p < P; p += nt) {
    const int e = a.phy2log[p];
    if (e < 0 || e >= E) {
      c.report(kDispatchPlacement, p, e, E);
      sc.bad = 1;
    } else {
      c.atomic_add(&g.rep_cnt[e], 1);
    }
  }
  for (int64_t q = tid; q < int64_t(G) * E; q += nt)
    if (a.counts[q] < 0) {
      c.report(kDispatchCounts, q, a.counts[q], 0);
      sc.bad = 1;
    }
  c.sync();
  for (int e = tid; e < E; e += nt)
    if (g.rep_cnt[e] == 0) {
      c.report(kDispatchNoReplica, e, 0, 0);
      sc.bad = 1;
    }
  c.sync();
  if (sc.bad) {
    fail_all(c, a);
    return;
  }
  block_scan(c, s, E, [&](int e) { return g.rep_cnt[e]; }, [&](int e, int v) { g.rep_start[e] = v; });
  if (tid == 0) g.rep_start[E] = P;
  c.sync();
  for (int e = tid; e < E; e += nt) {
    int q = g.rep_start[e];
    for (int p = 0; p < P; ++p)
      if (a.phy2log[p] == e) g.rep_slots[q++] = p;
  }
  c.sync();

  // 2. Each expert's tokens over all ranks; experts on one rank (or without tokens) split evenly
  //    over that rank's replicas and add to its base load; the others are flexible.
  for (int e = tid; e < E; e += nt) {
    long long n = 0;
    for (int r = 0; r < G; ++r) n += a.counts[int64_t(r) * E + e];
    g.total[e] = n;
    c.atomic_add_u64(&sc.total, (unsigned long long)n);
    const int b = g.rep_start[e], en = g.rep_start[e + 1];
    int nr = 0, prev = -1;
    for (int q = b; q < en; ++q) {
      const int r = g.rep_slots[q] / K;
      if (r != prev) ++nr, prev = r;
      g.quota[g.rep_slots[q]] = 0;
    }
    g.nranks[e] = nr;
    const bool flex = nr > 1 && n > 0;
    g.fidx[e] = flex ? 1 : 0;
    if (!flex) {
      const int r0 = g.rep_slots[b] / K;
      int q1 = b;
      while (q1 < en && g.rep_slots[q1] / K == r0) ++q1;
      const long long k = q1 - b, qq = n / k, rr = n % k;
      for (int q = b; q < q1; ++q) g.quota[g.rep_slots[q]] = qq + (q - b < rr ? 1 : 0);
      c.atomic_add_u64(reinterpret_cast<unsigned long long*>(&s.base[r0]), (unsigned long long)n);
    }
  }
  c.sync();
  if (sc.total > 0x7fffffffull) {
    if (tid == 0) c.report(kDispatchCounts, -1, (long long)sc.total, 0x7fffffffll);
    fail_all(c, a);
    return;
  }
  const long long total = (long long)sc.total;

  // 3. The flexible experts in expert order, and the first forward edge of each (its source edge,
  //    then one edge per rank holding it): the CPU's insertion order.
  const int F = block_scan(
      c, s, E, [&](int e) { return g.fidx[e]; }, [&](int e, int v) { g.fidx[e] = g.fidx[e] ? v : -1; });
  const int Msink = block_scan(
      c, s, E, [&](int e) { return g.fidx[e] >= 0 ? 1 + g.nranks[e] : 0; }, [&](int e, int v) { g.ebase[e] = v; });
  for (int e = tid; e < E; e += nt)
    if (g.fidx[e] >= 0) g.flex_e[g.fidx[e]] = e;
  c.sync();

  if (F > 0) {
    // 4. The flow graph: nodes source 0, experts 1..F, ranks F+1..F+G, sink F+G+1; forward edge
    //    m is 2m, its reverse 2m+1; each node's adjacency in edge-id order (the CPU's push order).
    const int V = F + G + 2, sink = V - 1;
    for (int i = tid; i < F; i += nt) {
      const int e = g.flex_e[i], m = g.ebase[e];
      const int n = int(g.total[e]);
      s.to[2 * m] = 1 + i;
      s.to[2 * m + 1] = 0;
      g.erank[m] = -1;
      g.ecap[m] = n;
      s.adj[i] = 2 * m;
      s.adj_start[1 + i] = F + m;
      s.adj[F + m] = 2 * m + 1;
      const int b = g.rep_start[e], en = g.rep_start[e + 1];
      int j = 0;
      for (int q = b; q < en;) {
        const int r = g.rep_slots[q] / K;
        int q1 = q;
        while (q1 < en && g.rep_slots[q1] / K == r) ++q1;
        const int mm = m + 1 + j;
        s.to[2 * mm] = 1 + F + r;
        s.to[2 * mm + 1] = 1 + i;
        g.erank[mm] = r;
        g.eslot_b[mm] = q;
        g.eslot_e[mm] = q1;
        g.ecap[mm] = n;
        s.adj[F + mm] = 2 * mm;
        ++j;
        q = q1;
      }
      c.atomic_add_u64(reinterpret_cast<unsigned long long*>(&sc.need), (unsigned long long)n);
    }
    for (int r = tid; r < G; r += nt) {
      const int mm = Msink + r;
      s.to[2 * mm] = sink;
      s.to[2 * mm + 1] = 1 + F + r;
      g.erank[mm] = -2;
      g.ecap[mm] = 0;
    }
    if (tid == 0) s.adj_start[0] = 0;
    c.sync();
    for (int r = tid; r < G; r += nt) {
      int d = 1;
      for (int m = 0; m < Msink; ++m) d += g.erank[m] == r;
      s.rs[r] = d;
    }
    c.sync();
    if (tid == 0) {
      int o = F + Msink;
      for (int r = 0; r < G; ++r) {
        s.adj_start[1 + F + r] = o;
        o += s.rs[r];
      }
      s.adj_start[sink] = o;
      s.adj_start[V] = o + G;
    }
    c.sync();
    for (int r = tid; r < G; r += nt) {
      int q = s.adj_start[1 + F + r];
      for (int m = 0; m < Msink; ++m)
        if (g.erank[m] == r) s.adj[q++] = 2 * m + 1;
      s.adj[q] = 2 * (Msink + r);
      s.adj[s.adj_start[sink] + r] = 2 * (Msink + r) + 1;
    }
    // The greedy's order: by decreasing tokens, ties in flexible order (a stable sort).
    for (int i = tid; i < F; i += nt) {
      const long long ni = g.total[g.flex_e[i]];
      int pos = 0;
      for (int j = 0; j < F; ++j) {
        const long long nj = g.total[g.flex_e[j]];
        pos += (nj > ni) || (nj == ni && j < i);
      }
      g.order[pos] = i;
    }
    c.sync();

    // 5. Bounds on the largest rank load: the lower bound, and the greedy water-filling's load.
    if (tid == 0) {
      long long mb = 0;
      for (int r = 0; r < G; ++r) {
        mb = max_(mb, s.base[r]);
        s.gload[r] = s.base[r];
      }
      sc.lo = max_(mb, (total + G - 1) / G);
      for (int pos = 0; pos < F; ++pos) {
        const int e = g.flex_e[g.order[pos]], m = g.ebase[e], nr = g.nranks[e];
        int* rs = s.rs;
        for (int j = 0; j < nr; ++j) rs[j] = g.erank[m + 1 + j];
        // Ranks by (load, rank): insertion sort.
        for (int j = 1; j < nr; ++j) {
          const int v = rs[j];
          int q = j;
          while (q > 0 && (s.gload[rs[q - 1]] > s.gload[v] || (s.gload[rs[q - 1]] == s.gload[v] && rs[q - 1] > v))) {
            rs[q] = rs[q - 1];
            --q;
          }
          rs[q] = v;
        }
        long long rem = g.total[e];
        int k = 1;
        while (rem > 0) {
          const long long next = k < nr ? s.gload[rs[k]] : 0x7fffffffffffffffll;
          const long long need = k < nr ? (next - s.gload[rs[0]]) * (long long)k : rem + 1;
          if (need <= rem && k < nr) {
            for (int j = 0; j < k; ++j) {
              rem -= next - s.gload[rs[j]];
              s.gload[rs[j]] = next;
            }
            ++k;
          } else {
            const long long qq = rem / k, rr = rem % k;
            for (int j = 0; j < k; ++j) s.gload[rs[j]] += qq + (j < rr ? 1 : 0);
            rem = 0;
          }
        }
      }
      long long hi = 0;
      for (int r = 0; r < G; ++r) hi = max_(hi, s.gload[r]);
      sc.hi = hi;
      sc.flow0 = 0;
    }
    for (int m = tid; m < Msink + G; m += nt) g.flow0[m] = 0;
    c.sync();

    // 6. Binary search on the largest load. A test at T starts from the flow of the largest T
    //    found infeasible so far (any later T is larger): feasibility does not depend on the flow
    //    one starts from.
    while (true) {
      const long long lo = sc.lo, hi = sc.hi;
      if (lo >= hi) break;
      const long long T = lo + (hi - lo) / 2;
      set_caps(c, s, g, Msink, G, T, true);
      c.sync();
      const long long f = sc.flow0 + max_flow(c, s, V);
      const bool ok = f == sc.need;
      if (!ok)
        for (int m = tid; m < Msink + G; m += nt) g.flow0[m] = s.cap[2 * m + 1];
      c.sync();
      if (tid == 0) {
        if (ok) {
          sc.hi = T;
        } else {
          sc.lo = T + 1;
          sc.flow0 = f;
        }
      }
      c.sync();
    }
    // The split: a fresh max-flow at the optimum, as the CPU's.
    const long long best = sc.hi;
    set_caps(c, s, g, Msink, G, best, false);
    c.sync();
    const long long f = max_flow(c, s, V);
    if (f != sc.need) {
      if (tid == 0) c.report(kDispatchInternal, f, sc.need, best);
      fail_all(c, a);
      return;
    }
    for (int i = tid; i < F; i += nt) {
      const int e = g.flex_e[i], m = g.ebase[e], nr = g.nranks[e];
      for (int j = 0; j < nr; ++j) {
        const int mm = m + 1 + j;
        const long long fl = s.cap[2 * mm + 1];
        const int b = g.eslot_b[mm], k = g.eslot_e[mm] - b;
        const long long qq = fl / k, rr = fl % k;
        for (int t = 0; t < k; ++t) g.quota[g.rep_slots[b + t]] += qq + (t < rr ? 1 : 0);
      }
    }
    c.sync();
  }

  // 7. Quotas to source ranks: own replicas first, then every rank in order over the replicas in
  //    slot order; this rank's shares kept in hand-out order.
  for (int e = tid; e < E; e += nt) {
    const int b = g.rep_start[e], en = g.rep_start[e + 1], sb = 2 * b;
    int32_t* need = g.need + int64_t(e) * G;
    for (int r = 0; r < G; ++r) need[r] = a.counts[int64_t(r) * E + e];
    int ns = 0;
    auto give = [&](int r, int slot) {
      const long long take = min_((long long)need[r], g.quota[slot]);
      if (take <= 0) return;
      need[r] -= int(take);
      g.quota[slot] -= take;
      if (r == a.rank) {
        g.share_slot[sb + ns] = slot;
        g.share_take[sb + ns] = int(take);
        ++ns;
      }
    };
    for (int q = b; q < en; ++q) give(g.rep_slots[q] / K, g.rep_slots[q]);
    for (int r = 0; r < G; ++r)
      for (int q = b; q < en; ++q) give(r, g.rep_slots[q]);
    g.nshare[e] = ns;
    if (need[a.rank] != 0) c.report(kDispatchUnassigned, need[a.rank], e, a.rank);
  }
  // Ids outside [0, E): no slot (ids < 0 are choices of no expert, the others faults).
  for (int64_t i = tid; i < a.N; i += nt) {
    const int e = a.ids[i];
    if (e >= E) c.report(kDispatchId, i, e, E);
    if (e < 0 || e >= E) a.slots[i] = -1;
  }
  c.sync();

  // 8. This rank's tokens of each expert to its shares in token order: one thread per expert
  //    walks the ids (staged through shared memory a block at a time).
  for (int64_t c0 = 0; c0 < a.N; c0 += nt) {
    s.scan[tid] = c0 + tid < a.N ? a.ids[c0 + tid] : -1;
    c.sync();
    const int cn = int(min_<int64_t>(nt, a.N - c0));
    for (int e = tid; e < E; e += nt) {
      int used = g.running[e];
      const int b = 2 * g.rep_start[e], ns = g.nshare[e];
      for (int t = 0; t < cn; ++t) {
        if (s.scan[t] != e) continue;
        int slot = -1, cum = 0;
        for (int q = 0; q < ns; ++q) {
          cum += g.share_take[b + q];
          if (used < cum) {
            slot = g.share_slot[b + q];
            break;
          }
        }
        if (slot < 0) c.report(kDispatchOverflow, a.rank, e, a.counts[int64_t(a.rank) * E + e]);
        a.slots[c0 + t] = slot;
        ++used;
      }
      g.running[e] = used;
    }
    c.sync();
  }
}

}  // namespace balanced
}  // namespace ballast::kernels::cuda::moe

#pragma once
// What every DataPlane must do, as checks run by every rank (each rank calls the same function,
// in the same order). Used by test_dist (threads), test_dist_mpi (processes) and test_dist_nccl
// (GPUs). Every check builds its buffers on the host and hands the plane copies in its memory
// (Memory: the host tensors themselves for host planes, device copies for NCCL), then reads the
// results back.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "ballast/core/error.h"
#include "ballast/core/tensor.h"
#include "ballast/dist/data_plane.h"

namespace ballast::dist::data_plane_conformance {

using Transfer = DataPlane::Transfer;

// Element i of what src sends dst under `key`; under 2^23, so exact as F32 too.
inline int32_t value(int src, int dst, int key, int64_t i) {
  return int32_t((int64_t(src) * 1000003 + int64_t(dst) * 7919 + int64_t(key) * 104729 + i * 31 + (i >> 7)) &
                 0x7fffff);
}

constexpr int32_t kUntouched = -7;  // what recv rows and slots hold before a call that must not write them

// Element i of a 4-byte tensor (I32 or F32) as an integer.
inline int32_t get(const Tensor& t, int64_t i) {
  return t.dtype() == DType::F32 ? int32_t(t.data<float>()[i]) : t.data<int32_t>()[i];
}
inline void set(const Tensor& t, int64_t i, int32_t v) {
  if (t.dtype() == DType::F32) t.data<float>()[i] = float(v);
  else t.data<int32_t>()[i] = v;
}

// Elements [first, first + n) of t hold value(src, dst, key, 0..n).
inline void fill(const Tensor& t, int64_t first, int64_t n, int src, int dst, int key) {
  for (int64_t i = 0; i < n; ++i) set(t, first + i, value(src, dst, key, i));
}
// Compares without one gtest failure per element.
inline bool holds(const Tensor& t, int64_t first, int64_t n, int src, int dst, int key) {
  for (int64_t i = 0; i < n; ++i)
    if (get(t, first + i) != value(src, dst, key, i)) return false;
  return true;
}
inline bool untouched(const Tensor& t, int64_t first, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (get(t, first + i) != kUntouched) return false;
  return true;
}
inline Tensor full(std::vector<int64_t> shape, DType dtype, int32_t v) {
  Tensor t = Tensor::zeros(std::move(shape), dtype);
  for (int64_t i = 0; i < t.numel(); ++i) set(t, i, v);
  return t;
}

// Where a plane's buffers live. put: a tensor in that memory holding host's bytes; get: a host
// tensor holding t's bytes; overwrite (optional): kUntouched written over t as the rank's next
// work would write it (a device queue's), where the host does not write that memory at once.
// graph: the ranks' queues record a graph, so the counts stay on the device: recv must hold every
// row its sources hold, the plane knows only that bound, and sums (through the host) are refused.
struct Memory {
  Device device = Device::CPU;
  std::function<Tensor(const Tensor& host)> put;
  std::function<Tensor(const Tensor& t)> get;
  std::function<void(const Tensor& t)> overwrite;
  bool graph = false;
};
inline Memory host_memory() {
  return {Device::CPU, [](const Tensor& t) { return t; }, [](const Tensor& t) { return t; }};
}

inline Tensor counts_tensor(const std::vector<int64_t>& counts) {
  Tensor t = Tensor::zeros({int64_t(counts.size())}, DType::I32);
  for (size_t g = 0; g < counts.size(); ++g) t.data<int32_t>()[g] = int32_t(counts[g]);
  return t;
}

// One all_to_all_v where src sends rows(src, dst) rows of `row` (elements after the first
// dimension) of dtype to dst, checked on this rank: rows by source rank, counts, the rows of
// recv beyond them (`extra_recv`) untouched; send holds `extra_send` rows beyond the counts.
// along: through all_to_all_v_along with those routes (the caller keeps the promise). In a graph,
// recv has room for every row the sources hold (along `back`: for what this rank sent, which the
// caller's extra_recv covers).
inline void one_all_to_all_v(DataPlane& d, const Memory& m, const std::function<int64_t(int, int)>& rows, DType dtype,
                             std::vector<int64_t> row, int key, int64_t extra_send = 0, int64_t extra_recv = 0,
                             const DataPlane::Routes* along = nullptr) {
  const int G = d.size(), me = d.rank();
  int64_t width = 1;
  for (auto n : row) width *= n;
  std::vector<int64_t> out(G), in(G);
  int64_t total_out = 0, total_in = 0;
  for (int g = 0; g < G; ++g) {
    out[g] = rows(me, g);
    in[g] = rows(g, me);
    total_out += out[g];
    total_in += in[g];
  }
  auto shape = [&](int64_t n) {
    std::vector<int64_t> s{n};
    s.insert(s.end(), row.begin(), row.end());
    return s;
  };
  Tensor send = full(shape(total_out + extra_send), dtype, kUntouched);
  int64_t at = 0;
  for (int g = 0; g < G; ++g) {
    fill(send, at * width, out[g] * width, me, g, key);
    at += out[g];
  }
  int64_t room = total_in;
  if (m.graph && !(along && *along == DataPlane::Routes::back)) {
    room = 0;
    for (int s = 0; s < G; ++s)
      for (int t = 0; t < G; ++t) room += rows(s, t) + (t == 0 ? extra_send : 0);
  }
  Tensor recv = m.put(full(shape(room + extra_recv), dtype, kUntouched));
  Tensor recv_counts = m.put(full({G}, DType::I32, -1));
  const Tensor sent = m.put(send);
  if (along)
    d.all_to_all_v_along(*along, sent, m.put(counts_tensor(out)), recv, recv_counts);
  else
    d.all_to_all_v(sent, m.put(counts_tensor(out)), recv, recv_counts);
  // The sender may reuse its buffer once the call returns: overwritten at once (host memory, or
  // by the rank's queue where the memory has one).
  if (m.overwrite)
    m.overwrite(sent);
  else if (m.device == Device::CPU)
    for (int64_t i = 0; i < sent.numel(); ++i) set(sent, i, kUntouched);
  recv = m.get(recv);
  recv_counts = m.get(recv_counts);
  at = 0;
  int64_t counted = 0;
  for (int src = 0; src < G; ++src) {
    EXPECT_EQ(recv_counts.data<int32_t>()[src], in[src]) << "key " << key << " rows from " << src << " to " << me;
    counted += recv_counts.data<int32_t>()[src];
    EXPECT_TRUE(holds(recv, at * width, in[src] * width, src, me, key))
        << "key " << key << ": " << in[src] << " rows of " << width << " from " << src << " to " << me;
    at += in[src];
  }
  EXPECT_EQ(counted, total_in);
  // Host planes report what arrived (expert parallelism sizes its row buffers by it); in a graph
  // the bound recv was checked against.
  if (m.graph) {
    EXPECT_GE(d.received_rows_at_most(), total_in) << "key " << key;
    EXPECT_LE(d.received_rows_at_most(), room + extra_recv) << "key " << key;
  } else {
    EXPECT_EQ(d.received_rows_at_most(), total_in) << "key " << key;
  }
  EXPECT_TRUE(untouched(recv, total_in * width, (room - total_in + extra_recv) * width))
      << "key " << key << ": recv beyond the rows";
  if (m.graph) return;

  // Counts sum to the same over all ranks, sent and received.
  Tensor totals = Tensor::zeros({2}, DType::I64);
  totals.data<int64_t>()[0] = total_out;
  totals.data<int64_t>()[1] = total_in;
  totals = m.put(totals);
  d.all_reduce_sum(totals);
  totals = m.get(totals);
  EXPECT_EQ(totals.data<int64_t>()[0], totals.data<int64_t>()[1]) << "key " << key;
}

// Sizes vary with the pair and the round, and include all-empty rounds and a large sparse one;
// rows of F32 and I32 of several widths and ranks; recv larger than needed, send too.
inline void all_to_all_v(DataPlane& d, int rounds = 12, const Memory& m = host_memory()) {
  const int G = d.size();
  struct Rows {
    DType dtype;
    std::vector<int64_t> row;
  };
  const std::vector<Rows> kinds = {{DType::F32, {3}}, {DType::I32, {1}}, {DType::F32, {64}}, {DType::I32, {5}},
                                   {DType::F32, {2, 3}}, {DType::I32, {}}};
  for (int round = 0; round < rounds; ++round) {
    if (round == 0) {  // all empty
      one_all_to_all_v(d, m, [](int, int) { return int64_t(0); }, DType::F32, {4}, round);
    } else if (round == 1) {  // one large transfer per rank (> 1 MiB), the rest empty
      one_all_to_all_v(
          d, m, [&](int s, int t) { return (s + 1) % G == t ? int64_t(4099) : int64_t(0); }, DType::F32, {64}, round);
    } else {
      const Rows& k = kinds[round % kinds.size()];
      one_all_to_all_v(
          d, m, [&](int s, int t) { return int64_t((s * 7 + t * 3 + round) % 5) * (round % 3 + 1); }, k.dtype, k.row,
          round, round % 2, round % 3);
    }
  }
}

// Rounds of all_gather: empty, F32, I32 of several shapes, in place (mine is all's own slot).
inline void all_gather(DataPlane& d, const Memory& m = host_memory()) {
  const int G = d.size(), me = d.rank();
  struct Round {
    DType dtype;
    int64_t n;
  };
  const std::vector<Round> rounds = {{DType::F32, 0}, {DType::F32, 7}, {DType::I32, 5000}, {DType::I32, 1}};
  for (size_t k = 0; k < rounds.size(); ++k) {
    const auto [dtype, n] = rounds[k];
    Tensor mine = full({n}, dtype, kUntouched);
    fill(mine, 0, n, me, -1, int(k));
    Tensor all = m.put(full({G, n}, dtype, kUntouched));  // [G, n]: any shape of G * n elements
    d.all_gather(m.put(mine), all);
    all = m.get(all);
    for (int r = 0; r < G; ++r) EXPECT_TRUE(holds(all, r * n, n, r, -1, int(k))) << "round " << k << " rank " << r;
  }
  const int64_t n = 33;
  Tensor all = full({G * n}, DType::F32, kUntouched);
  fill(all, me * n, n, me, -1, 99);
  all = m.put(all);
  Tensor mine = all.rows(me * n, (me + 1) * n);
  d.all_gather(mine, all);
  all = m.get(all);
  for (int r = 0; r < G; ++r) EXPECT_TRUE(holds(all, r * n, n, r, -1, 99)) << "in place, rank " << r;
}

// Every rank holds the same bits of `t` (a host tensor; checked with all_gather).
inline void expect_same_everywhere(DataPlane& d, const Memory& m, const Tensor& t, const std::string& what) {
  const int G = d.size();
  Tensor all = m.put(Tensor::zeros({G, t.numel()}, t.dtype()));
  d.all_gather(m.put(t), all);
  all = m.get(all);
  for (int r = 0; r < G; ++r)
    EXPECT_EQ(std::memcmp(all[r].raw(), t.raw(), t.nbytes()), 0) << what << ": rank " << r << " got other bits";
}

inline void all_reduce(DataPlane& d, const Memory& m = host_memory()) {
  const int G = d.size(), me = d.rank();
  const int64_t ranks = int64_t(G) * (G - 1) / 2;

  Tensor i32 = Tensor::zeros({100}, DType::I32);
  for (int i = 0; i < 100; ++i) i32.data<int32_t>()[i] = 1000 * me + i - 7;
  i32 = m.put(i32);
  d.all_reduce_sum(i32);
  i32 = m.get(i32);
  for (int i = 0; i < 100; ++i) ASSERT_EQ(i32.data<int32_t>()[i], 1000 * ranks + G * (i - 7)) << "I32 i=" << i;

  Tensor i64 = Tensor::zeros({4, 25}, DType::I64);
  for (int i = 0; i < 100; ++i) i64.data<int64_t>()[i] = (int64_t(1) << 40) * me - i;
  i64 = m.put(i64);
  d.all_reduce_sum(i64);
  i64 = m.get(i64);
  for (int i = 0; i < 100; ++i) ASSERT_EQ(i64.data<int64_t>()[i], (int64_t(1) << 40) * ranks - G * i) << "I64 i=" << i;

  Tensor exact = Tensor::zeros({37}, DType::F32);
  for (int i = 0; i < 37; ++i) exact.f32()[i] = 0.5f * float(me) - 0.25f * float(i);
  exact = m.put(exact);
  d.all_reduce_sum(exact);
  exact = m.get(exact);
  for (int i = 0; i < 37; ++i) ASSERT_EQ(exact.f32()[i], 0.5f * float(ranks) - 0.25f * float(G * i)) << "F32 i=" << i;

  Tensor none = m.put(Tensor::zeros({0}, DType::F32));
  d.all_reduce_sum(none);

  // Inexact sums: rank order, and the same bits on every rank.
  auto x = [](int r, int i) { return 0.1f * float(r + 1) + 1e-3f * float(i) + 3e7f * float(r % 2) - 1e-9f * float(r); };
  Tensor sum = Tensor::zeros({50}, DType::F32);
  for (int i = 0; i < 50; ++i) sum.f32()[i] = x(me, i);
  sum = m.put(sum);
  d.all_reduce_sum(sum);
  sum = m.get(sum);
  for (int i = 0; i < 50; ++i) {
    float want = x(0, i);
    for (int r = 1; r < G; ++r) want += x(r, i);
    ASSERT_EQ(std::memcmp(&sum.f32()[i], &want, 4), 0) << "F32 sum in rank order, i=" << i << ": " << sum.f32()[i]
                                                        << " vs " << want;
  }
  expect_same_everywhere(d, m, sum, "F32 sum");
}

// Transfers between every pair (self included), several per pair in both directions, some of
// one size (so only FIFO order tells them apart), some empty, one large; receives are posted in
// another order than sends, interleaved with them. `idle` (if in range) has nothing to do and
// does not call; `key` tells rounds apart.
inline void one_send_recv(DataPlane& d, int idle, int key, const Memory& m) {
  const int G = d.size(), me = d.rank();
  auto n_of = [&](int src, int dst) { return (src == idle || dst == idle) ? 0 : 1 + (src + 2 * dst + key) % 3; };
  auto elems = [&](int src, int dst, int k) -> int64_t {
    if (k == 0 && (src + 1) % G == dst) return 300000;  // 1.2 MB
    if (k == 1) return 64;                             // all of one size
    return ((src * 5 + dst + k) % 4) * 17;             // some empty
  };
  auto dtype = [&](int k) { return k % 2 ? DType::I32 : DType::F32; };
  if (me == idle) return;
  std::vector<Tensor> out, in;
  std::vector<Transfer> sends, recvs;
  struct Want {
    int src, k;
  };
  std::vector<Want> wants;
  for (int k = 0; k < 3; ++k)
    for (int j = 0; j < G; ++j) {
      const int peer = (me + j) % G;
      if (k >= n_of(me, peer)) continue;
      Tensor t = Tensor::zeros({elems(me, peer, k)}, dtype(k));
      fill(t, 0, t.numel(), me, peer, key * 10 + k);
      t = m.put(t);
      out.push_back(t);
      sends.push_back({Transfer::send, peer, t});
    }
  for (int peer = G - 1; peer >= 0; --peer)
    for (int k = 0; k < n_of(peer, me); ++k) {
      Tensor t = m.put(full({elems(peer, me, k)}, dtype(k), kUntouched));
      in.push_back(t);
      recvs.push_back({Transfer::recv, peer, t});
      wants.push_back({peer, k});
    }
  std::vector<Transfer> items;
  for (size_t i = 0; i < std::max(sends.size(), recvs.size()); ++i) {
    if (me % 2 == 1 && i < recvs.size()) items.push_back(recvs[i]);
    if (i < sends.size()) items.push_back(sends[i]);
    if (me % 2 == 0 && i < recvs.size()) items.push_back(recvs[i]);
  }
  d.send_recv(items);
  for (auto& t : in) t = m.get(t);
  for (size_t i = 0; i < wants.size(); ++i)
    EXPECT_TRUE(holds(in[i], 0, in[i].numel(), wants[i].src, me, key * 10 + wants[i].k))
        << "key " << key << ": transfer " << wants[i].k << " from " << wants[i].src << " to " << me;
}

inline void send_recv(DataPlane& d, const Memory& m = host_memory()) {
  const int G = d.size();
  one_send_recv(d, -1, 1, m);
  one_send_recv(d, G >= 3 ? G - 1 : -1, 2, m);  // a rank with nothing to do
  one_send_recv(d, -1, 3, m);
}

// Only rank 0 sends (to the last rank); the others do not call, or call with nothing.
inline void partial_send_recv(DataPlane& d, const Memory& m = host_memory()) {
  const int G = d.size(), me = d.rank();
  Tensor data = Tensor::zeros({1000}, DType::I32);
  fill(data, 0, 1000, 0, G - 1, 5);
  data = m.put(data);
  Tensor got = m.put(full({1000}, DType::I32, kUntouched));
  std::vector<Transfer> items;
  if (me == 0) items.push_back({Transfer::send, G - 1, data});
  if (me == G - 1) items.push_back({Transfer::recv, 0, got});
  if (!items.empty()) d.send_recv(items);
  if (me == G - 1) {
    EXPECT_TRUE(holds(m.get(got), 0, 1000, 0, G - 1, 5));
  }
  d.send_recv({});  // nothing at all is fine too
}

// Rows along the last call's routes: again (the same counts, other rows) and back (each rank
// returns as many rows to each source as it received from it), in turns, with empty routes too.
inline void along_routes(DataPlane& d, const Memory& m = host_memory()) {
  using Routes = DataPlane::Routes;
  const Routes again = Routes::again, back = Routes::back;
  for (int round = 0; round < 3; ++round) {
    auto there = [&](int s, int t) { return round == 2 ? int64_t(0) : int64_t((s * 3 + t * 5 + round) % 4 + (s == t)); };
    auto back_again = [&](int s, int t) { return there(t, s); };
    const int key = 400 + 10 * round;
    one_all_to_all_v(d, m, there, DType::F32, {2}, key);
    one_all_to_all_v(d, m, there, DType::I32, {3}, key + 1, 1, 2, &again);
    one_all_to_all_v(d, m, back_again, DType::F32, {5}, key + 2, 0, 1, &back);
    one_all_to_all_v(d, m, back_again, DType::I32, {}, key + 3, 0, 0, &again);
    one_all_to_all_v(d, m, there, DType::F32, {2}, key + 4, 2, 0, &back);
  }
}

// What a plane does while its queues record a graph (m.graph): rows with the counts on the device,
// along routes, all_gather; a recv without room for every row its sources hold, and sums (through
// the host), fail on every rank, and the plane stays usable.
inline void in_a_graph(DataPlane& d, const Memory& m) {
  const int G = d.size(), me = d.rank(), c = G - 1;
  all_to_all_v(d, 12, m);
  along_routes(d, m);
  all_gather(d, m);
  auto error_of = [](const std::function<void()>& call) {
    try {
      call();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("(no exception)");
  };
  // Every rank sends one row to every rank from a send of G rows; the last rank's recv has room
  // for what arrives, not for every row its sources hold.
  Tensor send = m.put(full({G, 2}, DType::F32, 1)), counts = m.put(counts_tensor(std::vector<int64_t>(G, 1)));
  Tensor recv = m.put(full({me == c ? G : G * G, 2}, DType::F32, kUntouched));
  Tensor recv_counts = m.put(full({G}, DType::I32, -1));
  const std::string what = fmt::format(
      "all_to_all_v: rank {} receives {} rows (by source rank: [{}]) but its recv holds {} (counts on the device, in "
      "a graph: recv holds every row its sources hold)",
      c, G * G, fmt::join(std::vector<int64_t>(G, G), ", "), G);
  if (G >= 2) {  // one rank receives what it holds
    EXPECT_EQ(error_of([&] { d.all_to_all_v(send, counts, recv, recv_counts); }),
              me == c ? what : fmt::format("rank {} failed: {}", c, what));
  }
  Tensor sum = m.put(full({3}, DType::I32, 1));
  EXPECT_EQ(error_of([&] { d.all_reduce_sum(sum); }),
            fmt::format("all_reduce_sum: rank {}'s device queue is in a graph pass, and all_reduce_sum waits on the "
                        "host",
                        me));
  along_routes(d, m);
}

inline void everything(DataPlane& d, const Memory& m = host_memory()) {
  all_to_all_v(d, 12, m);
  along_routes(d, m);
  all_gather(d, m);
  all_reduce(d, m);
  send_recv(d, m);
  partial_send_recv(d, m);
}

// --- Errors -------------------------------------------------------------------------------------

// Rank 0 sends the last rank 10 I32 and then 8, which it receives as `n` and 8 in one call: the
// receiver gets an error naming both ranks and sizes once its call is done (the 8 arrive intact),
// the sender none; the next transfer between them arrives intact.
inline void send_recv_size_mismatch(DataPlane& d, const Memory& m = host_memory()) {
  const int G = d.size(), me = d.rank(), last = G - 1;
  if (G < 2) return;
  for (int64_t n : {8, 12}) {
    Tensor bad = m.put(Tensor::zeros({10}, DType::I32)), good = Tensor::zeros({8}, DType::I32);
    fill(good, 0, 8, 0, last, 7);
    good = m.put(good);
    Tensor got_bad = m.put(full({n}, DType::I32, kUntouched)), got_good = m.put(full({8}, DType::I32, kUntouched));
    std::string error = "(no exception)";
    try {
      if (me == 0) {
        const Transfer items[] = {{Transfer::send, last, bad}, {Transfer::send, last, good}};
        d.send_recv(items);
      } else if (me == last) {
        const Transfer items[] = {{Transfer::recv, 0, got_bad}, {Transfer::recv, 0, got_good}};
        d.send_recv(items);
      }
    } catch (const Error& e) {
      error = e.what();
    }
    if (me == last) {
      EXPECT_EQ(error, fmt::format("send_recv: rank {} expected {} bytes from rank 0, which sent 40", last, 4 * n));
      EXPECT_TRUE(holds(m.get(got_good), 0, 8, 0, last, 7));
    } else {
      EXPECT_EQ(error, "(no exception)") << "rank " << me;
    }
  }
  partial_send_recv(d, m);
}

// Collective calls with bad arguments on one rank (the culprit, the last) or disagreeing ranks;
// every rank must throw: the culprit `what`, the others "rank C failed: what" (or all `what`
// when no rank is at fault alone). `impl` is the implementation's name in messages.
enum class Bad {
  recv_too_small,
  counts_exceed_send,
  negative_count,
  counts_not_i32,
  recv_counts_wrong_shape,
  send_recv_dtypes_differ,
  foreign_buffer,  // a buffer in memory the plane does not move
  row_sizes_differ,  // needs two ranks
  row_dtypes_differ,  // needs two ranks
  gather_too_small,
  gather_sizes_differ,  // needs two ranks
  reduce_bf16,
  reduce_sizes_differ,  // needs two ranks
};

inline std::vector<Bad> bad_call_kinds(int G) {
  std::vector<Bad> all = {Bad::recv_too_small, Bad::counts_exceed_send,      Bad::negative_count,
                          Bad::counts_not_i32, Bad::recv_counts_wrong_shape, Bad::send_recv_dtypes_differ,
                          Bad::foreign_buffer, Bad::gather_too_small,        Bad::reduce_bf16};
  if (G >= 2)
    all.insert(all.end(), {Bad::row_sizes_differ, Bad::row_dtypes_differ, Bad::gather_sizes_differ,
                           Bad::reduce_sizes_differ});
  return all;
}

// One bad call (see Bad), checked on every rank; nothing moves. The buffers are made on the host
// and put in the plane's memory for the call (but a foreign one).
inline void bad_call(DataPlane& d, Bad kind, const std::string& impl, const Memory& m) {
  const int G = d.size(), me = d.rank(), c = G - 1;
  const bool culprit = me == c;
  std::vector<int64_t> two(G, 2);
  Tensor send = full({2 * G, 3}, DType::F32, 1), recv = full({2 * G, 3}, DType::F32, kUntouched);
  Tensor counts = counts_tensor(two), recv_counts = full({G}, DType::I32, -1);
  std::string what;
  bool blamed = true;  // false: no rank at fault alone, all get `what`
  bool foreign = false;  // the culprit's recv stays where it is
  Tensor passed_recv, passed_counts;  // what the call was given to write
  std::function<void()> call = [&] {
    passed_recv = foreign ? recv : m.put(recv);
    passed_counts = m.put(recv_counts);
    d.all_to_all_v(m.put(send), m.put(counts), passed_recv, passed_counts);
  };
  switch (kind) {
    case Bad::recv_too_small:
      if (culprit) recv = full({2 * G - 1, 3}, DType::F32, kUntouched);
      what = fmt::format("all_to_all_v: rank {} receives {} rows (by source rank: [{}]) but its recv holds {}", c,
                         2 * G, fmt::join(two, ", "), 2 * G - 1);
      break;
    case Bad::counts_exceed_send:
      if (culprit) send = full({2 * G - 1, 3}, DType::F32, 1);
      what = fmt::format("all_to_all_v: rank {}'s send_counts sum to {} rows, its send holds {}", c, 2 * G, 2 * G - 1);
      break;
    case Bad::negative_count:
      if (culprit) counts.data<int32_t>()[0] = -1;
      what = fmt::format("all_to_all_v: rank {}'s send_counts[0] is -1", c);
      break;
    case Bad::counts_not_i32:
      if (culprit) counts = Tensor::zeros({G}, DType::I64);
      what = fmt::format("all_to_all_v: rank {}'s send_counts is I64 [{}], expected I32 [{}]", c, G, G);
      break;
    case Bad::recv_counts_wrong_shape:
      if (culprit) recv_counts = Tensor::zeros({G + 1}, DType::I32);
      what = fmt::format("all_to_all_v: rank {}'s recv_counts is I32 [{}], expected I32 [{}]", c, G + 1, G);
      break;
    case Bad::send_recv_dtypes_differ:
      if (culprit) recv = full({2 * G, 3}, DType::I32, kUntouched);
      what = fmt::format("all_to_all_v: rank {}'s send is F32 [{}, 3] but its recv is I32 [{}, 3]; they need the "
                         "same dtype and row size",
                         c, 2 * G, 2 * G);
      break;
    case Bad::foreign_buffer:
      // Never dereferenced: the data plane refuses it first (a host plane a CUDA buffer, NCCL a host one).
      if (culprit) {
        foreign = true;
        if (m.device == Device::CPU) recv = Tensor::borrow(recv.raw(), recv.shape(), recv.dtype(), Device::CUDA);
      }
      what = m.device == Device::CPU
                 ? fmt::format("all_to_all_v: rank {}'s recv is in CUDA memory; the {} data plane moves host (CPU) "
                               "memory only",
                               c, impl)
                 : fmt::format("all_to_all_v: rank {}'s recv is in CPU memory; the {} data plane moves CUDA memory "
                               "only",
                               c, impl);
      break;
    case Bad::row_sizes_differ:
      if (culprit) {
        send = full({2 * G, 4}, DType::F32, 1);
        recv = full({2 * G, 4}, DType::F32, kUntouched);
      }
      what = fmt::format("all_to_all_v: rank 0 passes rows of 12 bytes (F32), rank {} passes rows of 16 bytes (F32)", c);
      blamed = false;
      break;
    case Bad::row_dtypes_differ:
      if (culprit) {
        send = full({2 * G, 3}, DType::I32, 1);
        recv = full({2 * G, 3}, DType::I32, kUntouched);
      }
      what = fmt::format("all_to_all_v: rank 0 passes rows of 12 bytes (F32), rank {} passes rows of 12 bytes (I32)", c);
      blamed = false;
      break;
    case Bad::gather_too_small: {
      Tensor all = Tensor::zeros({culprit ? 5 * G - 1 : 5 * G}, DType::F32), mine = Tensor::zeros({5}, DType::F32);
      call = [&d, &m, all, mine] {
        Tensor a = m.put(all);
        d.all_gather(m.put(mine), a);
      };
      what = fmt::format("all_gather: rank {}'s all is F32 [{}], expected {} elements ({} ranks x 5)", c, 5 * G - 1,
                         5 * G, G);
      break;
    }
    case Bad::gather_sizes_differ: {
      const int64_t n = culprit ? 6 : 5;
      Tensor all = Tensor::zeros({n * G}, DType::F32), mine = Tensor::zeros({n}, DType::F32);
      call = [&d, &m, all, mine] {
        Tensor a = m.put(all);
        d.all_gather(m.put(mine), a);
      };
      what = fmt::format("all_gather: rank 0 passes 5 F32 elements, rank {} passes 6 F32 elements", c);
      blamed = false;
      break;
    }
    case Bad::reduce_bf16: {
      Tensor data = Tensor::zeros({4}, culprit ? DType::BF16 : DType::F32);
      call = [&d, &m, data] {
        Tensor x = m.put(data);
        d.all_reduce_sum(x);
      };
      what = fmt::format("all_reduce_sum: rank {}'s data is BF16 [4]; sums are over I32, I64 or F32", c);
      break;
    }
    case Bad::reduce_sizes_differ: {
      Tensor data = Tensor::zeros({culprit ? 3 : 4}, DType::I64);
      call = [&d, &m, data] {
        Tensor x = m.put(data);
        d.all_reduce_sum(x);
      };
      what = fmt::format("all_reduce_sum: rank 0 passes 4 I64 elements, rank {} passes 3 I64 elements", c);
      blamed = false;
      break;
    }
  }
  std::string got = "(no exception)";
  try {
    call();
  } catch (const Error& e) {
    got = e.what();
  }
  const std::string want = !blamed || culprit ? what : fmt::format("rank {} failed: {}", c, what);
  EXPECT_EQ(got, want) << "rank " << me;
  if (kind == Bad::recv_too_small || kind == Bad::counts_exceed_send) {
    // Nothing moved: the rows and counts are as they were.
    const Tensor r = m.get(passed_recv), rc = m.get(passed_counts);
    EXPECT_TRUE(untouched(r, 0, r.numel())) << "rank " << me;
    EXPECT_EQ(rc.data<int32_t>()[0], -1) << "rank " << me;
  }
}

// Every bad call fails on every rank, and the data plane stays usable: a good call follows each.
inline void bad_calls(DataPlane& d, const std::string& impl, const Memory& m = host_memory()) {
  for (auto kind : bad_call_kinds(d.size())) {
    SCOPED_TRACE(::testing::Message() << "bad call " << int(kind));
    bad_call(d, kind, impl, m);
    all_to_all_v(d, 3, m);
  }
}

}  // namespace ballast::dist::data_plane_conformance

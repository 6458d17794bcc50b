#pragma once
// What every Communicator must do, as checks run by every rank (each rank calls the same
// function, in the same order). Used by test_dist (threads) and test_dist_mpi (processes).
#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "ballast/dist/communicator.h"

namespace ballast::dist::conformance {

// The message of what f throws ("(no exception)" if it returns).
inline std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no exception)";
}

inline std::byte pattern(int src, int dst, int tag, size_t i) {
  return static_cast<std::byte>((src * 131 + dst * 31 + tag * 7 + i * 13 + (i >> 8)) & 0xff);
}

inline Bytes make_bytes(size_t n, int src, int dst, int tag) {
  Bytes b(n);
  for (size_t i = 0; i < n; ++i) b[i] = pattern(src, dst, tag, i);
  return b;
}

// Compares without one gtest failure per byte.
inline bool same_bytes(const Bytes& got, size_t n, int src, int dst, int tag) {
  if (got.size() != n) return false;
  for (size_t i = 0; i < n; ++i)
    if (got[i] != pattern(src, dst, tag, i)) return false;
  return true;
}

inline void all_reduce(Communicator& c) {
  const int G = c.size(), r = c.rank();
  std::vector<int64_t> v(100);
  for (size_t i = 0; i < v.size(); ++i) v[i] = (int64_t(1) << 40) * r + 1000 * r + int64_t(i);
  c.all_reduce_sum(std::span<int64_t>(v));
  const int64_t ranks = int64_t(G) * (G - 1) / 2;
  for (size_t i = 0; i < v.size(); ++i)
    ASSERT_EQ(v[i], (int64_t(1) << 40) * ranks + 1000 * ranks + G * int64_t(i)) << "i=" << i;

  std::vector<int64_t> none;
  c.all_reduce_sum(std::span<int64_t>(none));

  std::vector<double> d(37);
  for (size_t i = 0; i < d.size(); ++i) d[i] = 0.5 * r - 0.25 * double(i);
  c.all_reduce_sum(std::span<double>(d));
  for (size_t i = 0; i < d.size(); ++i) ASSERT_EQ(d[i], 0.5 * ranks - 0.25 * G * double(i));

  // Inexact sums: every rank must get the same bits.
  std::vector<double> x(5);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.1 * (r + 1) + 1e-17 * double(i) + 1e10 * (r % 2);
  c.all_reduce_sum(std::span<double>(x));
  Bytes mine(x.size() * sizeof(double));
  std::memcpy(mine.data(), x.data(), mine.size());
  auto all = c.all_gather(mine);
  for (int q = 0; q < G; ++q) EXPECT_EQ(all[q], mine) << "rank " << q << " got other sums";

  EXPECT_FALSE(c.all_reduce_or(false));
  EXPECT_TRUE(c.all_reduce_or(r == G - 1));
  EXPECT_TRUE(c.all_reduce_or(r == 0));
  EXPECT_TRUE(c.all_reduce_or(true));
}

// Sizes vary with the pair and the round, and include empty buffers.
inline void all_to_all(Communicator& c, int rounds = 12) {
  const int G = c.size(), me = c.rank();
  auto size_of = [&](int src, int dst, int round) -> size_t {
    if (round == 0) return 0;                                          // all empty
    if (round == 1) return (src + 1) % G == dst ? (size_t(1) << 20) + 3 : 0;  // large, sparse
    return size_t((src * 7 + dst * 3 + round) % 5) * 37;
  };
  for (int round = 0; round < rounds; ++round) {
    std::vector<Bytes> send(G);
    for (int dst = 0; dst < G; ++dst) send[dst] = make_bytes(size_of(me, dst, round), me, dst, round);
    auto recv = c.all_to_all(send);
    ASSERT_EQ(recv.size(), size_t(G));
    for (int src = 0; src < G; ++src)
      EXPECT_TRUE(same_bytes(recv[src], size_of(src, me, round), src, me, round))
          << "round " << round << " from " << src << " to " << me << ": " << recv[src].size()
          << " bytes";
  }
}

inline void all_gather(Communicator& c) {
  const int G = c.size(), me = c.rank();
  for (int round = 0; round < 3; ++round) {
    auto n = [&](int r) -> size_t { return round == 0 ? 0 : size_t(r) * 100 + (round == 2 ? 5000 : 0); };
    auto all = c.all_gather(make_bytes(n(me), me, -1, round));
    ASSERT_EQ(all.size(), size_t(G));
    for (int r = 0; r < G; ++r)
      EXPECT_TRUE(same_bytes(all[r], n(r), r, -1, round)) << "round " << round << " rank " << r;
  }
}

// Every rank sends to every rank (itself included) several messages, some with the same tag
// (matched in order), some empty, one large; receives are posted in another order than sends.
inline void exchange(Communicator& c) {
  const int G = c.size(), me = c.rank();
  auto size_of = [](int src, int dst, int tag) -> size_t {
    if (tag == 100) return (size_t(4) << 20) + 1;
    if (tag == 9) return 10;
    if (tag == 10) return 20;  // second message with tag 9
    return size_t((src + dst + tag) % 4) * 50;
  };
  std::vector<Bytes> out, in;
  std::vector<Communicator::SendItem> sends;
  std::vector<Communicator::RecvItem> recvs;
  struct Want { int src, key; };
  std::vector<Want> wants;
  for (int peer = 0; peer < G; ++peer) {
    for (int key : {0, 1, 2, 3, 4, 9, 10}) out.push_back(make_bytes(size_of(me, peer, key), me, peer, key));
    if ((me + 1) % G == peer) out.push_back(make_bytes(size_of(me, peer, 100), me, peer, 100));
  }
  size_t k = 0;
  for (int peer = 0; peer < G; ++peer) {
    for (int key : {0, 1, 2, 3, 4, 9, 10}) sends.push_back({peer, key == 10 ? 9 : key, out[k++]});
    if ((me + 1) % G == peer) sends.push_back({peer, 100, out[k++]});
  }
  for (int peer = G - 1; peer >= 0; --peer) {
    for (int key : {4, 3, 100, 9, 10, 2, 1, 0}) {
      if (key == 100 && (peer + 1) % G != me) continue;
      wants.push_back({peer, key});
      in.emplace_back(size_of(peer, me, key));
    }
  }
  for (size_t i = 0; i < wants.size(); ++i)
    recvs.push_back({wants[i].src, wants[i].key == 10 ? 9 : wants[i].key, in[i]});
  c.exchange(sends, recvs);
  for (size_t i = 0; i < wants.size(); ++i)
    EXPECT_TRUE(same_bytes(in[i], size_of(wants[i].src, me, wants[i].key), wants[i].src, me, wants[i].key))
        << "from " << wants[i].src << " key " << wants[i].key;
  c.barrier();
}

// Ranks with nothing to move skip exchange altogether.
inline void partial_exchange(Communicator& c) {
  const int G = c.size(), me = c.rank();
  if (G >= 2) {
    Bytes data = make_bytes(1000, 0, 1, 5);
    Bytes got(1000);
    if (me == 0) {
      Communicator::SendItem s{1, 5, data};
      c.exchange(std::span(&s, 1), {});
    } else if (me == 1) {
      Communicator::RecvItem rv{0, 5, got};
      c.exchange({}, std::span(&rv, 1));
      EXPECT_TRUE(same_bytes(got, 1000, 0, 1, 5));
    }
  }
  c.exchange({}, {});  // nothing at all is fine too
  c.barrier();
}

inline void barriers(Communicator& c, int n = 1000) {
  for (int i = 0; i < n; ++i) c.barrier();
}

inline void everything(Communicator& c) {
  all_reduce(c);
  all_to_all(c);
  all_gather(c);
  exchange(c);
  partial_exchange(c);
  barriers(c);
}

}  // namespace ballast::dist::conformance

#pragma once
// What every Communicator (the control plane) must do, as checks run by every rank (each rank
// calls the same function, in the same order). Used by test_dist (threads) and test_dist_mpi
// (processes). The data plane's are in data_plane_conformance.h.
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

inline std::byte pattern(int src, int dst, int key, size_t i) {
  return static_cast<std::byte>((src * 131 + dst * 31 + key * 7 + i * 13 + (i >> 8)) & 0xff);
}

inline Bytes make_bytes(size_t n, int src, int dst, int key) {
  Bytes b(n);
  for (size_t i = 0; i < n; ++i) b[i] = pattern(src, dst, key, i);
  return b;
}

// Compares without one gtest failure per byte.
inline bool same_bytes(const Bytes& got, size_t n, int src, int dst, int key) {
  if (got.size() != n) return false;
  for (size_t i = 0; i < n; ++i)
    if (got[i] != pattern(src, dst, key, i)) return false;
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

inline void barriers(Communicator& c, int n = 1000) {
  for (int i = 0; i < n; ++i) c.barrier();
}

inline void everything(Communicator& c) {
  all_reduce(c);
  all_gather(c);
  barriers(c);
}

}  // namespace ballast::dist::conformance

#include "ballast/core/error.h"
#include "ballast/eplb/dispatch.h"
#include "ballast/eplb/metrics.h"

#include <gtest/gtest.h>

#include <functional>
#include <random>

using namespace ballast::eplb;

static double max_rank(const std::vector<double>& slot, int G) {
  auto rl = rank_loads_from_slots(slot, G);
  return *std::max_element(rl.begin(), rl.end());
}

// Brute force: every integer split of every expert's tokens over its replicas.
static double brute_force(const std::vector<int32_t>& row, int G, const std::vector<double>& counts) {
  const int P = int(row.size()), K = P / G, E = int(counts.size());
  std::vector<std::vector<int>> rep(E);
  for (int p = 0; p < P; ++p) rep[row[p]].push_back(p);
  std::vector<double> load(G, 0.0);
  double best = 1e300;
  std::function<void(int)> rec = [&](int e) {
    if (e == E) { best = std::min(best, *std::max_element(load.begin(), load.end())); return; }
    int n = int(counts[e]);
    if (rep[e].size() == 1) { load[rep[e][0] / K] += n; rec(e + 1); load[rep[e][0] / K] -= n; return; }
    // two or three replicas
    int r0 = rep[e][0] / K, r1 = rep[e][1] / K, r2 = rep[e].size() > 2 ? rep[e][2] / K : -1;
    for (int a = 0; a <= n; ++a)
      for (int b = 0; a + b <= n; ++b) {
        if (r2 < 0 && a + b != n) continue;
        load[r0] += a, load[r1] += b;
        if (r2 >= 0) load[r2] += n - a - b;
        rec(e + 1);
        load[r0] -= a, load[r1] -= b;
        if (r2 >= 0) load[r2] -= n - a - b;
      }
  };
  rec(0);
  return best;
}

TEST(Dispatch, BalancedIsExactAgainstBruteForce) {
  std::mt19937 rng(3);
  for (int c = 0; c < 150; ++c) {
    int G = 2 + rng() % 3, K = 2 + rng() % 2, P = G * K, E = P - 1 - int(rng() % 3);
    std::vector<int32_t> row(P);
    for (int p = 0; p < E; ++p) row[p] = p;
    for (int p = E; p < P; ++p) row[p] = rng() % E;
    std::shuffle(row.begin(), row.end(), rng);
    // at most 3 replicas per expert for the brute force
    std::vector<int> cnt(E, 0);
    bool ok = true;
    for (int x : row) ok &= ++cnt[x] <= 3;
    if (!ok) continue;
    std::vector<double> counts(E);
    for (auto& x : counts) x = double(rng() % 9);
    auto slot = dispatch_balanced(row, G, counts.data(), E);
    double total = 0;
    for (double x : slot) {
      total += x;
      EXPECT_EQ(x, std::floor(x));
    }
    double want = 0;
    for (double x : counts) want += x;
    EXPECT_EQ(total, want);
    // tokens only go to slots of their own expert
    std::vector<double> per(E, 0.0);
    for (int p = 0; p < P; ++p) per[row[p]] += slot[p];
    EXPECT_EQ(per, counts);
    EXPECT_EQ(max_rank(slot, G), brute_force(row, G, counts)) << "case " << c;
  }
}

TEST(Dispatch, StaticPrefersOwnRankThenNode) {
  // 4 ranks x 2 slots, 2 nodes of 2 ranks; expert 0 on ranks 0 and 3, expert 1 on rank 1 only.
  std::vector<int32_t> row{0, 2, 1, 3, 4, 5, 0, 6};
  auto t = static_table(row, 4, 2, 7);
  EXPECT_EQ(t[0 * 7 + 0], 0);  // rank 0 holds it
  EXPECT_EQ(t[3 * 7 + 0], 6);  // rank 3 holds it
  EXPECT_EQ(t[1 * 7 + 0], 0);  // rank 1: same node as rank 0
  EXPECT_EQ(t[2 * 7 + 0], 6);  // rank 2: same node as rank 3
  double counts[7] = {8, 4, 0, 0, 0, 0, 0};
  auto slot = dispatch_static(row, 4, 2, counts, 7);
  EXPECT_DOUBLE_EQ(slot[0], 4);
  EXPECT_DOUBLE_EQ(slot[6], 4);
  EXPECT_DOUBLE_EQ(slot[2], 4);
}

TEST(Dispatch, RandomIsDeterministicAndConserves) {
  std::vector<int32_t> row{0, 1, 0, 1, 2, 0};
  double counts[3] = {1000, 10, 5};
  auto a = dispatch_random(row, counts, 3, 42), b = dispatch_random(row, counts, 3, 42);
  EXPECT_EQ(a, b);
  EXPECT_DOUBLE_EQ(a[0] + a[2] + a[5], 1000);
  EXPECT_GT(a[0], 250);
  EXPECT_GT(a[5], 250);
  EXPECT_THROW(parse_dispatch("roundrobin"), ballast::Error);
  double frac[3] = {1.5, 0, 0};
  EXPECT_THROW(dispatch_balanced(row, 3, frac, 3), ballast::Error);
}

// Source ranks without a replica are shared out fairly (SGLang's _fair_choices): with 4 replicas
// on ranks 0, 4, 8, 12 of 32 (all = 0 mod 4, where "source mod count" sent 9 sources to one replica
// and 5 to each other), every replica serves its own rank and 7 others.
TEST(Dispatch, StaticSharesSourcesFairly) {
  const int G = 32, K = 2, E = 60, P = G * K;
  std::vector<int32_t> row(P, -1);
  for (int g : {0, 4, 8, 12}) row[g * K] = 0;  // expert 0 only in these four slots
  for (int p = 0, e = 1; p < P; ++p)
    if (row[p] < 0) row[p] = std::min(e++, E - 1);  // 1 .. 59, and 59 once more
  auto t = static_table(row, G, 0, E);
  std::vector<int> served(P, 0);
  for (int s = 0; s < G; ++s) served[t[size_t(s) * E + 0]]++;
  for (int g : {0, 4, 8, 12}) EXPECT_EQ(served[g * K], 8) << "replica on rank " << g;
}

// Times a full plan (48 layers x 512 experts, 64 ranks, 64 redundant) on one core, on the
// weights written by tools/eplb_reference.py --time --weights-out, and checks that `deepseek`
// reproduces the original's physical_to_logical_map written in the same file. Built standalone
// (header-only fmt) so that it can be compiled on a machine that has the original Python:
//   g++ -O3 -std=c++20 -DFMT_HEADER_ONLY -Isrc -I<fmt+nlohmann headers>
//       src/ballast/eplb/{deepseek,ballast_algorithm,metrics,placement,load,plan,forecast,dispatch}.cpp
//       bench/eplb/eplb_speed.cpp -o eplb_speed && ./eplb_speed W.txt   (one command line)
#include "ballast/eplb/deepseek.h"
#include "ballast/eplb/metrics.h"
#include "ballast/eplb/plan.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <vector>

using namespace ballast::eplb;

int main(int argc, char** argv) {
  if (argc < 2) { std::fprintf(stderr, "usage: eplb_speed WEIGHTS.txt [repeat]\n"); return 2; }
  int repeat = argc > 2 ? std::atoi(argv[2]) : 20;
  std::ifstream f(argv[1]);
  int L, E, G, R;
  f >> L >> E >> G >> R;
  const int P = E + R;
  LoadTrace load(1, L, E);
  for (auto& x : load.count) f >> x;
  std::vector<int32_t> ref[2];
  for (auto& r : ref) {
    r.resize(size_t(L) * P);
    for (auto& x : r) if (!(f >> x)) { r.clear(); break; }
  }
  struct Case { const char* name; Algorithm a; int groups, nodes; int ref; Dispatch target; };
  const Case cases[] = {{"deepseek (global)", Algorithm::deepseek, 1, 1, 0, Dispatch::static_},
                        {"deepseek_hierarchical 8 groups 8 nodes", Algorithm::deepseek_hierarchical, 8, 8, 1, Dispatch::static_},
                        {"ballast", Algorithm::ballast, 1, 1, -1, Dispatch::static_},
                        {"ballast planned for balanced dispatch", Algorithm::ballast, 1, 1, -1, Dispatch::balanced}};
  const size_t n = std::size(cases);
  std::printf("{\"shape\": \"%d layers x %d experts, %d ranks, %d redundant\", \"results\": [\n", L, E, G, R);
  for (size_t c = 0; c < n; ++c) {
    PlanOptions po;
    po.algorithm = cases[c].a, po.ranks = G, po.redundant = R, po.groups = cases[c].groups, po.nodes = cases[c].nodes;
    po.dispatch = cases[c].target;
    std::vector<double> ms;
    Placement pl;
    for (int i = 0; i < repeat; ++i) {
      auto t0 = std::chrono::steady_clock::now();
      pl = plan(load, po);
      ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(ms.begin(), ms.end());
    const char* parity = "n/a";
    if (cases[c].ref >= 0 && !ref[cases[c].ref].empty()) parity = pl.phy2log == ref[cases[c].ref] ? "identical" : "DIFFERENT";
    auto b = evaluate_even(pl, load);
    std::printf("  {\"algorithm\": \"%s\", \"min_ms\": %.3f, \"median_ms\": %.3f, \"balancedness\": %.5f, "
                "\"achieved_over_bound\": %.5f, \"parity_with_original\": \"%s\"}%s\n",
                cases[c].name, ms.front(), ms[ms.size() / 2], b.mean, b.achieved_over_bound, parity, c + 1 < n ? "," : "");
  }
  std::printf("]}\n");
  return 0;
}

#include "ballast/eplb/synth.h"

#include "ballast/core/checked.h"
#include "ballast/core/error.h"
#include "ballast/eplb/limits.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

namespace ballast::eplb {

SynthSpec model_shape(const std::string& model) {
  SynthSpec s;
  s.name = model;
  if (model == "qwen3-next") s.layers = 48, s.experts = 512, s.topk = 10;
  else if (model == "qwen3.5-397b") s.layers = 60, s.experts = 512, s.topk = 10;
  else if (model == "deepseek-v3") s.layers = 58, s.experts = 256, s.topk = 8;
  else fail("unknown model shape '{}' (expected qwen3-next, qwen3.5-397b or deepseek-v3)", model);
  return s;
}

Popularity parse_popularity(const std::string& name) {
  if (name == "lognormal") return Popularity::lognormal;
  if (name == "zipf") return Popularity::zipf;
  fail("unknown popularity '{}' (expected lognormal or zipf)", name);
}

std::vector<double> synth_layer(const SynthSpec& sp, int layer) {
  check(sp.experts > 0 && sp.experts <= kMaxExperts && sp.topk > 0 && sp.topk <= sp.experts && sp.passes > 0 &&
            sp.tokens >= 0 && sp.layers >= 0 && sp.layers <= kMaxLayers,
        "synth: bad spec (layers {}, experts {}, topk {}, passes {}, tokens {})", sp.layers, sp.experts, sp.topk,
        sp.passes, sp.tokens);
  // NaN or infinite noise would make every count 0 (or NaN) without a word.
  for (auto [name, v] : {std::pair{"skew", sp.skew}, {"drift", sp.drift}, {"burst", sp.burst}})
    check(std::isfinite(v) && v >= 0, "synth: {} {} must be a finite number >= 0", name, v);
  check(std::isfinite(sp.trend), "synth: trend {} must be a finite number", sp.trend);
  const int64_t dims[] = {sp.passes, sp.experts};
  checked_numel(dims, kMaxLoadCounts, "synth: counts of a layer [T][E]");
  const int E = sp.experts, T = sp.passes;
  std::mt19937_64 rng(sp.seed * 0x9e3779b97f4a7c15ULL + uint64_t(layer) * 0x2545f4914f6cdd1dULL + 1);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> z(E);
  if (sp.popularity == Popularity::lognormal) {
    for (auto& x : z) x = sp.skew * normal(rng);
  } else {
    std::vector<int> perm(E);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int i = 0; i < E; ++i) z[perm[i]] = -sp.skew * std::log(double(i + 1));
  }
  // The trend's direction comes from a stream of its own, so that traces without a trend are the
  // same as before it existed.
  std::vector<double> dir(E, 0.0);
  if (sp.trend != 0) {
    std::mt19937_64 drng(sp.seed * 0x94d049bb133111ebULL + uint64_t(layer) * 0xbf58476d1ce4e5b9ULL + 7);
    std::normal_distribution<double> dnormal(0.0, 1.0);  // (normal caches a draw of rng's stream)
    for (auto& x : dir) x = dnormal(drng);
  }
  const double step = sp.drift / std::sqrt(1000.0), slope = sp.trend / 1000.0;
  std::vector<double> out(size_t(T) * E), p(E);
  const double choices = double(sp.tokens) * sp.topk;
  for (int t = 0; t < T; ++t) {
    double mx = -1e300;
    for (int e = 0; e < E; ++e) {
      z[e] += step * normal(rng);
      p[e] = z[e] + slope * t * dir[e] + sp.burst * normal(rng);
      mx = std::max(mx, p[e]);
    }
    double s = 0;
    for (int e = 0; e < E; ++e) s += (p[e] = std::exp(p[e] - mx));
    for (int e = 0; e < E; ++e) p[e] /= s;
    // A token picks an expert at most once: no expert gets more than 1/k of the choices.
    for (int it = 0; it < 8; ++it) {
      double excess = 0, rest = 0;
      for (int e = 0; e < E; ++e)
        if (p[e] > 1.0 / sp.topk) excess += p[e] - 1.0 / sp.topk, p[e] = 1.0 / sp.topk; else rest += p[e];
      if (excess <= 0 || rest <= 0) break;
      for (int e = 0; e < E; ++e)
        if (p[e] < 1.0 / sp.topk) p[e] += excess * p[e] / rest;
    }
    // One pass = one forward step of the whole EP deployment: `tokens` tokens each choose top-k
    // experts, i.e. tokens * k choices drawn from this pass's popularity (a multinomial, by
    // conditional binomials), no expert more than once per token (the cap above, and <= tokens).
    double n = choices, rest = 1.0;
    for (int e = 0; e < E; ++e) {
      double x = 0;
      if (n > 0 && p[e] > 0) {
        double q = e == E - 1 ? 1.0 : std::min(1.0, p[e] / std::max(rest, 1e-300));
        x = double(std::binomial_distribution<int64_t>(int64_t(n), q)(rng));
      }
      x = std::min(x, double(sp.tokens));
      out[size_t(t) * E + e] = x;
      n -= x, rest -= p[e];
    }
  }
  return out;
}

LoadTrace synth_trace(const SynthSpec& sp) {
  LoadTrace t(sp.passes, sp.layers, sp.experts);
  for (int l = 0; l < sp.layers; ++l) {
    auto c = synth_layer(sp, l);
    for (int p = 0; p < sp.passes; ++p) std::copy(c.begin() + size_t(p) * sp.experts,
                                                  c.begin() + size_t(p + 1) * sp.experts, t.at(p, l));
  }
  return t;
}

}  // namespace ballast::eplb

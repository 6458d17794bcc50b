#include "ballast/eplb/forecast.h"

#include "ballast/core/error.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace ballast::eplb {

LoadTrace forecast_slices(const LoadTrace& w, const ForecastOptions& opt, std::vector<LayerTrend>* trends,
                          LoadTrace* level_out) {
  const int T = w.passes, L = w.layers, E = w.experts;
  check(w.count.size() == size_t(T) * L * E, "forecast: window: {} counts for shape [{}][{}][{}]", w.count.size(), T, L,
        E);
  check(T >= 2, "forecast: a window of {} pass(es) has no trend to extrapolate", T);
  check(opt.bins >= 2 && opt.slices >= 1 && opt.horizon >= 0 && opt.damping <= 1 && opt.min_t >= 0,
        "forecast: bad options (bins {}, slices {}, horizon {}, damping {}, min_t {})", opt.bins, opt.slices,
        opt.horizon, opt.damping, opt.min_t);
  const int B = std::min(opt.bins, T), S = std::min(opt.slices, T);
  const double H = opt.horizon > 0 ? opt.horizon : T;
  // Bin b holds passes [b*T/B, (b+1)*T/B): its centre in passes and its length.
  std::vector<double> centre(B), len(B, 0.0);
  for (int t = 0; t < T; ++t) len[int(int64_t(t) * B / T)] += 1;
  for (int b = 0, start = 0; b < B; start += int(len[b]), ++b) centre[b] = start + len[b] / 2.0;
  // One pass over the window checks its counts and makes both its B bins and its own S time
  // slices (for the layers that keep them: summed in pass order, as LoadTrace::slices, so that
  // such a layer's plan is the very plan made without a forecast). The window is the largest input
  // of a rebalance: a second pass would cost as much as the rest of the forecast.
  LoadTrace binned(B, L, E), own(S, L, E);
  // The check on the bits (as LoadTrace::validate): sign set, or an exponent all ones (negative,
  // infinite or NaN) sets bit 63; integer operations, so the loop vectorises.
  constexpr uint64_t kExp = 0x7FF0000000000000ull, kOne = 0x0010000000000000ull;
  uint64_t acc = 0;
  for (int t = 0; t < T; ++t) {
    double* bin = binned.at(int(int64_t(t) * B / T), 0);
    double* slice = own.at(int(int64_t(t) * S / T), 0);
    const double* src = w.at(t, 0);
    for (size_t i = 0; i < size_t(L) * E; ++i) {
      uint64_t u;
      std::memcpy(&u, &src[i], sizeof u);
      acc |= ((u & kExp) + kOne) | u;
      bin[i] += src[i], slice[i] += src[i];
    }
  }
  if (acc >> 63) w.validate("forecast: window");  // names the first bad count (-0.0 passes there)
  // Least-squares slope of y over bins [b0, b1).
  auto fit_slope = [&](const std::vector<double>& y, int b0, int b1) {
    double c = 0, m = 0;
    for (int b = b0; b < b1; ++b) c += centre[b] / (b1 - b0), m += y[b] / (b1 - b0);
    double sxy = 0, sxx = 0;
    for (int b = b0; b < b1; ++b) sxy += (centre[b] - c) * (y[b] - m), sxx += (centre[b] - c) * (centre[b] - c);
    return sxx > 0 ? sxy / sxx : 0.0;
  };
  const int Q = std::max(1, B / 4);  // the window's last quarter, in bins: the level's
  double recent = 0;                 // its centre, in passes
  for (int b = B - Q; b < B; ++b) recent += centre[b] / Q;
  LoadTrace out(S, L, E);
  if (trends) trends->assign(L, {});
  if (level_out) *level_out = LoadTrace(1, L, E);
  std::vector<double> y(B), slope(E), level(E), s1(E), s2(E), share(E);
  for (int l = 0; l < L; ++l) {
    double total = 0;  // tokens per pass of the layer over the window
    for (int b = 0; b < B; ++b)
      for (int e = 0; e < E; ++e) total += binned.at(b, l)[e];
    total /= T;
    for (int e = 0; e < E; ++e) {
      // Log of the per-pass rate, +0.5 token per bin so that an expert idle in a bin stays finite.
      double n = 0;
      for (int b = 0; b < B; ++b) y[b] = std::log((binned.at(b, l)[e] + 0.5) / len[b]), n += binned.at(b, l)[e];
      slope[e] = fit_slope(y, 0, B);
      // The level: the mean log-rate of the window's last quarter, at that quarter's centre. The
      // random walk on top of a trend is best known from the latest passes; a quarter (two bins)
      // averages their sampling noise (qwen3-next/zipf-0.9, trend 0.2, 16 layers, balanced
      // dispatch: the second half's mean 0.9767, the last quarter's 0.9831, the last bin's 0.9826).
      double lm = 0;
      for (int b = B - Q; b < B; ++b) lm += y[b] / Q;
      level[e] = lm;
      s1[e] = fit_slope(y, 0, B / 2), s2[e] = fit_slope(y, B / 2, B);
      share[e] = total > 0 ? std::sqrt(n / (total * T)) : 0.0;
    }
    // Persistence: the regression through 0 of the second half's slopes on the first half's,
    // weighted by the root of the load share (hot experts have the least sampling noise, but a
    // few of them alone decide nothing). Its standard error is the robust (sandwich) one, from
    // the residuals: a random walk's halves give an estimate near 0 within about one error.
    double sxy = 0, sxx = 0;
    for (int e = 0; e < E; ++e) sxy += share[e] * s1[e] * s2[e], sxx += share[e] * s1[e] * s1[e];
    LayerTrend tr;
    if (sxx > 0 && B >= 4) {
      tr.persistence = sxy / sxx;
      double v = 0;
      for (int e = 0; e < E; ++e) {
        const double r = s2[e] - tr.persistence * s1[e];
        v += share[e] * share[e] * s1[e] * s1[e] * r * r;
      }
      const double se = std::sqrt(v) / sxx;
      tr.t = se > 0 ? tr.persistence / se : (tr.persistence > 0 ? std::numeric_limits<double>::infinity() : 0.0);
    }
    double k = opt.damping;  // the share of the slope extrapolated
    if (k < 0) k = tr.t >= opt.min_t && tr.t > 0 ? std::clamp(tr.persistence, 0.0, 1.0) : -1.0;
    tr.extrapolated = k >= 0;
    if (trends) (*trends)[l] = tr;
    if (level_out) {
      // The last quarter's level, as the window's tokens (the extrapolation below with k = 0).
      double* dst = level_out->at(0, l);
      double sum = 0;
      for (int e = 0; e < E; ++e) sum += (dst[e] = std::exp(level[e]));
      const double scale = sum > 0 ? total * T / sum : 0.0;
      for (int e = 0; e < E; ++e) dst[e] *= scale;
    }
    if (!tr.extrapolated) {
      for (int s = 0; s < S; ++s) std::copy(own.at(s, l), own.at(s, l) + E, out.at(s, l));
      continue;
    }
    for (int s = 0; s < S; ++s) {
      const double t = T + (s + 0.5) * H / S;
      double* dst = out.at(s, l);
      double sum = 0;
      for (int e = 0; e < E; ++e) sum += (dst[e] = std::exp(level[e] + k * slope[e] * (t - recent)));
      // The shares move, the router's total does not: each slice carries the window's tokens per pass.
      const double scale = sum > 0 ? total * (H / S) / sum : 0.0;
      for (int e = 0; e < E; ++e) dst[e] *= scale;
    }
  }
  return out;
}

}  // namespace ballast::eplb

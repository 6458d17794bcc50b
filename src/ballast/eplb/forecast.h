#pragma once
// Load forecast for the next rebalance interval. A placement is planned at the end of a window and
// served for the interval after it; when expert popularity drifts, the window's average describes
// the past, not the passes the placement will serve. Per layer, the forecast first asks the window
// whether its load has a trend that persists: it fits each expert's log-rate slope on the window's
// first half and on its second half, and regresses the second half's slopes on the first's over
// the experts (a steady trend keeps its slopes: about 1; a random walk's increments do not: about
// 0). Only when that persistence is significant (its t statistic against the residual noise of
// the regression) is the layer's trend extrapolated: a log-linear fit per expert, continued from
// the level of the window's last quarter over the next `horizon` passes, damped by the persistence,
// as time slices each renormalised to the window's tokens per pass (the router's total is fixed,
// only the shares move). A layer without a significant trend keeps the window's own time slices,
// exactly what is planned without a forecast, so a stationary load loses nothing to it. Its level
// (the last quarter's, below) is then the best forecast a random walk has of the next interval's
// mean loads; the planner balances it for static dispatch (ballast_algorithm.h, step 7).
#include "ballast/eplb/load.h"

#include <vector>

namespace ballast::eplb {

struct ForecastOptions {
  int bins = 8;        // the window is fitted on this many consecutive bins (fewer when it has fewer passes)
  int slices = 4;      // forecast slices covering the horizon (at most the window's passes)
  int horizon = 0;     // passes the plan will serve; 0 = the window's length (rebalance interval = window)
  // Fraction of the fitted slope extrapolated from the window's last quarter (1 = the full trend,
  // 0 = none: the level of that quarter); < 0: estimated per layer as the persistence above, and a
  // layer is extrapolated only when it is significant (every layer is, with a fixed damping).
  double damping = -1.0;
  // The persistence's t statistic (estimate / robust standard error) a layer needs to be
  // extrapolated. Synthetic windows of 1000 passes (docs/eplb.md): without a trend 14 of 636
  // layers reach 2, 2 reach 2.5, none 3; with the weakest trend run (0.1) 98% of layers reach 2.5
  // and 93% reach 3. A layer left unextrapolated keeps the plan of before, so a false alarm costs
  // more than a weak trend missed.
  double min_t = 3.0;
};

// What the forecast decided for a layer.
struct LayerTrend {
  double persistence = 0;  // regression of the second half's slopes on the first half's
  double t = 0;            // its t statistic
  bool extrapolated = false;
};

// window: [T][L][E] counts of T >= 2 consecutive passes. Returns [S][L][E], S = min(slices, T):
// for an extrapolated layer, slice s holds the forecast counts of passes [T + s*h/S, T + (s+1)*h/S)
// (h = horizon), per pass scaled as the window; for another layer, the window's own S time slices.
// trends (optional): one entry per layer.
// level (optional): [1][L][E], each layer's level of the window's last quarter (the geometric mean
// of its last two bins' per-pass rates, the extrapolation with no slope), scaled to the window's
// tokens: what the next interval's mean loads are expected to be where the layer has no trend.
LoadTrace forecast_slices(const LoadTrace& window, const ForecastOptions& opt = {},
                          std::vector<LayerTrend>* trends = nullptr, LoadTrace* level = nullptr);

}  // namespace ballast::eplb

#pragma once
// Load forecast for the next rebalance interval. A placement is planned at the end of a window and
// served for the interval after it; when expert popularity drifts, the window's average describes
// the past, not the passes the placement will serve. The forecast fits, per layer and expert, a
// log-linear trend to the window (binned), and extrapolates it over the next `horizon` passes as
// time slices, each renormalised to the window's tokens per pass (the router's total is fixed, only
// the shares move). Without a trend the fit is flat and the forecast is the window's level.
#include "ballast/eplb/load.h"

namespace ballast::eplb {

struct ForecastOptions {
  int bins = 8;        // the window is fitted on this many consecutive bins (fewer when it has fewer passes)
  int slices = 4;      // forecast slices covering the horizon
  int horizon = 0;     // passes the plan will serve; 0 = the window's length (rebalance interval = window)
  // Fraction of the fitted slope extrapolated from the window's end (1 = the full trend, 0 = none:
  // the level the window ended at); < 0: estimated per layer, as the share of the first half's
  // trend that persists in the second half.
  double damping = -1.0;
};

// window: [T][L][E] counts of T >= 2 consecutive passes. Returns [slices][L][E]: slice s holds the
// forecast counts of passes [T + s*h/S, T + (s+1)*h/S) (h = horizon), per pass scaled as the window.
LoadTrace forecast_slices(const LoadTrace& window, const ForecastOptions& opt = {});

}  // namespace ballast::eplb

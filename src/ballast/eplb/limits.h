#pragma once
// The sizes the EPLB library accepts. Files and options are checked against them where they enter
// (load and placement files, plan/replay/synth options, PlanOptions), so that a mistyped number is
// an error naming it rather than a plan, trace or table that outgrows memory or time.
#include <cstdint>

namespace ballast::eplb {

// The planners' time grows faster than linearly in G and P: at these limits one layer plans in
// seconds (ballast, one core: 6 s at G = 1024, E = 1024, P = 16384), beyond them in minutes.
constexpr int kMaxRanks = 1 << 10;     // EP ranks G (the largest deployments use a few hundred)
constexpr int kMaxExperts = 1 << 14;   // logical experts per layer E
constexpr int kMaxSlots = 1 << 14;     // physical slots per layer P = E + R
constexpr int kMaxLayers = 1 << 12;    // MoE layers L
constexpr int64_t kMaxLoadCounts = int64_t(1) << 28;  // counts in a trace [T][L][E] (2 GiB as doubles)
constexpr double kMaxCount = 9007199254740992.0;      // 2^53: counts are whole numbers held exactly

}  // namespace ballast::eplb

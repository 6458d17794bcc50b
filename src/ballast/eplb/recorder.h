#pragma once
// Load recorder of one expert domain (no global state: the domain owns it): the host window of
// the last `window` passes. Counting happens on the device (a histogram op into the domain's
// per-pass load); end_pass() takes a closed pass's load per physical slot and converts it to
// logical counts through the placement in force, into a ring window.
//   stat:      dump() returns the window's sum [1][L][E]
//   per_pass:  dump() returns every pass of the window [T][L][E], oldest first
//   per_token: as per_pass, and the physical top-k ids of every token are kept (dump_tokens())
// Thread-safe: every call takes a lock, so a server thread may start, stop or dump while the
// engine closes passes.
#include "ballast/eplb/load.h"
#include "ballast/eplb/placement.h"

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

namespace ballast::eplb {

enum class RecorderMode { stat, per_pass, per_token };
RecorderMode parse_recorder_mode(const std::string& name);

class Recorder {
 public:
  Recorder(int layers, int physical, RecorderMode mode = RecorderMode::stat, int window = 1000);

  void start();
  void stop();
  bool recording() const { return recording_.load(); }
  void reset();  // drops the window and the open pass

  // Closes a pass: its load per physical slot [L][P] becomes logical counts through `in_force`
  // (the placement the dispatch used). per_token: `tokens` holds, per layer, the physical ids of
  // every routed choice ([tokens * k]). Nothing is kept when not recording; a pass closed while
  // paused enters the window as zeros.
  void end_pass(const Placement& in_force, std::span<const int32_t> slot_counts,
                std::vector<std::vector<int32_t>> tokens = {});

  // While a guard lives (any thread), passes are recorded as zeros.
  class PauseGuard {
   public:
    explicit PauseGuard(Recorder& r) : r_(&r) { r_->paused_.fetch_add(1); }
    ~PauseGuard() { if (r_) r_->paused_.fetch_sub(1); }
    PauseGuard(PauseGuard&& o) noexcept : r_(o.r_) { o.r_ = nullptr; }
    PauseGuard(const PauseGuard&) = delete;
    PauseGuard& operator=(const PauseGuard&) = delete;
   private:
    Recorder* r_;
  };
  [[nodiscard]] PauseGuard pause() { return PauseGuard(*this); }
  bool paused() const { return paused_.load() > 0; }

  int passes() const;  // passes in the window
  LoadTrace dump() const;  // per the mode (see above)
  LoadTrace dump_window() const;  // always [T][L][E]
  // per_token: for each pass in the window, for each layer, the physical ids [tokens * k].
  std::vector<std::vector<std::vector<int32_t>>> dump_tokens() const;
  std::string dump_json() const;  // {"logical_count": ...} as the mode says

  RecorderMode mode() const { return mode_; }
  int layers() const { return layers_; }
  int physical() const { return physical_; }
  int window() const { return window_; }

 private:
  bool active() const { return recording_.load() && paused_.load() == 0; }

  const int layers_, physical_, window_;
  const RecorderMode mode_;
  std::atomic<bool> recording_{false};
  std::atomic<int> paused_{0};
  mutable std::mutex mu_;
  int experts_ = -1;                               // E, fixed by the first end_pass
  std::deque<std::vector<int32_t>> ring_;          // passes, each [L][E]
  std::deque<std::vector<std::vector<int32_t>>> ring_tokens_;
};

}  // namespace ballast::eplb

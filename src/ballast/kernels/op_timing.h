#pragma once
// The accumulator behind Backend::start_op_timing / stop_op_timing: op -> calls and seconds.
// Backends time their ops (a host clock on the CPU, events on a GPU) and add what they measured.
#include <map>
#include <string>
#include <vector>

#include "ballast/core/clock.h"
#include "ballast/kernels/backend.h"

namespace ballast::kernels {

class OpTimes {
 public:
  void add(const std::string& op, double seconds) {
    OpTime& t = by_op_[op];
    t.op = op;
    ++t.calls;
    t.seconds += seconds;
  }
  // Everything added since the last call, by decreasing time; starts afresh.
  std::vector<OpTime> take();

 private:
  std::map<std::string, OpTime> by_op_;
};

// Times one op of a backend whose ops finish before they return (the CPU) with the host clock;
// `times` null: timing is off. An op called from inside another is not counted twice.
class HostTimedOp {
 public:
  HostTimedOp(OpTimes* times, int& depth, const char* op) : times_(depth == 0 ? times : nullptr), depth_(depth), op(op) {
    ++depth_;
    if (times_) t0_ = now_seconds();
  }
  ~HostTimedOp() {
    --depth_;
    if (times_) times_->add(op, seconds_since(t0_));
  }
  HostTimedOp(const HostTimedOp&) = delete;
  HostTimedOp& operator=(const HostTimedOp&) = delete;

 private:
  OpTimes* times_;
  int& depth_;
  double t0_ = 0;

 public:
  const char* op;  // may be refined while the op runs (the path it took)
};

}  // namespace ballast::kernels

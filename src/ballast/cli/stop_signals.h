#pragma once
// SIGTERM and SIGINT as a callback: while a StopSignals lives, each of the two signals calls
// on_stop(signal) from a thread of its own (not from the handler, which can only write to a pipe),
// so the callback may take locks, print and stop a server or a generation at its next boundary.
// Destroying it restores the default handlers. One at a time per process.
#include <atomic>
#include <functional>
#include <thread>

namespace ballast::cli {

class StopSignals {
 public:
  explicit StopSignals(std::function<void(int)> on_stop);
  ~StopSignals();
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

 private:
  std::atomic<bool> done_{false};
  std::thread watcher_;
};

}  // namespace ballast::cli

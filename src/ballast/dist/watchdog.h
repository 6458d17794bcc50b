#pragma once
// A bound on how long one call of a rank's planes may wait for the other ranks. MPI has no timeout
// of its own: when a rank stops answering (stopped, hung, its host gone) the others wait in their
// collective for ever, busy-polling. Every blocking call of the MPI planes runs inside a Scope;
// the watchdog's own thread checks the call in progress and, once it has waited longer than the
// limit, calls on_expire (once) with a message naming the call, the wait and the limit. The CLI's
// on_expire prints it and ends the job.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

namespace ballast::dist {

class Watchdog {
 public:
  using Expire = std::function<void(const std::string& why)>;
  // limit <= 0: no watchdog (scopes cost nothing, no thread runs).
  Watchdog(std::chrono::milliseconds limit, Expire on_expire);
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  std::chrono::milliseconds limit() const { return limit_; }

  // Marks a call in progress from construction to destruction (one at a time: a rank's planes
  // are used from one thread at a time). `call` must outlive the scope (a string literal).
  class Scope {
   public:
    Scope(Watchdog* w, const char* call);
    ~Scope();
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    Watchdog* w_;
  };

 private:
  void run();

  const std::chrono::milliseconds limit_;
  const Expire on_expire_;
  std::atomic<int64_t> since_ns_{0};         // steady-clock start of the call in progress (0: none)
  std::atomic<const char*> call_{nullptr};
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace ballast::dist

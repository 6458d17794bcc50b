#pragma once
// In-process ranks: G communicators sharing memory, one per rank, each used by that rank's thread.
// Collectives meet at a generation-counted barrier and read each other's buffers directly;
// exchange() goes through per-destination mailboxes (sends are copied, receives block until
// matched). A failure anywhere can abort the world: every waiting and later call then throws
// ballast::Error("rank R failed: ..."), so no rank waits forever for one that died.
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "ballast/dist/communicator.h"

namespace ballast::dist {

class ThreadWorld {
 public:
  // timeout: how long any one call may wait for the other ranks before the world is aborted
  // with a message naming who never arrived (zero: wait forever). Meant for tests and debugging.
  explicit ThreadWorld(int size, std::chrono::milliseconds timeout = std::chrono::milliseconds{0});
  ~ThreadWorld();
  ThreadWorld(const ThreadWorld&) = delete;
  ThreadWorld& operator=(const ThreadWorld&) = delete;

  int size() const;
  // The communicator of `rank`; valid as long as the world. Use each from one thread at a time.
  Communicator& communicator(int rank);

  // Wakes every waiting rank; they and every later call throw Error("rank R failed: why").
  // The first abort wins; a world cannot be used again after it.
  void abort(int rank, const std::string& why);
  bool aborted() const;
  std::string abort_reason() const;  // empty while not aborted

  struct State;

 private:
  std::shared_ptr<State> state_;
  std::vector<std::unique_ptr<Communicator>> comms_;
};

// Runs fn(communicator(r)) for every rank r on its own thread and waits for all. When a rank
// throws, the world is aborted (so the others stop waiting) and, after every thread has ended,
// the first exception thrown is rethrown.
void run_ranks(ThreadWorld& world, const std::function<void(Communicator&)>& fn);
void run_ranks(int size, const std::function<void(Communicator&)>& fn);

}  // namespace ballast::dist

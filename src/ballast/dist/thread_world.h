#pragma once
// In-process ranks: G ranks sharing memory, each with a control-plane Communicator and a DataPlane,
// each used by one thread at a time. Collectives meet at a generation-counted barrier (one per
// plane) and read each other's buffers directly; point-to-point sends wait, uncopied, in the
// receiver's mailbox until it copies them out (a send is done when it has been received, as with
// MPI's rendezvous). A failure anywhere can abort the world: every waiting and later call then
// throws ballast::Error("rank R failed: ..."), so no rank waits forever for one that died.
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "ballast/dist/communicator.h"
#include "ballast/dist/data_plane.h"

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
  // The control plane of `rank`; valid as long as the world. Use each from one thread at a time.
  Communicator& communicator(int rank);
  // The data plane of `rank` (host memory only); valid as long as the world, one thread at a time.
  // Its collectives keep their own order, apart from the control plane's. It fails as the MPI one
  // does: bad collective arguments (a recv too small, counts beyond send, ranks passing rows of
  // other sizes) make every rank throw in that call before anything moves (the rank at fault its
  // own message, the others "rank R failed: <message>") and the world goes on; a send_recv size
  // mismatch throws on the receiver. A rank's own bad send_recv arguments (peer out of range, a
  // device buffer) abort the world, since its peers would wait for transfers it never posts.
  // Its on_device(queue) is the same plane for the buffers of a device every rank addresses (one
  // GPU): the same meetings, the bytes moved by each rank's DeviceQueue.
  DataPlane& data_plane(int rank);

  // Wakes every waiting rank; they and every later call throw Error("rank R failed: why") (rank R
  // itself: Error(why)). The first abort wins; a world cannot be used again after it.
  void abort(int rank, const std::string& why);
  bool aborted() const;
  std::string abort_reason() const;  // empty while not aborted

  struct State;

 private:
  std::shared_ptr<State> state_;
  std::vector<std::unique_ptr<Communicator>> comms_;
  std::vector<std::unique_ptr<DataPlane>> planes_;
};

// Runs fn(communicator(r)) for every rank r on its own thread and waits for all. When a rank
// throws, the world is aborted (so the others stop waiting) and, after every thread has ended,
// the first exception thrown is rethrown.
void run_ranks(ThreadWorld& world, const std::function<void(Communicator&)>& fn);
void run_ranks(int size, const std::function<void(Communicator&)>& fn);

}  // namespace ballast::dist

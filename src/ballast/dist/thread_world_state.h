#pragma once
// What a ThreadWorld's ranks share (internal to dist/): the abort every wait watches, one meeting
// per plane (a generation-counted barrier at which the last rank to arrive checks and combines
// what all brought), and the mailboxes of point-to-point sends. thread_world.cpp builds the
// control plane on it, thread_data_plane.cpp the data plane. The planes meet separately, as two
// MPI communicators or an MPI and an NCCL one would: each keeps its own order of collectives.
#include <fmt/format.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "ballast/core/dtype.h"
#include "ballast/core/error.h"
#include "ballast/dist/data_plane.h"
#include "ballast/dist/thread_world.h"

namespace ballast::dist {

namespace thread_detail {

enum class Op : uint8_t { barrier, sum_i64, sum_f64, any, all_gather, all_to_all_v, gather, reduce };

const char* op_name(Op op);

// What a rank brings to a collective; written by the rank before it arrives, read by the others
// only between the first and the second meeting of that collective (or by the last to arrive).
struct Contribution {
  Op op = Op::barrier;
  const void* ptr = nullptr;
  size_t n = 0;
  bool flag = false;
  // Data plane: layout, and for all_to_all_v the rows to each rank and recv's room.
  DType dtype = DType::F32;
  size_t row_bytes = 0;
  const int64_t* counts = nullptr;
  int64_t recv_rows = 0;
  const void* ready = nullptr;  // on a device: the mark of the work that wrote ptr (null: done)
  // Counts on the device (a queue in a graph pass): the send counts' address, the rows send
  // holds, and the most rows the rank may receive (-1: what its sources hold).
  const void* device_counts = nullptr;
  int64_t send_rows = 0, receives_at_most = -1;
  const std::string* error = nullptr;  // what is wrong with the rank's own arguments
};

// Why the world stopped: `reason` for every rank but `culprit` (the rank at fault, -1 if none is),
// which gets its own message `what`.
struct Fault {
  std::string reason;
  int culprit = -1;
  std::string what;
};

struct Meeting {
  Meeting(int size, const char* plane) : plane(plane), arrived_op(size), here(size, false), mine(size), marks(size) {}

  const char* plane;  // for messages: "" (control) or " (data plane)"
  std::mutex mu;
  std::condition_variable cv;
  uint64_t generation = 0;
  int arrived = 0;
  std::vector<Op> arrived_op;  // what each rank arrived for, this generation
  std::vector<bool> here;      // who has arrived, this generation
  std::vector<Contribution> mine;
  // Results of the last rank to arrive; they stay valid until the next collective of this meeting
  // completes, which cannot happen before every rank has read them.
  std::vector<int64_t> sum_i64;
  std::vector<double> sum_f64;
  bool any = false;
  std::vector<std::byte> sum;   // data plane all_reduce_sum
  std::vector<int64_t> matrix;  // all_to_all_v: rows from src to dst at [src * G + dst]
  // On a device (the data plane's on_device): each rank's DeviceQueue mark once its copies out of
  // the others' buffers are queued, written before the second meeting and read by the senders
  // right after it (a rank writes its entry again only after the next first meeting, which waits
  // for every reader).
  std::vector<const void*> marks;
  // A collective every rank fails without stopping the world (bad arguments): what each throws,
  // by rank; empty when the collective goes ahead.
  std::vector<std::string> verdict;
};

// A send waiting for its receiver. It lives in the sender's send_recv call, which does not return
// before the receiver has copied it out (or it was withdrawn, unseen, from the receiver's mailbox).
struct Posted {
  const std::byte* data = nullptr;
  int64_t bytes = 0;
  bool done = false;  // under the sender's mailbox mutex
};

struct Mailbox {
  explicit Mailbox(int size) : from(size) {}
  std::mutex mu;
  std::condition_variable cv;            // a send arrived here, or one of this rank's was taken
  std::vector<std::deque<Posted*>> from;  // by sender, in the order sent
};

}  // namespace thread_detail

struct ThreadWorld::State {
  using Op = thread_detail::Op;
  using Fault = thread_detail::Fault;
  using Meeting = thread_detail::Meeting;

  State(int size, std::chrono::milliseconds timeout)
      : size(size), timeout(timeout), control(size, ""), data(size, " (data plane)") {
    for (int r = 0; r < size; ++r) mailboxes.emplace_back(size);
  }

  const int size;
  const std::chrono::milliseconds timeout;

  // Abort: the fault is written once, before `aborted` is set, and never changed after.
  std::mutex abort_mu;
  Fault fault;
  std::atomic<bool> aborted{false};

  Meeting control, data;
  std::deque<thread_detail::Mailbox> mailboxes;  // by receiving rank

  std::optional<std::chrono::steady_clock::time_point> deadline() const {
    if (timeout.count() <= 0) return std::nullopt;
    return std::chrono::steady_clock::now() + timeout;
  }

  [[noreturn]] void throw_aborted(int rank) const {
    throw Error(rank == fault.culprit ? fault.what : fault.reason);
  }
  void throw_if_aborted(int rank) const {
    if (aborted.load(std::memory_order_acquire)) throw_aborted(rank);
  }

  // The first abort wins; every waiting rank wakes.
  void abort(Fault f) {
    {
      std::lock_guard lk(abort_mu);
      if (aborted.load()) return;
      fault = std::move(f);
      aborted.store(true, std::memory_order_release);
    }
    // Take each waiter's mutex so that nobody is between checking the flag and sleeping.
    for (Meeting* m : {&control, &data}) {
      { std::lock_guard lk(m->mu); }
      m->cv.notify_all();
    }
    for (auto& box : mailboxes) {
      { std::lock_guard lk(box.mu); }
      box.cv.notify_all();
    }
  }

  // `rank` found `what` wrong: the world stops (the others get "rank R failed: what"), and it throws.
  [[noreturn]] void fail(int rank, std::string what) {
    abort({fmt::format("rank {} failed: {}", rank, what), rank, what});
    throw Error(what);
  }

  // Waits until every rank has arrived at `m` for `op`. The last to arrive checks that all came for
  // the same op and then runs last() under m.mu; a Fault it returns aborts the world, a verdict
  // it leaves in m.verdict makes every rank throw its entry (the world goes on). A rank that does
  // not arrive within the timeout aborts the world too, naming who is missing.
  template <typename Last>
  void meet(Meeting& m, int rank, Op op, Last&& last) {
    std::unique_lock lk(m.mu);
    throw_if_aborted(rank);
    m.arrived_op[rank] = op;
    m.here[rank] = true;
    const uint64_t gen = m.generation;
    if (++m.arrived == size) {
      m.verdict.clear();
      std::optional<Fault> bad;
      for (int r = 1; r < size && !bad; ++r)
        if (m.arrived_op[r] != m.arrived_op[0])
          bad = Fault{fmt::format("collective mismatch{}: rank 0 called {} while rank {} called {}", m.plane,
                                  op_name(m.arrived_op[0]), r, op_name(m.arrived_op[r]))};
      if (!bad) bad = last();
      if (bad) {
        lk.unlock();
        abort(std::move(*bad));
        throw_aborted(rank);
      }
      m.arrived = 0;
      std::fill(m.here.begin(), m.here.end(), false);
      ++m.generation;
      const std::string failed = m.verdict.empty() ? std::string() : m.verdict[rank];
      const bool fails = !m.verdict.empty();
      lk.unlock();
      m.cv.notify_all();
      if (fails) throw Error(failed);
      return;
    }
    auto done = [&] { return m.generation != gen || aborted.load(); };
    if (auto until = deadline()) {
      if (!m.cv.wait_until(lk, *until, done)) {
        std::string missing;
        for (int r = 0; r < size; ++r)
          if (!m.here[r]) missing += fmt::format("{}{}", missing.empty() ? "" : ", ", r);
        lk.unlock();
        abort({fmt::format("rank {} waited {} ms in {}{}; rank(s) {} never arrived", rank, timeout.count(),
                           op_name(op), m.plane, missing)});
        throw_aborted(rank);
      }
    } else {
      m.cv.wait(lk, done);
    }
    if (m.generation == gen) throw_aborted(rank);
    // The verdict stays until the next collective of `m` completes, which needs this rank.
    if (!m.verdict.empty()) throw Error(m.verdict[rank]);
  }
  void meet(Meeting& m, int rank, Op op) {
    meet(m, rank, op, [] { return std::optional<Fault>(); });
  }
};

// The data plane of `rank` (thread_data_plane.cpp).
std::unique_ptr<DataPlane> make_thread_data_plane(std::shared_ptr<ThreadWorld::State> state, int rank);

}  // namespace ballast::dist

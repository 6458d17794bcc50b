#include "ballast/dist/thread_world.h"

#include <fmt/format.h>

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <optional>
#include <thread>

#include "ballast/core/error.h"

namespace ballast::dist {

namespace {

enum class Op : uint8_t { barrier, sum_i64, sum_f64, any, all_to_all, all_gather };

const char* op_name(Op op) {
  switch (op) {
    case Op::barrier: return "barrier";
    case Op::sum_i64: return "all_reduce_sum(int64)";
    case Op::sum_f64: return "all_reduce_sum(double)";
    case Op::any: return "all_reduce_or";
    case Op::all_to_all: return "all_to_all";
    case Op::all_gather: return "all_gather";
  }
  return "?";
}

// What a rank brings to a collective; written by the rank before it arrives, read by the others
// only between the first and the second meeting of that collective.
struct Contribution {
  Op op = Op::barrier;
  const void* ptr = nullptr;
  size_t n = 0;
  bool flag = false;
};

}  // namespace

struct ThreadWorld::State {
  explicit State(int size, std::chrono::milliseconds timeout)
      : size(size), timeout(timeout), arrived_op(size), here(size, false), mine(size), inboxes(size) {}

  const int size;
  const std::chrono::milliseconds timeout;

  // Abort: reason is written once, before `aborted` is set, and never changed after.
  std::mutex abort_mu;
  std::string reason;
  std::atomic<bool> aborted{false};

  // Collectives.
  std::mutex mu;
  std::condition_variable cv;
  uint64_t generation = 0;
  int arrived = 0;
  std::vector<Op> arrived_op;  // what each rank arrived for, this generation
  std::vector<bool> here;      // who has arrived, this generation
  std::vector<Contribution> mine;
  // Reductions are done once, by the last rank to arrive, into these; they stay valid until the
  // next collective completes, which cannot happen before every rank has read them.
  std::vector<int64_t> sum_i64;
  std::vector<double> sum_f64;
  bool any = false;

  // Point-to-point: one inbox per destination, a FIFO per (source, tag).
  struct Inbox {
    std::mutex mu;
    std::condition_variable cv;
    std::map<std::pair<int, int>, std::deque<Bytes>> queues;
  };
  std::vector<Inbox> inboxes;

  std::optional<std::chrono::steady_clock::time_point> deadline() const {
    if (timeout.count() <= 0) return std::nullopt;
    return std::chrono::steady_clock::now() + timeout;
  }

  [[noreturn]] void throw_aborted() { throw Error(reason); }
  void throw_if_aborted() {
    if (aborted.load(std::memory_order_acquire)) throw_aborted();
  }

  void abort(std::string message) {
    {
      std::lock_guard lk(abort_mu);
      if (aborted.load()) return;
      reason = std::move(message);
      aborted.store(true, std::memory_order_release);
    }
    // Take each waiter's mutex so that nobody is between checking the flag and sleeping.
    {
      std::lock_guard lk(mu);
    }
    cv.notify_all();
    for (auto& in : inboxes) {
      {
        std::lock_guard lk(in.mu);
      }
      in.cv.notify_all();
    }
  }

  // Checks that every rank arrived for the same thing; called by the last to arrive, under mu.
  std::optional<std::string> mismatch() const {
    for (int r = 1; r < size; ++r)
      if (arrived_op[r] != arrived_op[0])
        return fmt::format("collective mismatch: rank 0 called {} while rank {} called {}",
                           op_name(arrived_op[0]), r, op_name(arrived_op[r]));
    const Op op = arrived_op[0];
    if (op == Op::sum_i64 || op == Op::sum_f64) {
      for (int r = 1; r < size; ++r)
        if (mine[r].n != mine[0].n)
          return fmt::format("{}: rank 0 passed {} elements, rank {} passed {}", op_name(op),
                             mine[0].n, r, mine[r].n);
    }
    if (op == Op::all_to_all) {
      for (int r = 0; r < size; ++r)
        if (mine[r].n != static_cast<size_t>(size))
          return fmt::format("all_to_all: rank {} passed {} send buffers for {} ranks", r, mine[r].n,
                             size);
    }
    return std::nullopt;
  }

  // Runs the reduction of the collective every rank has just arrived for; under mu.
  void reduce(Op op) {
    if (op == Op::sum_i64) {
      sum_i64.assign(mine[0].n, 0);
      for (int r = 0; r < size; ++r) {
        auto* p = static_cast<const int64_t*>(mine[r].ptr);
        for (size_t i = 0; i < sum_i64.size(); ++i) sum_i64[i] += p[i];
      }
    } else if (op == Op::sum_f64) {
      // Rank order, so the result is the same bits for every rank and every run.
      sum_f64.assign(mine[0].n, 0.0);
      for (int r = 0; r < size; ++r) {
        auto* p = static_cast<const double*>(mine[r].ptr);
        for (size_t i = 0; i < sum_f64.size(); ++i) sum_f64[i] += p[i];
      }
    } else if (op == Op::any) {
      any = false;
      for (int r = 0; r < size; ++r) any = any || mine[r].flag;
    }
  }

  // Waits until every rank has arrived for `op`. The last to arrive validates and reduces.
  void meet(int rank, Op op, bool reduce_now) {
    std::unique_lock lk(mu);
    throw_if_aborted();
    arrived_op[rank] = op;
    here[rank] = true;
    const uint64_t gen = generation;
    if (++arrived == size) {
      if (auto bad = mismatch()) {
        lk.unlock();
        abort(*bad);
        throw_aborted();
      }
      if (reduce_now) reduce(op);
      arrived = 0;
      std::fill(here.begin(), here.end(), false);
      ++generation;
      lk.unlock();
      cv.notify_all();
      return;
    }
    auto done = [&] { return generation != gen || aborted.load(); };
    if (auto until = deadline()) {
      if (!cv.wait_until(lk, *until, done)) {
        std::string missing;
        for (int r = 0; r < size; ++r)
          if (!here[r]) missing += fmt::format("{}{}", missing.empty() ? "" : ", ", r);
        lk.unlock();
        abort(fmt::format("rank {} waited {} ms in {}; rank(s) {} never arrived", rank,
                          timeout.count(), op_name(op), missing));
        throw_aborted();
      }
    } else {
      cv.wait(lk, done);
    }
    if (generation == gen) throw_aborted();
  }
};

namespace {

class ThreadCommunicator final : public Communicator {
 public:
  ThreadCommunicator(std::shared_ptr<ThreadWorld::State> s, int rank) : s_(std::move(s)), rank_(rank) {}

  int rank() const override { return rank_; }
  int size() const override { return s_->size; }

  void barrier() override { s_->meet(rank_, Op::barrier, false); }

  void all_reduce_sum(std::span<int64_t> data) override {
    s_->mine[rank_] = {Op::sum_i64, data.data(), data.size(), false};
    s_->meet(rank_, Op::sum_i64, true);
    std::memcpy(data.data(), s_->sum_i64.data(), data.size_bytes());
  }

  void all_reduce_sum(std::span<double> data) override {
    s_->mine[rank_] = {Op::sum_f64, data.data(), data.size(), false};
    s_->meet(rank_, Op::sum_f64, true);
    std::memcpy(data.data(), s_->sum_f64.data(), data.size_bytes());
  }

  bool all_reduce_or(bool flag) override {
    s_->mine[rank_] = {Op::any, nullptr, 0, flag};
    s_->meet(rank_, Op::any, true);
    return s_->any;
  }

  std::vector<Bytes> all_to_all(const std::vector<Bytes>& send) override {
    s_->mine[rank_] = {Op::all_to_all, &send, send.size(), false};
    s_->meet(rank_, Op::all_to_all, false);
    std::vector<Bytes> recv(s_->size);
    for (int src = 0; src < s_->size; ++src)
      recv[src] = (*static_cast<const std::vector<Bytes>*>(s_->mine[src].ptr))[rank_];
    s_->meet(rank_, Op::all_to_all, false);  // nobody returns (and frees `send`) before all read it
    return recv;
  }

  std::vector<Bytes> all_gather(const Bytes& mine) override {
    s_->mine[rank_] = {Op::all_gather, &mine, mine.size(), false};
    s_->meet(rank_, Op::all_gather, false);
    std::vector<Bytes> all(s_->size);
    for (int src = 0; src < s_->size; ++src) all[src] = *static_cast<const Bytes*>(s_->mine[src].ptr);
    s_->meet(rank_, Op::all_gather, false);
    return all;
  }

  void exchange(std::span<const SendItem> sends, std::span<const RecvItem> recvs) override {
    s_->throw_if_aborted();
    for (auto& it : sends)
      check(it.peer >= 0 && it.peer < s_->size, "exchange: rank {} sends to rank {} of {}", rank_,
            it.peer, s_->size);
    for (auto& it : recvs)
      check(it.peer >= 0 && it.peer < s_->size, "exchange: rank {} receives from rank {} of {}",
            rank_, it.peer, s_->size);
    for (auto& it : sends) {
      Bytes copy(it.data.begin(), it.data.end());
      auto& in = s_->inboxes[it.peer];
      {
        std::lock_guard lk(in.mu);
        in.queues[{rank_, it.tag}].push_back(std::move(copy));
      }
      in.cv.notify_all();
    }
    auto& in = s_->inboxes[rank_];
    const auto until = s_->deadline();
    for (auto& it : recvs) {
      Bytes got;
      {
        std::unique_lock lk(in.mu);
        auto& q = in.queues[{it.peer, it.tag}];
        auto ready = [&] { return !q.empty() || s_->aborted.load(); };
        if (until) {
          if (!in.cv.wait_until(lk, *until, ready)) {
            lk.unlock();
            s_->abort(fmt::format("rank {} waited {} ms in exchange for {} bytes from rank {} tag {}",
                                  rank_, s_->timeout.count(), it.data.size(), it.peer, it.tag));
            s_->throw_aborted();
          }
        } else {
          in.cv.wait(lk, ready);
        }
        if (q.empty()) s_->throw_aborted();
        got = std::move(q.front());
        q.pop_front();
      }
      check(got.size() == it.data.size(),
            "exchange: rank {} expected {} bytes from rank {} tag {}, the sender sent {}", rank_,
            it.data.size(), it.peer, it.tag, got.size());
      if (!got.empty()) std::memcpy(it.data.data(), got.data(), got.size());
    }
  }

 private:
  std::shared_ptr<ThreadWorld::State> s_;
  int rank_;
};

}  // namespace

ThreadWorld::ThreadWorld(int size, std::chrono::milliseconds timeout) {
  check(size >= 1, "ThreadWorld: size must be at least 1, got {}", size);
  state_ = std::make_shared<State>(size, timeout);
  for (int r = 0; r < size; ++r) comms_.push_back(std::make_unique<ThreadCommunicator>(state_, r));
}

ThreadWorld::~ThreadWorld() = default;

int ThreadWorld::size() const { return state_->size; }

Communicator& ThreadWorld::communicator(int rank) {
  check(rank >= 0 && rank < size(), "ThreadWorld: no rank {} in a world of {}", rank, size());
  return *comms_[rank];
}

void ThreadWorld::abort(int rank, const std::string& why) {
  state_->abort(fmt::format("rank {} failed: {}", rank, why));
}

bool ThreadWorld::aborted() const { return state_->aborted.load(std::memory_order_acquire); }

std::string ThreadWorld::abort_reason() const { return aborted() ? state_->reason : std::string(); }

void run_ranks(ThreadWorld& world, const std::function<void(Communicator&)>& fn) {
  std::mutex mu;
  std::exception_ptr first;
  auto body = [&](int r) {
    try {
      fn(world.communicator(r));
    } catch (...) {
      std::string what = "unknown exception";
      try {
        throw;
      } catch (const std::exception& e) {
        what = e.what();
      } catch (...) {
      }
      {
        // Recorded before the abort, so a rank that fails only because of it comes second.
        std::lock_guard lk(mu);
        if (!first) first = std::current_exception();
      }
      world.abort(r, what);
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(world.size());
  try {
    for (int r = 0; r < world.size(); ++r) threads.emplace_back(body, r);
  } catch (...) {
    world.abort(-1, "could not start rank threads");
    for (auto& t : threads) t.join();
    throw;
  }
  for (auto& t : threads) t.join();
  if (first) std::rethrow_exception(first);
}

void run_ranks(int size, const std::function<void(Communicator&)>& fn) {
  ThreadWorld world(size);
  run_ranks(world, fn);
}

}  // namespace ballast::dist

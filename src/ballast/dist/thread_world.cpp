#include "ballast/dist/thread_world.h"

#include <fmt/format.h>

#include <cstring>
#include <exception>
#include <mutex>
#include <thread>

#include "ballast/core/error.h"
#include "ballast/dist/thread_world_state.h"

namespace ballast::dist {

namespace thread_detail {

const char* op_name(Op op) {
  switch (op) {
    case Op::barrier: return "barrier";
    case Op::sum_i64: return "all_reduce_sum(int64)";
    case Op::sum_f64: return "all_reduce_sum(double)";
    case Op::any: return "all_reduce_or";
    case Op::all_gather: return "all_gather";
    case Op::all_to_all_v: return "all_to_all_v";
    case Op::gather: return "all_gather";
    case Op::reduce: return "all_reduce_sum";
  }
  return "?";
}

}  // namespace thread_detail

namespace {

using thread_detail::Fault;
using thread_detail::Op;

// Every rank must pass as many elements as rank 0; called by the last to arrive.
std::optional<Fault> same_length(const thread_detail::Meeting& m, int size, Op op) {
  for (int r = 1; r < size; ++r)
    if (m.mine[r].n != m.mine[0].n)
      return Fault{fmt::format("{}: rank 0 passed {} elements, rank {} passed {}", thread_detail::op_name(op),
                               m.mine[0].n, r, m.mine[r].n)};
  return std::nullopt;
}

class ThreadCommunicator final : public Communicator {
 public:
  ThreadCommunicator(std::shared_ptr<ThreadWorld::State> s, int rank) : s_(std::move(s)), rank_(rank) {}

  int rank() const override { return rank_; }
  int size() const override { return s_->size; }

  void barrier() override { s_->meet(m(), rank_, Op::barrier); }

  void all_reduce_sum(std::span<int64_t> data) override {
    m().mine[rank_] = {Op::sum_i64, data.data(), data.size()};
    s_->meet(m(), rank_, Op::sum_i64, [&]() -> std::optional<Fault> {
      if (auto bad = same_length(m(), s_->size, Op::sum_i64)) return bad;
      m().sum_i64.assign(data.size(), 0);
      for (int r = 0; r < s_->size; ++r) {
        auto* p = static_cast<const int64_t*>(m().mine[r].ptr);
        for (size_t i = 0; i < data.size(); ++i) m().sum_i64[i] += p[i];
      }
      return std::nullopt;
    });
    if (!data.empty()) std::memcpy(data.data(), m().sum_i64.data(), data.size_bytes());
  }

  void all_reduce_sum(std::span<double> data) override {
    m().mine[rank_] = {Op::sum_f64, data.data(), data.size()};
    s_->meet(m(), rank_, Op::sum_f64, [&]() -> std::optional<Fault> {
      if (auto bad = same_length(m(), s_->size, Op::sum_f64)) return bad;
      // Rank order, so the result is the same bits for every rank and every run.
      m().sum_f64.assign(data.size(), 0.0);
      for (int r = 0; r < s_->size; ++r) {
        auto* p = static_cast<const double*>(m().mine[r].ptr);
        for (size_t i = 0; i < data.size(); ++i) m().sum_f64[i] += p[i];
      }
      return std::nullopt;
    });
    if (!data.empty()) std::memcpy(data.data(), m().sum_f64.data(), data.size_bytes());
  }

  bool all_reduce_or(bool flag) override {
    m().mine[rank_] = {Op::any, nullptr, 0, flag};
    s_->meet(m(), rank_, Op::any, [&]() -> std::optional<Fault> {
      m().any = false;
      for (int r = 0; r < s_->size; ++r) m().any = m().any || m().mine[r].flag;
      return std::nullopt;
    });
    return m().any;
  }

  std::vector<Bytes> all_gather(const Bytes& mine) override {
    m().mine[rank_] = {Op::all_gather, &mine, mine.size()};
    s_->meet(m(), rank_, Op::all_gather);
    std::vector<Bytes> all(s_->size);
    for (int src = 0; src < s_->size; ++src) all[src] = *static_cast<const Bytes*>(m().mine[src].ptr);
    s_->meet(m(), rank_, Op::all_gather);  // nobody returns (and frees `mine`) before all read it
    return all;
  }

 private:
  thread_detail::Meeting& m() { return s_->control; }

  std::shared_ptr<ThreadWorld::State> s_;
  int rank_;
};

}  // namespace

ThreadWorld::ThreadWorld(int size, std::chrono::milliseconds timeout) {
  check(size >= 1, "ThreadWorld: size must be at least 1, got {}", size);
  state_ = std::make_shared<State>(size, timeout);
  for (int r = 0; r < size; ++r) {
    comms_.push_back(std::make_unique<ThreadCommunicator>(state_, r));
    planes_.push_back(make_thread_data_plane(state_, r));
  }
}

ThreadWorld::~ThreadWorld() = default;

int ThreadWorld::size() const { return state_->size; }

Communicator& ThreadWorld::communicator(int rank) {
  check(rank >= 0 && rank < size(), "ThreadWorld: no rank {} in a world of {}", rank, size());
  return *comms_[rank];
}

DataPlane& ThreadWorld::data_plane(int rank) {
  check(rank >= 0 && rank < size(), "ThreadWorld: no rank {} in a world of {}", rank, size());
  return *planes_[rank];
}

void ThreadWorld::abort(int rank, const std::string& why) {
  state_->abort({fmt::format("rank {} failed: {}", rank, why), rank, why});
}

bool ThreadWorld::aborted() const { return state_->aborted.load(std::memory_order_acquire); }

std::string ThreadWorld::abort_reason() const { return aborted() ? state_->fault.reason : std::string(); }

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

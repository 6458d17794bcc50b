#include "ballast/core/thread_pool.h"

#include <algorithm>
#include <chrono>

#include "ballast/core/error.h"

namespace ballast {

namespace {
constexpr int kSpinMicros = 200;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Spins until done() or kSpinMicros pass; true when done() held.
template <typename Done>
bool spin_until(const Done& done) {
  const auto end = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (done()) return true;
      cpu_relax();
    }
    if (std::chrono::steady_clock::now() >= end) return done();
  }
}
}  // namespace

ThreadPool::ThreadPool(int num_threads) {
  if (num_threads <= 0) num_threads = int(std::max(1u, std::thread::hardware_concurrency()));
  try {
    for (int i = 0; i + 1 < num_threads; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
  } catch (const std::exception& e) {
    // The destructor will not run: stop the workers already started, or they wait for ever.
    const size_t started = workers_.size();
    stop_workers();
    fail("cannot start {} threads (started {}): {}", num_threads, started + 1, e.what());
  }
}

ThreadPool::~ThreadPool() { stop_workers(); }

void ThreadPool::stop_workers() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
    stopping_.store(true, std::memory_order_release);
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
  workers_.clear();
}

void ThreadPool::parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn,
                              int64_t grain) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  int64_t chunks = std::min<int64_t>(size() * 4, (n + grain - 1) / grain);
  if (chunks <= 1 || workers_.empty()) {
    fn(0, n);
    return;
  }
  int64_t chunk = (n + chunks - 1) / chunks;
  chunks = (n + chunk - 1) / chunk;
  std::unique_lock<std::mutex> lk(mu_);
  job_ = &fn;
  job_n_ = n;
  job_chunk_ = chunk;
  job_chunks_ = chunks;
  next_chunk_ = 0;
  finished_chunks_ = 0;
  const uint64_t gen = ++generation_;
  posted_.store(gen, std::memory_order_release);
  wake_.notify_all();
  while (next_chunk_ < job_chunks_) {
    int64_t c = next_chunk_++;
    lk.unlock();
    fn(c * chunk, std::min(n, (c + 1) * chunk));
    lk.lock();
    if (++finished_chunks_ == job_chunks_) done_generation_.store(gen, std::memory_order_release);
  }
  if (finished_chunks_ != job_chunks_) {
    lk.unlock();
    spin_until([&] { return done_generation_.load(std::memory_order_acquire) == gen; });
    lk.lock();
  }
  done_.wait(lk, [&] { return finished_chunks_ == job_chunks_; });
  job_ = nullptr;
}

void ThreadPool::worker_loop(int) {
  uint64_t seen = 0;
  std::unique_lock<std::mutex> lk(mu_);
  const auto has_work = [&] { return generation_ != seen && job_ && next_chunk_ < job_chunks_; };
  for (;;) {
    if (!stop_ && !has_work()) {
      seen = generation_;  // nothing (left) to do for this job: wait for the next one
      lk.unlock();
      spin_until([&] {
        return stopping_.load(std::memory_order_acquire) || posted_.load(std::memory_order_acquire) != seen;
      });
      lk.lock();
    }
    wake_.wait(lk, [&] { return stop_ || has_work(); });
    if (stop_) return;
    while (job_ && next_chunk_ < job_chunks_) {
      int64_t c = next_chunk_++;
      const auto* fn = job_;
      int64_t n = job_n_, chunk = job_chunk_;
      lk.unlock();
      (*fn)(c * chunk, std::min(n, (c + 1) * chunk));
      lk.lock();
      if (++finished_chunks_ == job_chunks_) {
        done_generation_.store(generation_, std::memory_order_release);
        done_.notify_all();
      }
    }
    seen = generation_;
  }
}

}  // namespace ballast

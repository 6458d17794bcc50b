#include "ballast/core/thread_pool.h"

#include <algorithm>

#include "ballast/core/error.h"

namespace ballast {

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
  ++generation_;
  wake_.notify_all();
  while (next_chunk_ < job_chunks_) {
    int64_t c = next_chunk_++;
    lk.unlock();
    fn(c * chunk, std::min(n, (c + 1) * chunk));
    lk.lock();
    ++finished_chunks_;
  }
  done_.wait(lk, [&] { return finished_chunks_ == job_chunks_; });
  job_ = nullptr;
}

void ThreadPool::worker_loop(int) {
  uint64_t seen = 0;
  std::unique_lock<std::mutex> lk(mu_);
  for (;;) {
    wake_.wait(lk, [&] { return stop_ || (generation_ != seen && job_ && next_chunk_ < job_chunks_); });
    if (stop_) return;
    while (job_ && next_chunk_ < job_chunks_) {
      int64_t c = next_chunk_++;
      const auto* fn = job_;
      int64_t n = job_n_, chunk = job_chunk_;
      lk.unlock();
      (*fn)(c * chunk, std::min(n, (c + 1) * chunk));
      lk.lock();
      if (++finished_chunks_ == job_chunks_) done_.notify_all();
    }
    seen = generation_;
  }
}

}  // namespace ballast

#pragma once
// A fixed pool of worker threads with a blocking parallel_for. Owned by whoever needs it
// (the engine holds one per rank); there is no process-wide pool. Idle workers, and a caller
// waiting for the last chunks, spin for a short while (kSpinMicros) before they sleep: a forward
// pass runs a hundred parallel ops in a few milliseconds, and a sleeping thread's wake-up (a
// futex, an interrupt to a halted virtual CPU) costs more than many of those ops.
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace ballast {

class ThreadPool {
 public:
  // 0 = hardware concurrency. Throws Error (no thread left running) when the threads cannot start.
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return int(workers_.size()) + 1; }

  // Calls fn(begin, end) on disjoint chunks covering [0, n); the caller's thread works too.
  // Chunks hold at least `grain` items.
  void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn, int64_t grain = 1);

 private:
  void worker_loop(int index);
  void stop_workers();

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable wake_, done_;
  const std::function<void(int64_t, int64_t)>* job_ = nullptr;
  int64_t job_n_ = 0, job_chunk_ = 0, job_chunks_ = 0;
  int64_t next_chunk_ = 0, finished_chunks_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
  // Mirrors of generation_, stop_ and the finished job's generation, read without the lock
  // while spinning; written under it.
  std::atomic<uint64_t> posted_{0}, done_generation_{0};
  std::atomic<bool> stopping_{false};
};

}  // namespace ballast

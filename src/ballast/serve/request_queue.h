#pragma once
// The only door between HTTP threads and the engine: HTTP threads submit requests, cancel them and
// send commands; the engine loop (one thread, rank 0's) takes what arrived before each pass and
// answers through each request's RequestStream and each command's future. No engine state is
// reachable from here. The queue is bounded: requests in flight (submitted and not yet finished)
// never exceed its capacity, beyond which a submission is refused (HTTP 503 with Retry-After).
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "ballast/eplb/load.h"
#include "ballast/runtime/sequence.h"

namespace ballast::serve {

using Clock = std::chrono::steady_clock;

// How a request ended, as the server reports it (metrics label, finish reasons).
enum class Outcome { stop, length, abort, timeout, error };
std::string_view outcome_name(Outcome o);  // "stop", "length", "abort", "timeout", "error"

// What arrived for a request since its reader last looked.
struct StreamUpdate {
  std::vector<int32_t> tokens;
  std::vector<runtime::TokenLogprobs> logprobs;  // one per token when the request asked
  bool finished = false;
  Outcome outcome = Outcome::stop;
  std::string error;  // Outcome::error: why
};

// One request's channel back from the engine loop to the HTTP thread serving it.
class RequestStream {
 public:
  // Engine loop.
  void push(std::span<const int32_t> tokens, std::span<const runtime::TokenLogprobs> logprobs);
  void finish(Outcome outcome, std::string error = {});
  // HTTP thread: waits up to `wait` for news and takes it (empty when nothing came).
  StreamUpdate take(std::chrono::milliseconds wait);

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  StreamUpdate pending_;
  bool done_ = false;  // finish() was called (pending_.finished once taken)
};

// A request as an HTTP thread hands it over (tokenised and validated).
struct Submission {
  runtime::Request request;
  Clock::time_point arrival;
  std::optional<Clock::time_point> deadline;  // --request-timeout
  std::shared_ptr<RequestStream> stream;
  uint64_t id = 0;  // set by submit()
};

// Operations on the engine's state that endpoints ask for; run between passes by every rank.
enum class Command { start_record, stop_record, dump_record, flush_cache };
struct CommandResult {
  bool ok = true;
  std::string message;              // what happened, or why not
  std::optional<eplb::LoadTrace> load;  // dump_record: the trunk's recorded load
};

class RequestQueue {
 public:
  explicit RequestQueue(size_t capacity);

  enum class Refusal { none, full, stopping };
  // HTTP threads. submit() gives the request its id, or refuses it (nothing queued).
  Refusal submit(Submission& s);
  // Ends a request at the next pass (the client left, or a stop string matched).
  void cancel(uint64_t id, Outcome why);
  std::future<CommandResult> command(Command c);

  // The engine loop: what arrived since the last take(), waiting up to `wait` when nothing has.
  struct Taken {
    std::vector<Submission> submitted;
    std::vector<std::pair<uint64_t, Outcome>> cancelled;
    std::vector<std::pair<Command, std::promise<CommandResult>>> commands;
  };
  Taken take(std::chrono::milliseconds wait);
  // A request left the engine: its place in the queue's capacity is free again.
  void release(size_t n = 1);

  // From now on submissions are refused (shutdown); wakes the loop.
  void stop_accepting();
  bool accepting() const;
  size_t in_flight() const;
  size_t capacity() const { return capacity_; }
  size_t waiting() const;  // submitted, not yet taken by the loop

 private:
  const size_t capacity_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  uint64_t next_id_ = 1;
  size_t in_flight_ = 0;
  bool accepting_ = true;
  Taken pending_;
};

}  // namespace ballast::serve

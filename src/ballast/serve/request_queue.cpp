#include "ballast/serve/request_queue.h"

namespace ballast::serve {

std::string_view outcome_name(Outcome o) {
  switch (o) {
    case Outcome::stop: return "stop";
    case Outcome::length: return "length";
    case Outcome::abort: return "abort";
    case Outcome::timeout: return "timeout";
    case Outcome::error: return "error";
  }
  return "error";
}

void RequestStream::push(std::span<const int32_t> tokens, std::span<const runtime::TokenLogprobs> logprobs) {
  {
    std::lock_guard lk(mu_);
    if (done_) return;
    pending_.tokens.insert(pending_.tokens.end(), tokens.begin(), tokens.end());
    pending_.logprobs.insert(pending_.logprobs.end(), logprobs.begin(), logprobs.end());
  }
  cv_.notify_all();
}

void RequestStream::finish(Outcome outcome, std::string error) {
  {
    std::lock_guard lk(mu_);
    if (done_) return;
    done_ = true;
    pending_.finished = true;
    pending_.outcome = outcome;
    pending_.error = std::move(error);
  }
  cv_.notify_all();
}

StreamUpdate RequestStream::take(std::chrono::milliseconds wait) {
  std::unique_lock lk(mu_);
  cv_.wait_for(lk, wait, [&] { return !pending_.tokens.empty() || pending_.finished; });
  StreamUpdate u = std::move(pending_);
  pending_ = {};
  return u;
}

RequestQueue::RequestQueue(size_t capacity) : capacity_(capacity) {}

RequestQueue::Refusal RequestQueue::submit(Submission& s) {
  {
    std::lock_guard lk(mu_);
    if (!accepting_) return Refusal::stopping;
    if (in_flight_ >= capacity_) return Refusal::full;
    ++in_flight_;
    s.id = next_id_++;
    pending_.submitted.push_back(s);
  }
  cv_.notify_all();
  return Refusal::none;
}

void RequestQueue::cancel(uint64_t id, Outcome why) {
  {
    std::lock_guard lk(mu_);
    pending_.cancelled.emplace_back(id, why);
  }
  cv_.notify_all();
}

std::future<CommandResult> RequestQueue::command(Command c) {
  std::promise<CommandResult> p;
  std::future<CommandResult> f = p.get_future();
  {
    std::lock_guard lk(mu_);
    pending_.commands.emplace_back(c, std::move(p));
  }
  cv_.notify_all();
  return f;
}

RequestQueue::Taken RequestQueue::take(std::chrono::milliseconds wait) {
  std::unique_lock lk(mu_);
  cv_.wait_for(lk, wait, [&] {
    return !pending_.submitted.empty() || !pending_.cancelled.empty() || !pending_.commands.empty() || !accepting_;
  });
  Taken t = std::move(pending_);
  pending_ = {};
  return t;
}

void RequestQueue::release(size_t n) {
  std::lock_guard lk(mu_);
  in_flight_ -= std::min(n, in_flight_);
}

void RequestQueue::stop_accepting() {
  {
    std::lock_guard lk(mu_);
    accepting_ = false;
  }
  cv_.notify_all();
}

bool RequestQueue::accepting() const {
  std::lock_guard lk(mu_);
  return accepting_;
}

size_t RequestQueue::in_flight() const {
  std::lock_guard lk(mu_);
  return in_flight_;
}

size_t RequestQueue::waiting() const {
  std::lock_guard lk(mu_);
  return pending_.submitted.size();
}

}  // namespace ballast::serve

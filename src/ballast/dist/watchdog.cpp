#include "ballast/dist/watchdog.h"

#include <fmt/format.h>

#include <algorithm>

namespace ballast::dist {

namespace {
int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
}  // namespace

Watchdog::Watchdog(std::chrono::milliseconds limit, Expire on_expire)
    : limit_(limit), on_expire_(std::move(on_expire)) {
  if (limit_.count() > 0) thread_ = std::thread([this] { run(); });
}

Watchdog::~Watchdog() {
  {
    std::lock_guard lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Watchdog::run() {
  // Checked a few times per limit: a stalled call is reported at most a quarter late.
  const auto period = std::clamp(limit_ / 4, std::chrono::milliseconds(10), std::chrono::milliseconds(1000));
  std::unique_lock lk(mu_);
  while (!cv_.wait_for(lk, period, [&] { return stop_; })) {
    const int64_t since = since_ns_.load();
    if (since == 0) continue;
    const int64_t waited_ms = (now_ns() - since) / 1000000;
    if (waited_ms < limit_.count()) continue;
    const char* call = call_.load();
    lk.unlock();
    on_expire_(fmt::format("waited {:.1f} s in {} for the other ranks, over the limit of {:.1f} s: a rank stopped "
                           "answering",
                           double(waited_ms) / 1e3, call ? call : "a collective", double(limit_.count()) / 1e3));
    return;  // once
  }
}

Watchdog::Scope::Scope(Watchdog* w, const char* call) : w_(w && w->limit_.count() > 0 ? w : nullptr) {
  if (!w_) return;
  w_->call_.store(call);
  w_->since_ns_.store(now_ns());
}

Watchdog::Scope::~Scope() {
  if (w_) w_->since_ns_.store(0);
}

}  // namespace ballast::dist

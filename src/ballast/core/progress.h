#pragma once
// A one-line progress bar on stderr, drawn only when stderr is a terminal (logs and pipes stay
// clean). Header-only so that any area can use it without a link dependency.
#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

namespace ballast {

class ProgressBar {
 public:
  ProgressBar(std::string label, uint64_t total, bool enabled = isatty(fileno(stderr)) != 0)
      : label_(std::move(label)), total_(total), enabled_(enabled), start_(Clock::now()) {}
  ~ProgressBar() { finish(); }
  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;

  // Redraws at most every 100 ms, and always at completion.
  void update(uint64_t done) {
    if (!enabled_ || finished_) return;
    auto now = Clock::now();
    if (done < total_ && drawn_ && now - last_ < std::chrono::milliseconds(100)) return;
    last_ = now;
    drawn_ = true;
    draw(done, now);
  }

  // Ends the line (once); the bar is then inert.
  void finish() {
    if (!enabled_ || finished_) return;
    finished_ = true;
    if (drawn_) fmt::print(stderr, "\n");
  }

 private:
  using Clock = std::chrono::steady_clock;

  void draw(uint64_t done, Clock::time_point now) {
    constexpr int kWidth = 30;
    double frac = total_ ? double(std::min(done, total_)) / double(total_) : 1.0;
    int fill = int(frac * kWidth);
    double secs = std::chrono::duration<double>(now - start_).count();
    double mib = double(done) / (1 << 20);
    fmt::print(stderr, "\r{} [{:<{}}] {:3.0f}% {:.0f}/{:.0f} MiB {:.0f} MiB/s", label_,
               std::string(size_t(fill), '#'), kWidth, frac * 100, mib, double(total_) / (1 << 20),
               secs > 0 ? mib / secs : 0.0);
    std::fflush(stderr);
  }

  std::string label_;
  uint64_t total_;
  bool enabled_;
  bool drawn_ = false, finished_ = false;
  Clock::time_point start_, last_;
};

}  // namespace ballast

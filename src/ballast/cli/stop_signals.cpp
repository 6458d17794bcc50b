#include "ballast/cli/stop_signals.h"

#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <csignal>

#include "ballast/core/error.h"

namespace ballast::cli {

namespace {

// A signal handler can do nothing but write to a descriptor, so the descriptor is this file's one
// static (the process has one set of handlers).
int g_signal_pipe[2] = {-1, -1};

extern "C" void on_stop_signal(int sig) {
  const char c = char(sig);
  [[maybe_unused]] auto n = ::write(g_signal_pipe[1], &c, 1);
}

}  // namespace

StopSignals::StopSignals(std::function<void(int)> on_stop) {
  check(g_signal_pipe[0] < 0, "StopSignals: one at a time per process");
  check(::pipe2(g_signal_pipe, O_CLOEXEC) == 0, "cannot create the signal pipe");
  struct sigaction sa = {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  watcher_ = std::thread([this, on_stop = std::move(on_stop)] {
    pollfd p{g_signal_pipe[0], POLLIN, 0};
    while (!done_.load()) {
      if (::poll(&p, 1, -1) <= 0) continue;
      char c = 0;  // 0: the destructor's wake-up
      if (::read(g_signal_pipe[0], &c, 1) == 1 && c != 0) on_stop(int(c));
    }
  });
}

StopSignals::~StopSignals() {
  done_.store(true);
  const char wake = 0;
  [[maybe_unused]] auto n = ::write(g_signal_pipe[1], &wake, 1);
  watcher_.join();
  std::signal(SIGTERM, SIG_DFL);
  std::signal(SIGINT, SIG_DFL);
  ::close(g_signal_pipe[0]);
  ::close(g_signal_pipe[1]);
  g_signal_pipe[0] = g_signal_pipe[1] = -1;
}

}  // namespace ballast::cli

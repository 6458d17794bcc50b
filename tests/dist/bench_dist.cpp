// Latency and bandwidth of a Communicator: barrier, all_reduce, all_to_all and exchange.
//   bench_dist [G]                      in-process ranks (threads), G = 2 by default
//   mpirun -np G ... bench_dist         MPI processes
// Rank 0 prints one line per measurement: its wall time per call, a barrier before and after.
#include <fmt/format.h>

#include <chrono>
#include <cstdlib>
#include <optional>

#include "ballast/dist/mpi_communicator.h"
#include "ballast/dist/thread_world.h"

using namespace ballast::dist;

namespace {

template <typename F>
double seconds_per(Communicator& c, int iters, F&& f) {
  c.barrier();
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) f();
  c.barrier();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters;
}

void bench(Communicator& c, const char* kind) {
  const int G = c.size(), me = c.rank();
  auto say = [&](const std::string& s) {
    if (me == 0) fmt::print("{} G={} {}\n", kind, G, s);
  };
  say(fmt::format("barrier            {:8.2f} us", 1e6 * seconds_per(c, 2000, [&] { c.barrier(); })));
  std::vector<int64_t> counts(48 * 256, 1);
  say(fmt::format("all_reduce 12288xi64 {:6.2f} us",
                  1e6 * seconds_per(c, 200, [&] { c.all_reduce_sum(std::span<int64_t>(counts)); })));
  for (size_t bytes : {size_t(0), size_t(4096), size_t(256) << 10, size_t(4) << 20}) {
    std::vector<Bytes> send(G, Bytes(bytes));
    const int iters = bytes >= (size_t(1) << 20) ? 20 : 500;
    const double t = seconds_per(c, iters, [&] { c.all_to_all(send); });
    say(fmt::format("all_to_all {:>8} B/pair {:8.2f} us  {:8.2f} GB/s out per rank", bytes, 1e6 * t,
                    t > 0 ? double(bytes) * (G - 1) / t / 1e9 : 0.0));
  }
  if (G >= 2) {
    for (size_t bytes : {size_t(8), size_t(1) << 20, size_t(64) << 20}) {
      Bytes out(bytes), in(bytes);
      const int to = (me + 1) % G, from = (me + G - 1) % G;
      Communicator::SendItem s{to, 1, out};
      Communicator::RecvItem r{from, 1, in};
      const int iters = bytes >= (size_t(16) << 20) ? 5 : 200;
      const double t = seconds_per(c, iters, [&] { c.exchange(std::span(&s, 1), std::span(&r, 1)); });
      say(fmt::format("exchange ring {:>9} B  {:8.2f} us  {:8.2f} GB/s per rank", bytes, 1e6 * t,
                      double(bytes) / t / 1e9));
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (mpi_launched()) {
    MpiSession mpi(&argc, &argv);
    MpiCommunicator c;
    bench(c, "mpi");
    return 0;
  }
  const int G = argc > 1 ? std::atoi(argv[1]) : 2;
  run_ranks(G, [](Communicator& c) { bench(c, "threads"); });
  return 0;
}

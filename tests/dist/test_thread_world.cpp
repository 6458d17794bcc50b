#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <mutex>
#include <random>
#include <string>

#include "ballast/core/error.h"
#include "ballast/dist/mpi_communicator.h"
#include "ballast/dist/thread_world.h"
#include "conformance.h"

using namespace ballast::dist;
using namespace std::chrono_literals;

namespace {

// A bug shows as a failure naming who never arrived, not as a hung test.
constexpr auto kTimeout = 30s;

void run(int G, const std::function<void(Communicator&)>& fn) {
  ThreadWorld world(G, kTimeout);
  run_ranks(world, fn);
}

class ThreadWorldG : public ::testing::TestWithParam<int> {};

TEST_P(ThreadWorldG, RankAndSize) {
  const int G = GetParam();
  std::vector<int> seen(G, 0);
  run(G, [&](Communicator& c) {
    EXPECT_EQ(c.size(), G);
    seen[c.rank()]++;
  });
  for (int r = 0; r < G; ++r) EXPECT_EQ(seen[r], 1);
}

TEST_P(ThreadWorldG, AllReduce) { run(GetParam(), [](Communicator& c) { conformance::all_reduce(c); }); }
TEST_P(ThreadWorldG, AllToAll) { run(GetParam(), [](Communicator& c) { conformance::all_to_all(c); }); }
TEST_P(ThreadWorldG, AllGather) { run(GetParam(), [](Communicator& c) { conformance::all_gather(c); }); }
TEST_P(ThreadWorldG, Exchange) { run(GetParam(), [](Communicator& c) { conformance::exchange(c); }); }
TEST_P(ThreadWorldG, PartialExchange) {
  run(GetParam(), [](Communicator& c) { conformance::partial_exchange(c); });
}

TEST_P(ThreadWorldG, BarrierSynchronises) {
  const int G = GetParam();
  std::atomic<int> count{0};
  run(G, [&](Communicator& c) {
    for (int i = 0; i < 1000; ++i) {
      count.fetch_add(1);
      c.barrier();
      ASSERT_EQ(count.load(), G * (i + 1)) << "iteration " << i;
      c.barrier();
    }
  });
}

TEST_P(ThreadWorldG, Everything) { run(GetParam(), [](Communicator& c) { conformance::everything(c); }); }

// Collectives of random kinds and sizes back to back, the same sequence on every rank.
TEST_P(ThreadWorldG, MixedStress) {
  const int G = GetParam();
  run(G, [&](Communicator& c) {
    std::mt19937 rng(1234);  // same seed: same sequence of calls on every rank
    for (int it = 0; it < 300; ++it) {
      const int kind = int(rng() % 4);
      const size_t n = rng() % 64;
      if (kind == 0) {
        std::vector<int64_t> v(n, c.rank() + 1);
        c.all_reduce_sum(std::span<int64_t>(v));
        for (auto x : v) ASSERT_EQ(x, int64_t(G) * (G + 1) / 2);
      } else if (kind == 1) {
        std::vector<Bytes> send(G);
        for (int d = 0; d < G; ++d) send[d] = conformance::make_bytes((n * (d + 1) + c.rank()) % 50, c.rank(), d, it);
        auto recv = c.all_to_all(send);
        for (int s = 0; s < G; ++s)
          ASSERT_TRUE(conformance::same_bytes(recv[s], (n * (c.rank() + 1) + s) % 50, s, c.rank(), it));
      } else if (kind == 2) {
        auto all = c.all_gather(conformance::make_bytes(n + c.rank(), c.rank(), 0, it));
        for (int s = 0; s < G; ++s) ASSERT_TRUE(conformance::same_bytes(all[s], n + s, s, 0, it));
      } else {
        ASSERT_EQ(c.all_reduce_or(int(n % G) == c.rank()), true);
      }
    }
  });
}

INSTANTIATE_TEST_SUITE_P(G, ThreadWorldG, ::testing::Values(1, 2, 3, 4));

TEST(ThreadWorld, AbortPropagates) {
  // Rank 2 fails; the others are waiting in a barrier, an all_to_all and a receive from rank 2.
  ThreadWorld world(4, kTimeout);
  std::mutex mu;
  std::vector<std::string> seen(4);
  const auto t0 = std::chrono::steady_clock::now();
  const std::string what = conformance::message_of([&] {
    run_ranks(world, [&](Communicator& c) {
      try {
        if (c.rank() == 2) {
          std::this_thread::sleep_for(50ms);
          ballast::fail("boom at pass {}", 7);
        }
        if (c.rank() == 0) c.barrier();
        if (c.rank() == 1) c.all_to_all(std::vector<Bytes>(4));
        if (c.rank() == 3) {
          Bytes got(3);
          Communicator::RecvItem r{2, 0, got};
          c.exchange({}, std::span(&r, 1));
        }
      } catch (const std::exception& e) {
        std::lock_guard lk(mu);
        seen[c.rank()] = e.what();
        throw;
      }
    });
  });
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 10s);
  EXPECT_EQ(what, "boom at pass 7");  // the first failure, not its consequences
  EXPECT_EQ(seen[2], "boom at pass 7");
  for (int r : {0, 1, 3}) EXPECT_EQ(seen[r], "rank 2 failed: boom at pass 7") << "rank " << r;
  EXPECT_TRUE(world.aborted());
  EXPECT_EQ(world.abort_reason(), "rank 2 failed: boom at pass 7");
  // Anything after the abort throws at once.
  EXPECT_THROW(world.communicator(0).barrier(), ballast::Error);
  EXPECT_THROW(world.communicator(1).exchange({}, {}), ballast::Error);
}

TEST(ThreadWorld, AbortWhileOthersAreStillWorking) {
  // Rank 0 fails at once; rank 1 reaches its collective only later and must still not hang.
  ThreadWorld world(2, kTimeout);
  EXPECT_THROW(run_ranks(world,
                         [&](Communicator& c) {
                           if (c.rank() == 0) throw std::runtime_error("early");
                           std::this_thread::sleep_for(50ms);
                           c.all_gather(Bytes(10));
                         }),
               std::runtime_error);
}

TEST(ThreadWorld, NonStandardExceptionIsRethrown) {
  EXPECT_THROW(run_ranks(3,
                         [](Communicator& c) {
                           if (c.rank() == 1) throw 42;
                           c.barrier();
                         }),
               int);
}

TEST(ThreadWorld, CollectiveMismatchIsAnError) {
  std::vector<std::string> seen(2);
  const std::string what = conformance::message_of([&] {
    run(2, [&](Communicator& c) {
      try {
        if (c.rank() == 0) c.barrier();
        else c.all_gather(Bytes(3));
      } catch (const std::exception& e) {
        seen[c.rank()] = e.what();
        throw;
      }
    });
  });
  EXPECT_NE(what.find("collective mismatch: rank 0 called barrier while rank 1 called all_gather"),
            std::string::npos)
      << what;
  EXPECT_EQ(seen[0], seen[1]);
}

TEST(ThreadWorld, ReduceLengthMismatchIsAnError) {
  const std::string what = conformance::message_of([] {
    run(3, [](Communicator& c) {
      std::vector<int64_t> v(c.rank() == 2 ? 4 : 5);
      c.all_reduce_sum(std::span<int64_t>(v));
    });
  });
  EXPECT_NE(what.find("rank 0 passed 5 elements, rank 2 passed 4"), std::string::npos) << what;
}

TEST(ThreadWorld, AllToAllWrongBufferCountIsAnError) {
  const std::string what = conformance::message_of([] {
    run(3, [](Communicator& c) { c.all_to_all(std::vector<Bytes>(c.rank() == 1 ? 2 : 3)); });
  });
  EXPECT_NE(what.find("all_to_all: rank 1 passed 2 send buffers for 3 ranks"), std::string::npos) << what;
}

TEST(ThreadWorld, ExchangeSizeMismatchIsAnError) {
  const std::string what = conformance::message_of([] {
    run(2, [](Communicator& c) {
      Bytes data(10), got(8);
      if (c.rank() == 0) {
        Communicator::SendItem s{1, 7, data};
        c.exchange(std::span(&s, 1), {});
      } else {
        Communicator::RecvItem r{0, 7, got};
        c.exchange({}, std::span(&r, 1));
      }
    });
  });
  EXPECT_EQ(what, "exchange: rank 1 expected 8 bytes from rank 0 tag 7, the sender sent 10");
}

TEST(ThreadWorld, ExchangeBadPeerIsAnError) {
  const std::string what = conformance::message_of([] {
    run(2, [](Communicator& c) {
      Bytes data(1);
      Communicator::SendItem s{2, 0, data};
      if (c.rank() == 1) c.exchange(std::span(&s, 1), {});
    });
  });
  EXPECT_EQ(what, "exchange: rank 1 sends to rank 2 of 2");
}

TEST(ThreadWorld, TimeoutNamesWhoNeverArrived) {
  ThreadWorld world(3, 200ms);
  const std::string what = conformance::message_of([&] {
    run_ranks(world, [](Communicator& c) {
      if (c.rank() != 1) c.barrier();
    });
  });
  EXPECT_NE(what.find("waited 200 ms in barrier; rank(s) 1 never arrived"), std::string::npos) << what;
}

TEST(ThreadWorld, ExchangeTimeoutNamesTheMissingMessage) {
  ThreadWorld world(2, 200ms);
  const std::string what = conformance::message_of([&] {
    run_ranks(world, [](Communicator& c) {
      Bytes got(4);
      Communicator::RecvItem r{1, 3, got};
      if (c.rank() == 0) c.exchange({}, std::span(&r, 1));
    });
  });
  EXPECT_NE(what.find("rank 0 waited 200 ms in exchange for 4 bytes from rank 1 tag 3"), std::string::npos)
      << what;
}

TEST(ThreadWorld, WorldsAreIndependentAndReusable) {
  ThreadWorld a(2, kTimeout), b(2, kTimeout);
  for (int round = 0; round < 3; ++round) {
    run_ranks(a, [](Communicator& c) { conformance::all_to_all(c, 3); });
    run_ranks(b, [](Communicator& c) { conformance::exchange(c); });
  }
}

TEST(ThreadWorld, BadSizeOrRank) {
  EXPECT_THROW(ThreadWorld(0), ballast::Error);
  ThreadWorld w(2);
  EXPECT_THROW(w.communicator(2), ballast::Error);
  EXPECT_THROW(w.communicator(-1), ballast::Error);
}

TEST(MpiLaunched, ReadsTheLauncherEnvironment) {
  // Only meaningful outside mpirun; under it the variables are set already.
  if (std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("PMI_SIZE") || std::getenv("PMI_RANK") ||
      std::getenv("PMIX_RANK") || std::getenv("MV2_COMM_WORLD_SIZE") || std::getenv("MPI_LOCALNRANKS"))
    GTEST_SKIP() << "started under an MPI launcher";
  EXPECT_FALSE(mpi_launched());
  setenv("OMPI_COMM_WORLD_SIZE", "2", 1);
  EXPECT_TRUE(mpi_launched());
  unsetenv("OMPI_COMM_WORLD_SIZE");
  setenv("PMIX_RANK", "0", 1);
  EXPECT_TRUE(mpi_launched());
  unsetenv("PMIX_RANK");
  EXPECT_FALSE(mpi_launched());
}

}  // namespace

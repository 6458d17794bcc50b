// Run under mpirun (see CMakeLists.txt); every rank runs every test, in the same order.
#include <gtest/gtest.h>

#include <cstdio>
#include <memory>
#include <string>

#include "ballast/core/error.h"
#include "ballast/dist/mpi_communicator.h"
#include "conformance.h"

using namespace ballast::dist;

namespace {

int g_rank = 0;
std::unique_ptr<MpiCommunicator> g_comm;  // made and freed by main, inside the MpiSession

MpiCommunicator& comm() { return *g_comm; }

TEST(Mpi, RankAndSize) {
  int size = comm().size();
  EXPECT_GE(size, 1);
  EXPECT_EQ(comm().rank(), g_rank);
  if (size > 1) {
    EXPECT_TRUE(mpi_launched());
  }
  std::vector<int64_t> one{1};
  comm().all_reduce_sum(std::span<int64_t>(one));
  EXPECT_EQ(one[0], size);
}

TEST(Mpi, AllReduce) { conformance::all_reduce(comm()); }
TEST(Mpi, AllToAll) { conformance::all_to_all(comm()); }
TEST(Mpi, AllGather) { conformance::all_gather(comm()); }
TEST(Mpi, Exchange) { conformance::exchange(comm()); }
TEST(Mpi, PartialExchange) { conformance::partial_exchange(comm()); }
TEST(Mpi, Barriers) { conformance::barriers(comm(), 1000); }

TEST(Mpi, CommunicatorsDoNotCrossTalk) {
  // Same peers and tags on two communicators: each receive gets its own communicator's message.
  MpiCommunicator other;
  const int G = comm().size(), me = comm().rank(), to = (me + 1) % G, from = (me + G - 1) % G;
  Bytes a = conformance::make_bytes(64, me, to, 1), b = conformance::make_bytes(64, me, to, 2);
  Bytes got_a(64), got_b(64);
  Communicator::SendItem sb{to, 0, b};
  Communicator::RecvItem rb{from, 0, got_b};
  other.exchange(std::span(&sb, 1), {});  // small: sent eagerly, completes before it is matched
  Communicator::SendItem sa{to, 0, a};
  Communicator::RecvItem ra{from, 0, got_a};
  comm().exchange(std::span(&sa, 1), std::span(&ra, 1));
  other.exchange({}, std::span(&rb, 1));
  EXPECT_TRUE(conformance::same_bytes(got_a, 64, from, me, 1));
  EXPECT_TRUE(conformance::same_bytes(got_b, 64, from, me, 2));
  comm().barrier();
}

// Rank 0 sends 10 bytes to rank 1, which posts a receive of `recv_bytes`: rank 1 must get an
// error naming both sizes.
void expect_size_mismatch_error(size_t recv_bytes) {
  Bytes data(10), got(recv_bytes);
  if (comm().rank() == 0) {
    Communicator::SendItem s{1, 7, data};
    comm().exchange(std::span(&s, 1), {});
  } else if (comm().rank() == 1) {
    Communicator::RecvItem r{0, 7, got};
    EXPECT_EQ(conformance::message_of([&] { comm().exchange({}, std::span(&r, 1)); }),
              "exchange: rank 1 expected " + std::to_string(recv_bytes) + " bytes from rank 0 tag 7, the sender sent 10");
  }
  comm().barrier();
}

TEST(Mpi, ExchangeTooShortReceiveIsAnError) {
  if (comm().size() < 2) GTEST_SKIP() << "needs two ranks";
  expect_size_mismatch_error(8);
  // The bad message was consumed: the next one with the same peer and tag arrives intact.
  Bytes got(8);
  if (comm().rank() == 0) {
    Bytes good = conformance::make_bytes(8, 0, 1, 7);
    Communicator::SendItem s{1, 7, good};
    comm().exchange(std::span(&s, 1), {});
  } else if (comm().rank() == 1) {
    Communicator::RecvItem r{0, 7, got};
    comm().exchange({}, std::span(&r, 1));
    EXPECT_TRUE(conformance::same_bytes(got, 8, 0, 1, 7));
  }
  comm().barrier();
}

TEST(Mpi, ExchangeTooLongReceiveIsAnError) {
  if (comm().size() < 2) GTEST_SKIP() << "needs two ranks";
  expect_size_mismatch_error(12);
}

TEST(Mpi, ExchangeBadPeerOrTagIsAnError) {
  Bytes data(1);
  const int G = comm().size(), me = comm().rank();
  Communicator::SendItem bad_peer{G, 0, data};
  EXPECT_EQ(conformance::message_of([&] { comm().exchange(std::span(&bad_peer, 1), {}); }),
            fmt::format("exchange: rank {} sends to rank {} of {}", me, G, G));
  Communicator::RecvItem bad_tag{0, -1, data};
  EXPECT_NE(conformance::message_of([&] { comm().exchange({}, std::span(&bad_tag, 1)); }).find("with tag -1, outside [0, "),
            std::string::npos);
  comm().barrier();
}

TEST(Mpi, AllToAllWrongBufferCountIsAnError) {
  // A local check: only the caller's own mistake, so every rank makes it here.
  const int G = comm().size();
  EXPECT_EQ(conformance::message_of([&] { comm().all_to_all(std::vector<Bytes>(G + 1)); }),
            fmt::format("all_to_all: rank {} passed {} send buffers for {} ranks", comm().rank(), G + 1, G));
  comm().barrier();
}

// Prints failures with the rank, and ends the job at the first one: a rank that failed may
// not reach the collective its peers are waiting in.
class AbortOnFailure : public ::testing::EmptyTestEventListener {
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed()) return;
    std::fprintf(stderr, "[rank %d] %s:%d: failure\n%s\n", g_rank, r.file_name() ? r.file_name() : "?",
                 r.line_number(), r.summary());
    std::fflush(stderr);
    std::fflush(stdout);
    MpiSession::abort(1);
  }
};

}  // namespace

int main(int argc, char** argv) {
  MpiSession mpi(&argc, &argv);
  g_rank = mpi.rank();
  ::testing::InitGoogleTest(&argc, argv);
  auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
  if (g_rank != 0) delete listeners.Release(listeners.default_result_printer());  // rank 0 reports
  listeners.Append(new AbortOnFailure);
  g_comm = std::make_unique<MpiCommunicator>();
  const int rc = RUN_ALL_TESTS();
  g_comm.reset();
  return rc;
}

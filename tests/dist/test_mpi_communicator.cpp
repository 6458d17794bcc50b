// Run under mpirun (see CMakeLists.txt); every rank runs every test, in the same order.
#include <gtest/gtest.h>

#include <cstdio>
#include <memory>
#include <string>

#include "ballast/core/error.h"
#include "ballast/dist/local_gpu.h"
#include "ballast/dist/mpi_communicator.h"
#include "ballast/dist/mpi_data_plane.h"
#include "conformance.h"
#include "data_plane_conformance.h"

using namespace ballast::dist;
namespace dpc = ballast::dist::data_plane_conformance;
using ballast::DType;
using ballast::Tensor;
using Transfer = DataPlane::Transfer;

namespace {

int g_rank = 0;
// Made and freed by main, inside the MpiSession.
std::unique_ptr<MpiCommunicator> g_comm;
std::unique_ptr<MpiDataPlane> g_data;

MpiCommunicator& comm() { return *g_comm; }
MpiDataPlane& data() { return *g_data; }

TEST(Mpi, RankAndSize) {
  int size = comm().size();
  EXPECT_GE(size, 1);
  EXPECT_EQ(comm().rank(), g_rank);
  EXPECT_EQ(data().rank(), g_rank);
  EXPECT_EQ(data().size(), size);
  if (size > 1) {
    EXPECT_TRUE(mpi_launched());
  }
  std::vector<int64_t> one{1};
  comm().all_reduce_sum(std::span<int64_t>(one));
  EXPECT_EQ(one[0], size);
}

// The ranks of one mpirun on one host are all local, in world-rank order: rank r takes GPU r.
TEST(Mpi, LocalRanksOfOneHost) {
  EXPECT_EQ(comm().local_rank(), comm().rank());
  EXPECT_EQ(comm().local_size(), comm().size());
  EXPECT_EQ(local_gpu(comm().local_rank(), comm().local_size(), comm().size()), comm().rank());
}

TEST(Mpi, AllReduce) { conformance::all_reduce(comm()); }
TEST(Mpi, AllGather) { conformance::all_gather(comm()); }
TEST(Mpi, Barriers) { conformance::barriers(comm(), 1000); }

TEST(MpiDataPlane, AllToAllV) { dpc::all_to_all_v(data()); }
TEST(MpiDataPlane, AllGather) { dpc::all_gather(data()); }
TEST(MpiDataPlane, AllReduce) { dpc::all_reduce(data()); }
TEST(MpiDataPlane, SendRecv) { dpc::send_recv(data()); }
TEST(MpiDataPlane, PartialSendRecv) {
  dpc::partial_send_recv(data());
  comm().barrier();
}
TEST(MpiDataPlane, Everything) { dpc::everything(data()); }

TEST(MpiDataPlane, BadCallsFailOnEveryRank) { dpc::bad_calls(data(), "MPI"); }
TEST(MpiDataPlane, SendRecvSizeMismatch) {
  dpc::send_recv_size_mismatch(data());
  comm().barrier();
}

TEST(MpiDataPlane, PlanesDoNotCrossTalk) {
  // Same peers on two data planes: each receive gets its own plane's message.
  MpiDataPlane other;
  const int G = data().size(), me = data().rank(), to = (me + 1) % G, from = (me + G - 1) % G;
  Tensor a = Tensor::zeros({16}, DType::I32), b = Tensor::zeros({16}, DType::I32);
  dpc::fill(a, 0, 16, me, to, 1);
  dpc::fill(b, 0, 16, me, to, 2);
  Tensor got_a = Tensor::zeros({16}, DType::I32), got_b = Tensor::zeros({16}, DType::I32);
  const Transfer sb{Transfer::send, to, b}, rb{Transfer::recv, from, got_b};
  other.send_recv(std::span(&sb, 1));  // small: sent eagerly, completes before it is matched
  const Transfer both[] = {{Transfer::send, to, a}, {Transfer::recv, from, got_a}};
  data().send_recv(both);
  other.send_recv(std::span(&rb, 1));
  EXPECT_TRUE(dpc::holds(got_a, 0, 16, from, me, 1));
  EXPECT_TRUE(dpc::holds(got_b, 0, 16, from, me, 2));
  comm().barrier();
}

TEST(MpiDataPlane, SendRecvBadPeerIsAnError) {
  // A local check: only the caller's own mistake (send_recv is not collective).
  Tensor one = Tensor::zeros({1});
  const int G = data().size(), me = data().rank();
  const Transfer bad{Transfer::send, G, one};
  EXPECT_EQ(conformance::message_of([&] { data().send_recv(std::span(&bad, 1)); }),
            fmt::format("send_recv: rank {} sends to rank {} of {}", me, G, G));
  const Transfer cuda{Transfer::recv, 0, Tensor::borrow(one.raw(), {1}, DType::F32, ballast::Device::CUDA)};
  EXPECT_EQ(conformance::message_of([&] { data().send_recv(std::span(&cuda, 1)); }),
            fmt::format("send_recv: rank {}'s buffer to receive from rank 0 is in CUDA memory; the MPI data plane "
                        "moves host (CPU) memory only",
                        me));
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
  g_data = std::make_unique<MpiDataPlane>();
  const int rc = RUN_ALL_TESTS();
  g_data.reset();
  g_comm.reset();
  return rc;
}

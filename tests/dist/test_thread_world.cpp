#include <gtest/gtest.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>

#include "ballast/core/error.h"
#include "ballast/dist/mpi_communicator.h"
#include "ballast/dist/thread_world.h"
#include "conformance.h"
#include "data_plane_conformance.h"

using namespace ballast::dist;
using namespace std::chrono_literals;
namespace dpc = ballast::dist::data_plane_conformance;
using ballast::DType;
using ballast::Tensor;
using Transfer = DataPlane::Transfer;

namespace {

// A bug shows as a failure naming who never arrived, not as a hung test.
constexpr auto kTimeout = 30s;

void run(int G, const std::function<void(Communicator&)>& fn) {
  ThreadWorld world(G, kTimeout);
  run_ranks(world, fn);
}

// Each rank with its control plane and its data plane.
void run(ThreadWorld& world, const std::function<void(Communicator&, DataPlane&)>& fn) {
  run_ranks(world, [&](Communicator& c) { fn(c, world.data_plane(c.rank())); });
}
void run(int G, const std::function<void(Communicator&, DataPlane&)>& fn) {
  ThreadWorld world(G, kTimeout);
  run(world, fn);
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
TEST_P(ThreadWorldG, AllGather) { run(GetParam(), [](Communicator& c) { conformance::all_gather(c); }); }

TEST_P(ThreadWorldG, DataPlaneRankAndSize) {
  const int G = GetParam();
  run(G, [&](Communicator& c, DataPlane& d) {
    EXPECT_EQ(d.size(), G);
    EXPECT_EQ(d.rank(), c.rank());
  });
}
TEST_P(ThreadWorldG, DataPlaneAllToAllV) { run(GetParam(), [](Communicator&, DataPlane& d) { dpc::all_to_all_v(d); }); }
TEST_P(ThreadWorldG, DataPlaneAllGather) { run(GetParam(), [](Communicator&, DataPlane& d) { dpc::all_gather(d); }); }
TEST_P(ThreadWorldG, DataPlaneAllReduce) { run(GetParam(), [](Communicator&, DataPlane& d) { dpc::all_reduce(d); }); }
TEST_P(ThreadWorldG, DataPlaneSendRecv) { run(GetParam(), [](Communicator&, DataPlane& d) { dpc::send_recv(d); }); }
TEST_P(ThreadWorldG, DataPlanePartialSendRecv) {
  run(GetParam(), [](Communicator&, DataPlane& d) { dpc::partial_send_recv(d); });
}
TEST_P(ThreadWorldG, DataPlaneEverything) { run(GetParam(), [](Communicator&, DataPlane& d) { dpc::everything(d); }); }

TEST_P(ThreadWorldG, DataPlaneBadCallsFailOnEveryRank) {
  run(GetParam(), [](Communicator&, DataPlane& d) { dpc::bad_calls(d, "thread"); });
}

// The same, with the rank at fault coming last, so that the others are already waiting in the
// call; no rank waits long, and the world goes on.
TEST_P(ThreadWorldG, DataPlaneBadCallsFailOnEveryRankWhoeverWaits) {
  const int G = GetParam();
  ThreadWorld world(G, kTimeout);
  const auto t0 = std::chrono::steady_clock::now();
  run(world, [&](Communicator& c, DataPlane& d) {
    for (auto kind : dpc::bad_call_kinds(G)) {
      SCOPED_TRACE(::testing::Message() << "bad call " << int(kind));
      if (c.rank() == G - 1) std::this_thread::sleep_for(20ms);
      dpc::bad_call(d, kind, "thread", dpc::host_memory());
    }
    dpc::all_to_all_v(d, 3);
  });
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 10s);
  EXPECT_FALSE(world.aborted());
}

TEST_P(ThreadWorldG, DataPlaneSendRecvSizeMismatch) {
  run(GetParam(), [](Communicator&, DataPlane& d) { dpc::send_recv_size_mismatch(d); });
}

// A queue of work over host memory that runs its work only when it must (waited for, before a
// download, or when another queue's work is ordered after it): a device stream lagging as far as
// it may. The queues of one world share a device lock (one thread runs work at a time). A plane
// that let a sender's buffer be reused, or rows be read, before the copies queued for them ran,
// or that ordered queues in a cycle, is caught here (stale bytes; under the sanitizers, freed).
class LaggingQueue final : public DeviceQueue {
 public:
  explicit LaggingQueue(std::shared_ptr<std::recursive_mutex> device) : device_(std::move(device)) {}

  ballast::Device device() const override { return ballast::Device::CPU; }
  void download(const void* src, void* host, size_t bytes) override {
    refuse_while_recording("download");
    std::lock_guard lk(*device_);
    drain();
    std::memcpy(host, src, bytes);
  }
  void upload(const void* host, void* dst, size_t bytes) override {
    const auto* p = static_cast<const std::byte*>(host);
    push([dst, bytes = std::vector<std::byte>(p, p + bytes)] {
      if (!bytes.empty()) std::memcpy(dst, bytes.data(), bytes.size());
    });
  }
  void copy(const void* src, void* dst, size_t bytes) override {
    push([=] { std::memcpy(dst, src, bytes); });
  }
  void wait() override {
    refuse_while_recording("wait");
    finish();
  }
  // Runs everything queued (the test reading results; allowed while recording).
  void finish() {
    std::lock_guard lk(*device_);
    drain();
  }
  // As a stream recording a graph: the work still runs when it must, but nothing may wait for it.
  void record(bool on) { recording_ = on; }
  bool capturing() const override { return recording_; }
  // gather_routed, run when the queue gets to it: the counts are read then.
  void gather_routed(std::span<const Routed> sources, int me, size_t row_bytes, void* out, int64_t out_rows,
                     void* recv_counts) override {
    push([from = std::vector<Routed>(sources.begin(), sources.end()), me, row_bytes, out, out_rows, recv_counts] {
      auto* dst = static_cast<std::byte*>(out);
      int64_t at = 0;
      for (size_t s = 0; s < from.size(); ++s) {
        const auto* c = static_cast<const int32_t*>(from[s].counts);
        int64_t skip = 0;
        for (int d = 0; d < me; ++d) skip += c[d];
        const int64_t n = c[me];
        if (skip + n > from[s].held || at + n > out_rows) throw ballast::Error("lagging gather_routed: out of range");
        std::memcpy(dst + size_t(at) * row_bytes, static_cast<const std::byte*>(from[s].rows) + size_t(skip) * row_bytes,
                    size_t(n) * row_bytes);
        static_cast<int32_t*>(recv_counts)[s] = int32_t(n);
        at += n;
      }
    });
  }
  const void* mark(int slot) override {
    std::lock_guard lk(*device_);
    marks_.at(size_t(slot)) = {this, queued_};
    return &marks_[size_t(slot)];
  }
  void after(const void* mark) override {
    if (!mark) return;
    const Mark m = *static_cast<const Mark*>(mark);  // as marked now: a later mark() reuses it
    push([m] { m.queue->run_until(m.position); });
  }
  // A buffer in this memory that the queue fills with host's bytes (as a rank's ops would). It
  // stays allocated until the queue has run all the work queued before the caller let it go (as
  // a stream-ordered free: work queued on it may still read it).
  Tensor put(const Tensor& host) {
    auto storage = std::make_shared<Tensor>(Tensor::zeros(host.shape(), host.dtype()));
    upload(host.raw(), storage->raw(), host.nbytes());
    // Let go: freed by the queue, after what was queued before (the upload among it).
    auto owner = std::shared_ptr<void>(new char, [this, alive = std::weak_ptr<bool>(alive_), storage](void* p) {
      delete static_cast<char*>(p);
      if (alive.lock()) push([storage] {});
    });
    return Tensor::borrow(storage->raw(), host.shape(), host.dtype(), ballast::Device::CPU, std::move(owner));
  }
  // kUntouched over t, queued (a kernel reusing the buffer).
  void overwrite(const Tensor& t) {
    push([t] {
      for (int64_t i = 0; i < t.numel(); ++i) dpc::set(t, i, dpc::kUntouched);
    });
  }

 private:
  struct Mark {
    LaggingQueue* queue;
    size_t position;  // the work queued before it
  };
  void push(std::function<void()> work) {
    std::lock_guard lk(*device_);
    pending_.push_back(std::move(work));
    ++queued_;
  }
  void drain() { run_until(queued_); }
  void refuse_while_recording(const char* what) const {
    if (recording_) throw ballast::Error(std::string("lagging queue: ") + what + " while recording a graph");
  }
  // Runs this queue's work up to `position` (the caller holds the device lock). Work that waits
  // for later work of a queue still running an item is a cycle: a GPU would hang.
  void run_until(size_t position) {
    while (done_ < position) {
      if (running_) throw ballast::Error("device queues wait for each other in a cycle");
      std::function<void()> work = std::move(pending_.front());
      pending_.pop_front();
      running_ = true;
      work();
      running_ = false;
      ++done_;
    }
  }

  std::shared_ptr<std::recursive_mutex> device_;
  std::deque<std::function<void()>> pending_;
  size_t queued_ = 0, done_ = 0;
  bool running_ = false, recording_ = false;
  std::array<Mark, 2> marks_{};
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);  // put's buffers outlive the queue
};

// Each rank with its data plane on a "device" of host memory behind a LaggingQueue (on_device),
// and that memory for the conformance suite: buffers written through the rank's queue (as a
// rank's ops write them), results read once it has run.
// recording: the queues as streams recording a graph (the plane may not wait on the host).
void run_on_device(int G, const std::function<void(DataPlane&, const dpc::Memory&)>& fn, bool recording = false) {
  ThreadWorld world(G, kTimeout);
  auto device = std::make_shared<std::recursive_mutex>();
  run(world, [&](Communicator& comm, DataPlane& host) {
    auto queue = std::make_unique<LaggingQueue>(device);
    LaggingQueue* lagging = queue.get();
    lagging->record(recording);
    const std::unique_ptr<DataPlane> d = host.on_device(std::move(queue));
    ASSERT_TRUE(d != nullptr);
    EXPECT_TRUE(d->moves(ballast::Device::CPU));
    const dpc::Memory memory{ballast::Device::CPU, [lagging](const Tensor& host) { return lagging->put(host); },
                             [lagging](const Tensor& t) {
                               lagging->finish();
                               return t;
                             },
                             [lagging](const Tensor& t) { lagging->overwrite(t); }, recording};
    fn(*d, memory);
    comm.barrier();  // peers may still be issuing waits on this queue's marks from the last call
  });
}

TEST_P(ThreadWorldG, DevicePlaneEverything) {
  run_on_device(GetParam(), [](DataPlane& d, const dpc::Memory& m) { dpc::everything(d, m); });
}
TEST_P(ThreadWorldG, DevicePlaneBadCallsFailOnEveryRank) {
  run_on_device(GetParam(), [](DataPlane& d, const dpc::Memory& m) { dpc::bad_calls(d, "thread", m); });
}
TEST_P(ThreadWorldG, DevicePlaneRecordingAGraphKeepsTheCountsOnTheDevice) {
  run_on_device(GetParam(), [](DataPlane& d, const dpc::Memory& m) { dpc::in_a_graph(d, m); }, true);
}
TEST_P(ThreadWorldG, DevicePlaneSendRecvSizeMismatch) {
  run_on_device(GetParam(), [](DataPlane& d, const dpc::Memory& m) { dpc::send_recv_size_mismatch(d, m); });
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

// Collectives of random kinds and sizes back to back on both planes, the same sequence on every
// rank, with point-to-point rings in between.
TEST_P(ThreadWorldG, MixedStress) {
  const int G = GetParam();
  run(G, [&](Communicator& c, DataPlane& dp) {
    std::mt19937 rng(1234);  // same seed: same sequence of calls on every rank
    const int me = c.rank();
    for (int it = 0; it < 300; ++it) {
      const int kind = int(rng() % 6);
      const size_t n = rng() % 64;
      if (kind == 0) {
        std::vector<int64_t> v(n, me + 1);
        c.all_reduce_sum(std::span<int64_t>(v));
        for (auto x : v) ASSERT_EQ(x, int64_t(G) * (G + 1) / 2);
      } else if (kind == 1) {
        dpc::one_all_to_all_v(
            dp, dpc::host_memory(), [&](int s, int d) { return int64_t((n * (d + 1) + s) % 7); }, DType::I32,
            {int64_t(n % 3 + 1)}, it);
      } else if (kind == 4) {
        Tensor v = dpc::full({int64_t(n)}, DType::I32, me + 1);
        dp.all_reduce_sum(v);
        for (int64_t i = 0; i < v.numel(); ++i) ASSERT_EQ(v.data<int32_t>()[i], G * (G + 1) / 2);
      } else if (kind == 5) {
        Tensor out = Tensor::zeros({int64_t(n)}, DType::F32), in = dpc::full({int64_t(n)}, DType::F32, dpc::kUntouched);
        dpc::fill(out, 0, int64_t(n), me, (me + 1) % G, it);
        const Transfer items[] = {{Transfer::recv, (me + G - 1) % G, in}, {Transfer::send, (me + 1) % G, out}};
        dp.send_recv(items);
        ASSERT_TRUE(dpc::holds(in, 0, int64_t(n), (me + G - 1) % G, me, it));
      } else if (kind == 2) {
        auto all = c.all_gather(conformance::make_bytes(n + c.rank(), c.rank(), 0, it));
        for (int s = 0; s < G; ++s) ASSERT_TRUE(conformance::same_bytes(all[s], n + s, s, 0, it));
      } else {
        ASSERT_EQ(c.all_reduce_or(int(n % G) == c.rank()), true);
      }
    }
  });
}

INSTANTIATE_TEST_SUITE_P(G, ThreadWorldG, ::testing::Values(1, 2, 3, 4, 5));

TEST(ThreadWorld, AbortPropagates) {
  // Rank 2 fails; the others are waiting in a barrier, an all_to_all_v, a receive from rank 2 and
  // for rank 2 to receive a send.
  ThreadWorld world(5, kTimeout);
  std::mutex mu;
  std::vector<std::string> seen(5);
  const auto t0 = std::chrono::steady_clock::now();
  const std::string what = conformance::message_of([&] {
    run(world, [&](Communicator& c, DataPlane& d) {
      try {
        Tensor buf = Tensor::zeros({3}, DType::I32);
        if (c.rank() == 2) {
          std::this_thread::sleep_for(50ms);
          ballast::fail("boom at pass {}", 7);
        }
        if (c.rank() == 0) c.barrier();
        if (c.rank() == 1) {
          Tensor rows = Tensor::zeros({0, 4}), counts = Tensor::zeros({5}, DType::I32);
          Tensor recv = Tensor::zeros({0, 4}), recv_counts = Tensor::zeros({5}, DType::I32);
          d.all_to_all_v(rows, counts, recv, recv_counts);
        }
        if (c.rank() == 3) {
          const Transfer r{Transfer::recv, 2, buf};
          d.send_recv(std::span(&r, 1));
        }
        if (c.rank() == 4) {
          const Transfer s{Transfer::send, 2, buf};
          d.send_recv(std::span(&s, 1));
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
  for (int r : {0, 1, 3, 4}) EXPECT_EQ(seen[r], "rank 2 failed: boom at pass 7") << "rank " << r;
  EXPECT_TRUE(world.aborted());
  EXPECT_EQ(world.abort_reason(), "rank 2 failed: boom at pass 7");
  // Anything after the abort throws at once.
  EXPECT_THROW(world.communicator(0).barrier(), ballast::Error);
  EXPECT_THROW(world.data_plane(1).send_recv({}), ballast::Error);
  // Rank 4's send was withdrawn: nothing is left in rank 2's mailbox to read.
}

TEST(ThreadWorld, AbortWhileOthersAreStillWorking) {
  // Rank 0 fails at once; rank 1 reaches its collective only later and must still not hang.
  ThreadWorld world(2, kTimeout);
  EXPECT_THROW(run(world,
                   [&](Communicator& c, DataPlane& d) {
                     if (c.rank() == 0) throw std::runtime_error("early");
                     std::this_thread::sleep_for(50ms);
                     Tensor mine = Tensor::zeros({10}), all = Tensor::zeros({20});
                     d.all_gather(mine, all);
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

TEST(ThreadWorld, DataPlaneCollectiveMismatchIsAnError) {
  std::vector<std::string> seen(2);
  run(2, [&](Communicator& c, DataPlane& d) {
    seen[c.rank()] = conformance::message_of([&] {
      if (c.rank() == 0) {
        Tensor mine = Tensor::zeros({4}), all = Tensor::zeros({8});
        d.all_gather(mine, all);
      } else {
        Tensor rows = Tensor::zeros({0, 4}), counts = Tensor::zeros({2}, DType::I32);
        Tensor recv = Tensor::zeros({0, 4}), recv_counts = Tensor::zeros({2}, DType::I32);
        d.all_to_all_v(rows, counts, recv, recv_counts);
      }
    });
  });
  EXPECT_EQ(seen[0], "collective mismatch (data plane): rank 0 called all_gather while rank 1 called all_to_all_v");
  EXPECT_EQ(seen[1], seen[0]);
}

// Each plane keeps its own order: rank threads of both planes run at once without meeting each
// other's collectives.
TEST(ThreadWorld, PlanesMeetSeparately) {
  ThreadWorld world(3, kTimeout);
  run(world, [&](Communicator& c, DataPlane& d) {
    std::thread data([&] { dpc::all_to_all_v(d, 6); });
    conformance::barriers(c, 200);
    conformance::all_reduce(c);
    data.join();
  });
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

// all_to_all_v_along on host memory checks the caller's promise (the counts are at hand), and
// needs a call to follow; a broken promise fails every rank in that call and the plane goes on.
TEST(ThreadWorld, DataPlaneAlongRoutesHoldsTheCallerToItsPromise) {
  using Routes = DataPlane::Routes;
  std::vector<std::vector<std::string>> seen(2);
  run(2, [&](Communicator& c, DataPlane& d) {
    const int me = c.rank();
    Tensor send = dpc::full({3, 2}, DType::F32, 1), recv = dpc::full({4, 2}, DType::F32, dpc::kUntouched);
    Tensor counts = dpc::counts_tensor({1, 1}), recv_counts = dpc::full({2}, DType::I32, -1);
    seen[me].push_back(conformance::message_of([&] { d.all_to_all_v_along(Routes::again, send, counts, recv, recv_counts); }));
    d.all_to_all_v(send, counts, recv, recv_counts);
    Tensor wrong = dpc::counts_tensor({1, me == 1 ? 2 : 1});
    seen[me].push_back(conformance::message_of([&] { d.all_to_all_v_along(Routes::again, send, wrong, recv, recv_counts); }));
    seen[me].push_back(conformance::message_of([&] { d.all_to_all_v_along(Routes::back, send, counts, recv, recv_counts); }));
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(seen[r][0], fmt::format("all_to_all_v_along (again): rank {} has made no all_to_all_v to follow", r));
    EXPECT_EQ(seen[r][2], "(no exception)") << "the plane goes on after a broken promise";
  }
  const std::string broken =
      "all_to_all_v_along (again): rank 1's send_counts [1, 2] are not the last call's send counts [1, 1]";
  EXPECT_EQ(seen[1][1], broken);
  EXPECT_EQ(seen[0][1], "rank 1 failed: " + broken);
}

TEST(ThreadWorld, SendRecvBadPeerAbortsTheWorld) {
  // Rank 0 would otherwise wait for a transfer rank 1 never posts.
  std::vector<std::string> seen(2);
  run(2, [&](Communicator& c, DataPlane& d) {
    Tensor data = Tensor::zeros({1});
    const Transfer s{Transfer::send, 2, data};
    seen[c.rank()] = conformance::message_of([&] {
      const Transfer r{Transfer::recv, 1, data};
      d.send_recv(std::span(c.rank() == 1 ? &s : &r, 1));
    });
  });
  EXPECT_EQ(seen[1], "send_recv: rank 1 sends to rank 2 of 2");
  EXPECT_EQ(seen[0], "rank 1 failed: send_recv: rank 1 sends to rank 2 of 2");
}

TEST(ThreadWorld, SendRecvToSelfInFifoOrder) {
  run(1, [&](Communicator&, DataPlane& d) {
    std::vector<Tensor> out, in;
    std::vector<Transfer> items;
    for (int k = 0; k < 5; ++k) {
      out.push_back(Tensor::zeros({16}, DType::I32));
      dpc::fill(out.back(), 0, 16, 0, 0, k);
      in.push_back(dpc::full({16}, DType::I32, dpc::kUntouched));
      items.push_back({Transfer::recv, 0, in.back()});
      items.push_back({Transfer::send, 0, out.back()});
    }
    d.send_recv(items);
    for (int k = 0; k < 5; ++k) EXPECT_TRUE(dpc::holds(in[k], 0, 16, 0, 0, k)) << k;
  });
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

TEST(ThreadWorld, DataPlaneTimeoutNamesWhoNeverArrived) {
  ThreadWorld world(3, 200ms);
  const std::string what = conformance::message_of([&] {
    run(world, [](Communicator& c, DataPlane& d) {
      Tensor rows = Tensor::zeros({0, 2}), counts = Tensor::zeros({3}, DType::I32);
      Tensor recv = Tensor::zeros({0, 2}), recv_counts = Tensor::zeros({3}, DType::I32);
      if (c.rank() != 1) d.all_to_all_v(rows, counts, recv, recv_counts);
    });
  });
  EXPECT_NE(what.find("waited 200 ms in all_to_all_v (data plane); rank(s) 1 never arrived"), std::string::npos)
      << what;
}

TEST(ThreadWorld, SendRecvTimeoutNamesTheMissingTransfer) {
  {
    ThreadWorld world(2, 200ms);
    const std::string what = conformance::message_of([&] {
      run(world, [](Communicator& c, DataPlane& d) {
        Tensor got = Tensor::zeros({4}, DType::I32);
        const Transfer r{Transfer::recv, 1, got};
        if (c.rank() == 0) d.send_recv(std::span(&r, 1));
      });
    });
    EXPECT_EQ(what, "rank 0 waited 200 ms in send_recv for 16 bytes from rank 1; 1 receive(s) still missing");
  }
  {
    ThreadWorld world(2, 200ms);
    const std::string what = conformance::message_of([&] {
      run(world, [](Communicator& c, DataPlane& d) {
        Tensor data = Tensor::zeros({4}, DType::I32);
        const Transfer s{Transfer::send, 0, data};
        if (c.rank() == 1) d.send_recv(std::span(&s, 1));
      });
    });
    EXPECT_EQ(what, "rank 1 waited 200 ms in send_recv for rank 0 to receive 16 bytes; 1 send(s) not received");
  }
}

TEST(ThreadWorld, WorldsAreIndependentAndReusable) {
  ThreadWorld a(2, kTimeout), b(2, kTimeout);
  for (int round = 0; round < 3; ++round) {
    run(a, [](Communicator&, DataPlane& d) { dpc::all_to_all_v(d, 3); });
    run(b, [](Communicator&, DataPlane& d) { dpc::send_recv(d); });
  }
}

TEST(ThreadWorld, BadSizeOrRank) {
  EXPECT_THROW(ThreadWorld(0), ballast::Error);
  ThreadWorld w(2);
  EXPECT_THROW(w.communicator(2), ballast::Error);
  EXPECT_THROW(w.communicator(-1), ballast::Error);
  EXPECT_THROW(w.data_plane(2), ballast::Error);
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

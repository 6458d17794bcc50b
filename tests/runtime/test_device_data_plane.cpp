// The data plane of in-process ranks on the device they share (DataPlane::on_device, each rank
// through its backend's queue: runtime/backend_device_queue.h) against the conformance suite
// every plane passes. With BALLAST_TEST_DEVICE=cuda: G ranks on GPU 0, each queueing its copies on
// its own stream, the buffers written, read and reused there too (uploads and downloads in stream
// order; the streams ordered by the backends' marks), so that a copy that ran before a peer's
// buffer was written, or after it was reused, shows.
#include <gtest/gtest.h>

#include <memory>

#include "ballast/dist/thread_world.h"
#include "ballast/runtime/backend_device_queue.h"
#include "dist/data_plane_conformance.h"
#include "fixtures.h"

namespace ballast {
namespace {

namespace dpc = dist::data_plane_conformance;

// fn on every rank of G, each with its own test backend and the thread plane on its device.
void on_device(int G, const std::function<void(dist::DataPlane&, const dpc::Memory&)>& fn) {
  dist::ThreadWorld world(G, std::chrono::seconds(60));
  dist::run_ranks(world, [&](dist::Communicator& comm) {
    const std::unique_ptr<kernels::Backend> be = test::test_backend(1);
    const std::unique_ptr<dist::DataPlane> plane =
        world.data_plane(comm.rank()).on_device(std::make_unique<runtime::BackendDeviceQueue>(*be));
    ASSERT_TRUE(plane != nullptr);
    EXPECT_TRUE(plane->moves(be->device()));
    const dpc::Memory memory{be->device(),
                             [&be](const Tensor& host) {
                               Tensor t = be->alloc(host.shape(), host.dtype());
                               be->upload(host.raw(), t);
                               return t;
                             },
                             [&be](const Tensor& t) {
                               Tensor host = Tensor::zeros(t.shape(), t.dtype());
                               be->download(t, host.raw());
                               return host;
                             },
                             // A sender's reuse of its buffer, queued on its stream.
                             [&be](const Tensor& t) {
                               const Tensor host = dpc::full(t.shape(), t.dtype(), dpc::kUntouched);
                               Tensor dst = t;
                               be->upload(host.raw(), dst);
                             }};
    fn(*plane, memory);
  });
}

class DeviceDataPlane : public ::testing::TestWithParam<int> {};

TEST_P(DeviceDataPlane, Everything) {
  on_device(GetParam(), [](dist::DataPlane& d, const dpc::Memory& m) { dpc::everything(d, m); });
}

TEST_P(DeviceDataPlane, BadCallsFailOnEveryRankAndThePlaneGoesOn) {
  on_device(GetParam(), [](dist::DataPlane& d, const dpc::Memory& m) { dpc::bad_calls(d, "thread", m); });
}

TEST_P(DeviceDataPlane, SendRecvSizeMismatchFailsOnTheReceiverOnly) {
  on_device(GetParam(), [](dist::DataPlane& d, const dpc::Memory& m) { dpc::send_recv_size_mismatch(d, m); });
}

INSTANTIATE_TEST_SUITE_P(Ranks, DeviceDataPlane, ::testing::Values(1, 2, 4),
                         [](const auto& info) { return "G" + std::to_string(info.param); });

}  // namespace
}  // namespace ballast

#pragma once
// Fault injection for tests: a data plane that does every transfer of the plane it wraps and then,
// where `fails` says so, reports the point-to-point moves as failed (as a transport error detected
// after the fact would), leaving the wrapped plane in a consistent state.
#include <functional>
#include <memory>
#include <span>

#include "ballast/core/error.h"
#include "ballast/dist/data_plane.h"

namespace ballast::test {

class FailingDataPlane final : public dist::DataPlane {
 public:
  // fails(items): whether this rank's send_recv call over `items` is to fail.
  FailingDataPlane(dist::DataPlane& inner, std::function<bool(std::span<const Transfer>)> fails)
      : inner_(inner), fails_(std::move(fails)) {}

  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  bool moves(Device device) const override { return inner_.moves(device); }
  int64_t received_rows_at_most() const override { return inner_.received_rows_at_most(); }
  bool shares_device() const override { return inner_.shares_device(); }
  void graph_pass(bool on) override { inner_.graph_pass(on); }
  // The wrapped plane's on the device, failing alike.
  std::unique_ptr<dist::DataPlane> on_device(std::unique_ptr<dist::DeviceQueue> queue) override {
    std::unique_ptr<dist::DataPlane> device = inner_.on_device(std::move(queue));
    if (!device) return nullptr;
    return std::unique_ptr<FailingDataPlane>(new FailingDataPlane(std::move(device), fails_));
  }
  void all_to_all_v(const Tensor& send, const Tensor& send_counts, Tensor& recv, Tensor& recv_counts) override {
    inner_.all_to_all_v(send, send_counts, recv, recv_counts);
  }
  void all_to_all_v_along(Routes routes, const Tensor& send, const Tensor& send_counts, Tensor& recv,
                          Tensor& recv_counts) override {
    inner_.all_to_all_v_along(routes, send, send_counts, recv, recv_counts);
  }
  void all_gather(const Tensor& mine, Tensor& all) override { inner_.all_gather(mine, all); }
  void all_reduce_sum(Tensor& data) override { inner_.all_reduce_sum(data); }
  void send_recv(std::span<const Transfer> items) override {
    inner_.send_recv(items);
    if (fails_(items)) fail("injected transfer failure on rank {}", rank());
  }

 private:
  FailingDataPlane(std::unique_ptr<dist::DataPlane> owned, std::function<bool(std::span<const Transfer>)> fails)
      : owned_(std::move(owned)), inner_(*owned_), fails_(std::move(fails)) {}

  std::unique_ptr<dist::DataPlane> owned_;  // the wrapped plane, where this made it (on_device)
  dist::DataPlane& inner_;
  std::function<bool(std::span<const Transfer>)> fails_;
};

}  // namespace ballast::test

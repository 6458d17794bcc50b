#pragma once
// A data plane for device buffers over one that moves host memory only (threads, MPI): every
// collective and transfer goes through host copies made with the rank's backend (downloads and
// uploads on its stream). This is how in-process ranks sharing one GPU, or MPI ranks without a
// GPU-aware transport, run expert parallelism; NCCL moves device buffers itself and needs none.
// The copies are real work: a pass under it costs more than one download.
#include <vector>

#include "ballast/dist/data_plane.h"
#include "ballast/kernels/backend.h"

namespace ballast::runtime {

class StagedDataPlane final : public dist::DataPlane {
 public:
  StagedDataPlane(dist::DataPlane& host_plane, kernels::Backend& backend) : inner_(host_plane), be_(backend) {}

  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  bool moves(Device device) const override { return device == be_.device() || inner_.moves(device); }

  void all_to_all_v(const Tensor& send, const Tensor& send_counts, Tensor& recv, Tensor& recv_counts) override;
  int64_t received_rows_at_most() const override { return last_received_; }
  void all_gather(const Tensor& mine, Tensor& all) override;
  void all_reduce_sum(Tensor& data) override;
  void send_recv(std::span<const Transfer> items) override;

  int64_t downloads() const { return downloads_; }  // device-to-host copies made so far

 private:
  // A host tensor of t's shape and dtype over buffer `i` of the staging (grown as needed).
  Tensor host_like(const Tensor& t, size_t i);
  Tensor to_host(const Tensor& t, size_t i);

  dist::DataPlane& inner_;
  kernels::Backend& be_;
  std::vector<std::vector<std::byte>> staging_;
  int64_t downloads_ = 0;
  int64_t last_received_ = -1;
};

}  // namespace ballast::runtime

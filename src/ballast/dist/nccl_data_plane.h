#pragma once
// The data plane of ranks with one GPU each, over NCCL: collectives and point-to-point moves on
// CUDA buffers, queued on the rank's stream (the one its backend runs its ops on), so that they
// follow the ops that wrote their inputs and precede the ops that read their outputs without a
// host copy. nccl.h and cuda_runtime.h stay out of this header.
//
// Failures behave as the thread and MPI planes' (data_plane.h; tests/dist's conformance suite
// holds all three to it): every collective first all-gathers, over NCCL, one small header a rank
// (its verdict on its own arguments, its sizes and, for all_to_all_v, its send counts as they lie
// on the device), so that every rank throws the same error in the same call before any row
// moves and the plane stays usable. That header is also how all_to_all_v's counts are exchanged:
// one download of the gathered headers a call sizes the row transfers (NCCL's counts are host
// values). send_recv first exchanges the sizes of its transfers pair by pair, so that a size
// mismatch is an error on the receiver (its bytes drained into scratch) instead of a hang.
#include <memory>

#include "ballast/dist/communicator.h"
#include "ballast/dist/data_plane.h"
#include "ballast/dist/watchdog.h"

namespace ballast::dist {

class NcclDataPlane final : public DataPlane {
 public:
  // Collective over the ranks of `bootstrap` (NCCL rank r = its rank r): rank 0 makes NCCL's
  // unique id and every rank receives it through bootstrap.all_gather (MPI across processes and
  // hosts, or in-process threads), then joins the NCCL communicator on CUDA device `device`.
  // `stream` is a cudaStream_t on that device (the rank's backend stream) and must outlive this.
  // With a watchdog (which must outlive this), every call that waits for the GPU runs in its Scope.
  NcclDataPlane(Communicator& bootstrap, int device, void* stream, Watchdog* watchdog = nullptr);
  ~NcclDataPlane() override;
  NcclDataPlane(const NcclDataPlane&) = delete;
  NcclDataPlane& operator=(const NcclDataPlane&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  bool moves(Device device) const override { return device == Device::CUDA; }

  void all_to_all_v(const Tensor& send, const Tensor& send_counts, Tensor& recv, Tensor& recv_counts) override;
  int64_t received_rows_at_most() const override { return last_received_; }
  void all_gather(const Tensor& mine, Tensor& all) override;
  void all_reduce_sum(Tensor& data) override;
  void send_recv(std::span<const Transfer> items) override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int rank_ = 0, size_ = 1;
  int64_t last_received_ = -1;
};

}  // namespace ballast::dist

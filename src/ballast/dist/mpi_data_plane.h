#pragma once
// The data plane of MPI processes, on host (CPU) buffers, over its own duplicate of MPI_COMM_WORLD
// (so that its messages never meet the control plane's). mpi.h stays out of this header.
//
// Collectives first agree, in one small MPI_Allreduce, that every rank's arguments are good and
// alike; when some are not, every rank throws before any row moves (the rank at fault its own
// message, the others "rank R failed: <message>"; all the same message when the ranks pass rows or
// elements of different sizes), nobody is left waiting in MPI, and the data plane stays usable.
// send_recv is not collective: a rank's own bad arguments throw on that rank only, and a size
// mismatch throws on the receiving rank (the sender's part completes).
// Per call, what a rank sends or receives must stay under MPI's 2 GiB (int counts of bytes).
#include <memory>

#include "ballast/dist/data_plane.h"
#include "ballast/dist/watchdog.h"

namespace ballast::dist {

class MpiDataPlane final : public DataPlane {
 public:
  // Collective over the world; MPI must be initialised (an MpiSession alive) and outlive this.
  // With a watchdog (which must outlive this), every call runs inside its Scope.
  explicit MpiDataPlane(Watchdog* watchdog = nullptr);
  ~MpiDataPlane() override;
  MpiDataPlane(const MpiDataPlane&) = delete;
  MpiDataPlane& operator=(const MpiDataPlane&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  void all_to_all_v(const Tensor& send, const Tensor& send_counts, Tensor& recv, Tensor& recv_counts) override;
  int64_t received_rows_at_most() const override { return last_received_; }
  void all_gather(const Tensor& mine, Tensor& all) override;
  void all_reduce_sum(Tensor& data) override;
  void send_recv(std::span<const Transfer> items) override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  Watchdog* watchdog_;
  int rank_ = 0, size_ = 1;
  int64_t last_received_ = -1;
};

}  // namespace ballast::dist

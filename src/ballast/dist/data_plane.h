#pragma once
// The data plane of expert parallelism: collectives and point-to-point moves on caller-owned
// device buffers (tensors of the rank's backend), the way NCCL works: no tags, no host byte
// vectors, counts that stay on the device. Implementations: in-process ranks (threads sharing
// memory: host buffers, or the buffers of one device they share), MPI processes (CPU buffers),
// NCCL (a GPU a rank); one conformance suite (tests/dist) holds them to the same behaviour. The
// host control plane (agreement, small reductions) is communicator.h.
#include <memory>
#include <span>

#include "ballast/core/tensor.h"
#include "ballast/dist/device_queue.h"

namespace ballast::dist {

class DataPlane {
 public:
  virtual ~DataPlane() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Whether this plane moves buffers of `device` itself (threads and MPI: host memory only; a
  // GPU's buffers then go through host staging, see runtime/staged_data_plane.h).
  virtual bool moves(Device device) const { return device == Device::CPU; }
  // A plane of the same ranks for the buffers of a device every rank addresses, reached through
  // `queue` (this rank's queue of work on it; every rank makes one): in-process ranks on one GPU
  // then move rows device to device instead of through host copies. Null where the ranks share no
  // address space (processes). The two planes are one rank's: they keep one order of collectives
  // between them (the ranks call both in the same order), one thread at a time. Peers still order
  // their queues after a rank's marks as a call returns: a rank's queue must outlive every rank's
  // return from their last collective (a barrier before it goes).
  virtual std::unique_ptr<DataPlane> on_device(std::unique_ptr<DeviceQueue> queue) { return nullptr; }
  // Whether the ranks are threads of one process whose work on the device they share this plane
  // orders by marks between their queues (the in-process plane on a device): their passes can then
  // be captured as one graph (runtime/graph_group.h).
  virtual bool shares_device() const { return false; }
  // The calls until graph_pass(false) belong to a graph's pass (its capture, or the pass before it
  // that sizes its buffers): a plane that can keeps the counts on the device for them (no host
  // wait; received_rows_at_most() then says a bound from the buffers' shapes).
  virtual void graph_pass(bool on) {}

  // Collective. `send` holds rows for rank 0, then for rank 1, ...: send_counts[g] (I32 [G]) rows
  // for rank g, a row being send's first dimension. `recv` receives the rows every rank sent to
  // this one, by source rank in order, and recv_counts (I32 [G]) how many came from each. send and
  // recv have the same row size and dtype. When recv has too few rows or the counts exceed send,
  // every rank throws ballast::Error in the same call (the faulty rank its own message, the others
  // "rank R failed: ..."), nothing moves, and the plane stays usable.
  virtual void all_to_all_v(const Tensor& send, const Tensor& send_counts, Tensor& recv, Tensor& recv_counts) = 0;
  // How many rows this rank's last all_to_all_v delivered at most, as the plane knows on the host:
  // exactly where it holds the counts there anyway (threads, MPI, host staging, NCCL's headers);
  // where they stayed on the device (in-process ranks on one GPU in a graph pass), the rows its
  // sources' send buffers hold (its recv was checked to have room for them; `back` routes: the rows
  // it sent); -1 where it knows neither. A caller sizes what follows from it (expert-parallel rows:
  // the worst case is G x top-k rows per token) without reading device memory itself.
  virtual int64_t received_rows_at_most() const { return -1; }
  // all_to_all_v whose send_counts the caller knows to hold, on every rank, what this plane's last
  // all_to_all_v (of either form) was sent with (`again`: more rows along the same routes) or
  // delivered as recv_counts (`back`: each rank returns the rows it received to their sources, in
  // the order they came). A plane that remembers them need not read or exchange the counts (on a
  // device: no host wait); the result is all_to_all_v's. A plane that can read them cheaply checks
  // the promise (an error naming both).
  enum class Routes { again, back };
  virtual void all_to_all_v_along(Routes routes, const Tensor& send, const Tensor& send_counts, Tensor& recv,
                                  Tensor& recv_counts) {
    all_to_all_v(send, send_counts, recv, recv_counts);
  }
  // Collective: all [G * mine.numel()] holds every rank's `mine`, by rank (same dtype).
  virtual void all_gather(const Tensor& mine, Tensor& all) = 0;
  // Collective: element-wise sum over ranks, in place, the same on every rank (I32, I64 or F32;
  // F32 sums in rank order, so every rank gets the same bits).
  virtual void all_reduce_sum(Tensor& data) = 0;

  // Point-to-point, in an order both sides derive from one plan (weight migration): the k-th send
  // from rank a to rank b fills the k-th receive that b posts from a, whatever else is in flight.
  // Blocks until every item of this call is done (a send completes when received); items to and
  // from several peers may be mixed in any order within a call without deadlock, as long as every
  // send has its receive in the peer's call. Not collective: a rank with nothing to move may skip
  // it. Sizes of a matched pair must agree (else the receiver throws, naming both sizes).
  struct Transfer {
    enum Kind { send, recv } kind;
    int peer;
    Tensor buffer;
  };
  virtual void send_recv(std::span<const Transfer> items) = 0;
};

}  // namespace ballast::dist

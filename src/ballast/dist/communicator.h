#pragma once
// Ranks that talk to each other. Every call is collective (all ranks call it, in the same order)
// except exchange. Implementations: in-process ranks (threads sharing memory), MPI (processes).
// A NCCL one for GPUs goes beside them; nothing above this interface knows which is in use.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

namespace ballast::dist {

using Bytes = std::vector<std::byte>;

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;

  virtual void barrier() = 0;
  // Element-wise sum over ranks, in place; every rank gets the result.
  virtual void all_reduce_sum(std::span<int64_t> data) = 0;
  virtual void all_reduce_sum(std::span<double> data) = 0;
  // Logical OR over ranks (agreement on failure), returns the reduced flag.
  virtual bool all_reduce_or(bool flag) = 0;
  // Variable-size all-to-all: send[r] goes to rank r; returns recv[r] as sent by rank r to us.
  virtual std::vector<Bytes> all_to_all(const std::vector<Bytes>& send) = 0;
  // Every rank's `mine`, indexed by rank.
  virtual std::vector<Bytes> all_gather(const Bytes& mine) = 0;

  // Point-to-point (weight migration): posts every send and receive at once and waits for all,
  // so no order of transfers can deadlock. Matched by (peer, tag); sizes must agree. Not
  // collective: a rank with nothing to move may skip it.
  struct SendItem {
    int peer, tag;
    std::span<const std::byte> data;
  };
  struct RecvItem {
    int peer, tag;
    std::span<std::byte> data;
  };
  virtual void exchange(std::span<const SendItem> sends, std::span<const RecvItem> recvs) = 0;
};

}  // namespace ballast::dist

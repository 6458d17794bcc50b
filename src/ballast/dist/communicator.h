#pragma once
// The control plane of a set of ranks: agreement and small reductions on host values, collective
// (all ranks call each, in the same order). Bulk data (token rows, expert weights) goes over the
// data plane (data_plane.h), which works on device buffers. Implementations: in-process ranks
// (threads sharing memory), MPI (processes); nothing above this interface knows which is in use.
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
  // Every rank's `mine`, indexed by rank.
  virtual std::vector<Bytes> all_gather(const Bytes& mine) = 0;
};

}  // namespace ballast::dist

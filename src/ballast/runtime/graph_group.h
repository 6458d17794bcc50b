#pragma once
// Graphs under in-process expert parallelism: ranks that are threads of one process on one GPU
// (a stream each, rows moving device to device through the thread data plane) capture a graph
// pass as ONE graph of all their work and replay it from rank 0. Rank 0 begins the capture and the
// others' streams join it by waiting for its mark; every rank issues its pass (the data plane
// orders the ranks' streams by marks, which become the graph's edges, and keeps the counts on the
// device while capturing); the others' streams join back and rank 0 ends the capture. A replay
// waits for every rank's work issued before it, and every rank's later work waits for it. The
// ranks agree on each pass first: a graph where every rank runs one (a rank without sequences an
// empty part), keyed by all their buckets (each pads its own batch to its own bucket), or none.
// The pass before a capture (warm_up) keeps the plane's counts on the device too, so that it sizes
// every buffer as the capture will.
// Every method is collective over the ranks' communicator (all call it, in the same order).
#include <cstdint>
#include <map>
#include <vector>

#include "ballast/dist/communicator.h"
#include "ballast/dist/data_plane.h"
#include "ballast/kernels/backend.h"
#include "ballast/runtime/graphs.h"

namespace ballast::runtime {

class GraphGroup final : public Graphs {
 public:
  // plane: the ranks' data plane on the device they share (DataPlane::shares_device).
  GraphGroup(dist::Communicator& comm, kernels::Backend& backend, dist::DataPlane& plane)
      : comm_(comm), be_(backend), plane_(plane) {}

  // The group's graph for this pass, given this rank's own graph key (-1: none): the same on every
  // rank, one key for each combination of the ranks' keys (numbered as first seen), or -1 on every
  // rank where some rank has none.
  int64_t agree(int64_t key);
  // Whether any rank says so (a rank's buffers moved: every rank captures again).
  bool any(bool mine) override { return comm_.all_reduce_or(mine); }
  // A graph's first pass, eager, its counts on the device as under the capture.
  void warm_up(const std::function<void()>& run) override;
  // Between begin_capture and end_capture every rank issues its part of the pass.
  void begin_capture() override;
  void end_capture(int64_t key) override;
  // Runs the group's graph `key`, which rank 0 holds.
  void replay(int64_t key) override;
  int64_t graph_nodes(int64_t key) const override { return comm_.rank() == 0 ? be_.graph_nodes(key) : 0; }

 private:
  // Every rank's mark of the work issued so far, by rank. Two slots (the data plane has 0 and 1),
  // taken in turn, so that a rank re-marks one only after every peer has waited for its last mark.
  std::vector<const void*> marks(int slot);

  dist::Communicator& comm_;
  kernels::Backend& be_;
  dist::DataPlane& plane_;
  std::map<std::vector<int64_t>, int64_t> keys_;  // every rank's key -> the group's
};

}  // namespace ballast::runtime

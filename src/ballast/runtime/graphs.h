#pragma once
// How a model runner's graph passes are captured and replayed (runtime/model_runner.h runs the
// first pass of a graph eagerly, captures the second and replays it after): on the runner's own
// backend (SoloGraphs), or as one graph of every in-process expert-parallel rank's pass
// (GraphGroup, graph_group.h), whose methods are collective over the ranks.
#include <cstdint>
#include <functional>

#include "ballast/core/error.h"
#include "ballast/kernels/backend.h"

namespace ballast::runtime {

class Graphs {
 public:
  virtual ~Graphs() = default;
  // Whether any rank's buffers moved since the graphs were captured (mine: this rank's).
  virtual bool any(bool mine) = 0;
  // A graph's first pass, eagerly: every buffer it needs grows now.
  virtual void warm_up(const std::function<void()>& run) = 0;
  // Between begin_capture and end_capture the pass is issued (by every rank).
  virtual void begin_capture() = 0;
  virtual void end_capture(int64_t key) = 0;
  virtual void replay(int64_t key) = 0;
  virtual int64_t graph_nodes(int64_t key) const = 0;
};

// One rank's graphs on its backend.
class SoloGraphs final : public Graphs {
 public:
  explicit SoloGraphs(kernels::Backend& backend) : be_(backend) {}
  bool any(bool mine) override { return mine; }
  void warm_up(const std::function<void()>& run) override { run(); }
  void begin_capture() override { be_.begin_capture(); }
  void end_capture(int64_t key) override { be_.end_capture(key); }
  // A pass whose graph is not there would silently not run: never, unless runner and backend disagree.
  void replay(int64_t key) override { check(be_.replay(key), "graphs: no graph under key {} to replay", key); }
  int64_t graph_nodes(int64_t key) const override { return be_.graph_nodes(key); }

 private:
  kernels::Backend& be_;
};

}  // namespace ballast::runtime

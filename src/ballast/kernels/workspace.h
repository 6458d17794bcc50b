#pragma once
// Per-pass scratch: tensors carved from one device buffer and all given back by reset(), so that a
// pass allocates nothing. The buffer grows (a counted allocation) only when a pass takes more
// than any pass before it: after a warm-up at the largest batch, never. The same sequence of
// take() calls gets the same addresses every pass, which captured CUDA graphs rely on.
#include <cstddef>
#include <vector>

#include "ballast/core/tensor.h"
#include "ballast/kernels/backend.h"

namespace ballast::kernels {

class Workspace {
 public:
  explicit Workspace(Backend& backend) : be_(backend) {}
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  // A tensor valid until the next reset(); its contents are undefined.
  Tensor take(std::vector<int64_t> shape, DType dtype = DType::F32);
  // Starts a pass: every tensor taken before is given back. If the last pass outgrew the buffer,
  // it is replaced by one that holds the largest pass so far.
  void reset();

  // Gives back, when it ends, everything taken while it lived (stack order): a layer's
  // intermediates are dead once its output is written, so a pass needs the deepest layer's
  // scratch, not the sum over layers.
  class Scope {
   public:
    explicit Scope(Workspace& ws) : ws_(ws), block_(ws.block_), used_(ws.used_), taken_(ws.taken_) {}
    ~Scope();
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    Workspace& ws_;
    size_t block_, used_, taken_;
  };

  size_t capacity() const;       // bytes in the buffer(s) now
  // Bumped whenever the buffer is replaced: takes from before no longer point into it (graphs
  // captured over them must be captured again).
  int64_t generation() const { return generation_; }
  size_t high_water() const { return high_water_; }  // most bytes any pass took

 private:
  static constexpr size_t kAlign = 256;  // enough for any vector load and for GPU coalescing

  Backend& be_;
  std::vector<Tensor> blocks_;  // blocks_[0] is the buffer; more only while a pass outgrows it
  size_t block_ = 0;            // the block takes come from now (later ones: given back by a scope)
  size_t used_ = 0;             // bytes taken from blocks_[block_]
  size_t taken_ = 0;            // bytes taken this pass, over all blocks
  size_t high_water_ = 0;
  int64_t generation_ = 0;
};

}  // namespace ballast::kernels

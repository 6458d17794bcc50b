#pragma once
// The expert weights this rank holds, in device memory: for every MoE layer of a domain, its
// physical slots' weights, each slot one contiguous blob of bytes [gate (I x H) | up (I x H) |
// down (H x I)], followed for block-scaled FP8 weights by their scales [gate | up | down] (F32),
// at a fixed address (migration overwrites blobs in place, so views and captured graphs stay
// valid). A blob is everything an expert is: moving it moves the weights with their scales.
#include <span>
#include <vector>

#include "ballast/kernels/backend.h"
#include "ballast/kernels/ops.h"

namespace ballast::moe {

class SlotStore {
 public:
  // dtype: the experts' weight dtype (F8_E4M3_B128: with their block scales).
  SlotStore(kernels::Backend& backend, int layers, int slots, int64_t intermediate, int64_t hidden, DType dtype);

  int layers() const { return layers_; }
  int slots() const { return slots_; }
  size_t bytes_per_expert() const { return slot_bytes_; }
  size_t bytes() const { return size_t(layers_) * size_t(slots_) * slot_bytes_; }  // every slot of every layer

  // A slot's blob as one U8 tensor [bytes_per_expert()] (what migration moves).
  Tensor blob(int layer, int slot) const;
  const kernels::SwigluWeights& weights(int layer, int slot) const { return weights_[index(layer, slot)]; }
  // The slots of one layer, in slot order (what the grouped expert op takes).
  std::span<const kernels::SwigluWeights> layer(int l) const {
    return {weights_.data() + index(l, 0), size_t(slots_)};
  }

  // Fills a slot with an expert's weights (same shapes and dtype, scales too): uploaded from host
  // tensors, copied from tensors already on this backend's device.
  void fill(int layer, int slot, const kernels::SwigluWeights& host);

 private:
  size_t index(int layer, int slot) const { return size_t(layer) * size_t(slots_) + size_t(slot); }

  kernels::Backend& be_;
  int layers_, slots_;
  int64_t I_, H_;
  DType dtype_;
  size_t slot_bytes_ = 0;
  Tensor storage_;                               // U8 [layers * slots * slot_bytes_]
  std::vector<kernels::SwigluWeights> weights_;  // [layers][slots], views into storage_
};

}  // namespace ballast::moe

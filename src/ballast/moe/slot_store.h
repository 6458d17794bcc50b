#pragma once
// The expert weights this rank holds: for every MoE layer of a domain, its physical slots'
// weights, each slot one contiguous blob [gate (I x H) | up (I x H) | down (H x I)] at a fixed
// address (migration overwrites blobs in place, so views and captured graphs stay valid).
#include <cstddef>
#include <span>
#include <vector>

#include "ballast/moe/expert_weights.h"

namespace ballast::moe {

class SlotStore {
 public:
  SlotStore() = default;
  SlotStore(int layers, int slots, int64_t intermediate, int64_t hidden, DType dtype);

  int layers() const { return layers_; }
  int slots() const { return slots_; }
  size_t bytes_per_expert() const { return bytes_; }

  std::span<std::byte> blob(int layer, int slot);
  std::span<const std::byte> blob(int layer, int slot) const;
  const ExpertWeights& weights(int layer, int slot) const { return views_[size_t(layer) * slots_ + slot]; }

  // Copies an expert's weights (same shapes and dtype) into a slot.
  void fill(int layer, int slot, const ExpertWeights& src);

 private:
  int layers_ = 0, slots_ = 0;
  int64_t I_ = 0, H_ = 0;
  DType dtype_ = DType::F32;
  size_t bytes_ = 0;
  Tensor storage_;                   // [layers * slots * bytes_] bytes
  std::vector<ExpertWeights> views_;  // [layers][slots]
};

}  // namespace ballast::moe

#include "ballast/moe/slot_store.h"

#include "ballast/core/error.h"

namespace ballast::moe {

namespace {
size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }
}  // namespace

SlotStore::SlotStore(kernels::Backend& backend, int layers, int slots, int64_t intermediate, int64_t hidden,
                     DType dtype)
    : be_(backend), layers_(layers), slots_(slots), I_(intermediate), H_(hidden), dtype_(dtype) {
  check(layers > 0 && slots > 0 && I_ > 0 && H_ > 0, "slot store: {} layers x {} slots of {} x {}", layers, slots, I_,
        H_);
  const bool scaled = dtype_ == DType::F8_E4M3_B128;
  const size_t part = size_t(I_ * H_) * dtype_size(dtype_);
  // [gate up] scales [scale_blocks(I), scale_blocks(H)] each, down's [scale_blocks(H), scale_blocks(I)].
  const int64_t gate_scales = scale_blocks(I_) * scale_blocks(H_), down_scales = scale_blocks(H_) * scale_blocks(I_);
  const size_t scales_at = round_up(3 * part, 16);
  // Unscaled slots are packed back to back, as the weights' dtype has them; scaled ones start at
  // 256-byte boundaries so that every slot's elements and scales are aligned alike.
  slot_bytes_ = scaled ? round_up(scales_at + size_t(2 * gate_scales + down_scales) * 4, 256) : 3 * part;
  storage_ = be_.alloc({int64_t(layers) * slots * int64_t(slot_bytes_)}, DType::U8);
  const DType elements = scaled ? DType::F8_E4M3 : dtype_;
  for (int64_t i = 0; i < int64_t(layers) * slots; ++i) {
    const size_t at = size_t(i) * slot_bytes_;
    Tensor g = storage_.view_bytes(at, {I_, H_}, elements), u = storage_.view_bytes(at + part, {I_, H_}, elements);
    Tensor d = storage_.view_bytes(at + 2 * part, {H_, I_}, elements);
    if (scaled) {
      const size_t s = at + scales_at;
      g = Tensor::block_scaled(g, storage_.view_bytes(s, {scale_blocks(I_), scale_blocks(H_)}, DType::F32));
      u = Tensor::block_scaled(u, storage_.view_bytes(s + size_t(gate_scales) * 4, {scale_blocks(I_), scale_blocks(H_)},
                                                      DType::F32));
      d = Tensor::block_scaled(d, storage_.view_bytes(s + size_t(2 * gate_scales) * 4,
                                                      {scale_blocks(H_), scale_blocks(I_)}, DType::F32));
    }
    weights_.push_back({g, u, d});
  }
}

Tensor SlotStore::blob(int layer, int slot) const {
  const int64_t n = int64_t(slot_bytes_), i = int64_t(index(layer, slot));
  return storage_.rows(i * n, (i + 1) * n);
}

void SlotStore::fill(int layer, int slot, const kernels::SwigluWeights& src) {
  const kernels::SwigluWeights& dst = weights(layer, slot);
  for (auto [s, d] : {std::pair{&src.gate, &dst.gate}, std::pair{&src.up, &dst.up}, std::pair{&src.down, &dst.down}}) {
    check(s->shape() == d->shape() && s->dtype() == d->dtype(), "slot store: expert tensor {} {} does not fit slot {} {}",
          *s, dtype_name(s->dtype()), *d, dtype_name(d->dtype()));
    auto put = [&](const Tensor& from, Tensor to) {
      if (from.device() == be_.device()) be_.ops().copy(from, to);  // weights made on the device
      else be_.upload(from.raw(), to);
    };
    if (d->dtype() == DType::F8_E4M3_B128) {
      put(s->elements(), d->elements());
      put(s->scales(), d->scales());
    } else {
      put(*s, *d);
    }
  }
}

}  // namespace ballast::moe

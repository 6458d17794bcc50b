#include "ballast/moe/slot_store.h"

#include <cstring>

#include "ballast/core/error.h"

namespace ballast::moe {

SlotStore::SlotStore(int layers, int slots, int64_t intermediate, int64_t hidden, DType dtype)
    : layers_(layers), slots_(slots), I_(intermediate), H_(hidden), dtype_(dtype) {
  const size_t part = size_t(I_ * H_) * dtype_size(dtype_);
  bytes_ = 3 * part;
  storage_ = Tensor::zeros({int64_t(bytes_) * layers * slots / int64_t(dtype_size(dtype_))}, dtype_);
  char* base = static_cast<char*>(storage_.raw());
  for (size_t i = 0; i < size_t(layers) * slots; ++i) {
    char* b = base + i * bytes_;
    views_.push_back({Tensor::borrow(b, {I_, H_}, dtype_), Tensor::borrow(b + part, {I_, H_}, dtype_),
                      Tensor::borrow(b + 2 * part, {H_, I_}, dtype_)});
  }
}

std::span<std::byte> SlotStore::blob(int layer, int slot) {
  return {static_cast<std::byte*>(storage_.raw()) + (size_t(layer) * slots_ + slot) * bytes_, bytes_};
}

std::span<const std::byte> SlotStore::blob(int layer, int slot) const {
  return {static_cast<const std::byte*>(storage_.raw()) + (size_t(layer) * slots_ + slot) * bytes_, bytes_};
}

void SlotStore::fill(int layer, int slot, const ExpertWeights& src) {
  const ExpertWeights& dst = weights(layer, slot);
  for (auto [s, d] : {std::pair{&src.gate, &dst.gate}, std::pair{&src.up, &dst.up}, std::pair{&src.down, &dst.down}}) {
    check(s->shape() == d->shape() && s->dtype() == d->dtype(), "slot store: expert tensor {} {} does not fit slot {} {}",
          *s, dtype_name(s->dtype()), *d, dtype_name(d->dtype()));
    std::memcpy(d->raw(), s->raw(), d->nbytes());
  }
}

}  // namespace ballast::moe

#include "ballast/moe/slot_store.h"

#include "ballast/core/error.h"

namespace ballast::moe {

SlotStore::SlotStore(kernels::Backend& backend, int layers, int slots, int64_t intermediate, int64_t hidden,
                     DType dtype)
    : be_(backend), layers_(layers), slots_(slots), I_(intermediate), H_(hidden), dtype_(dtype) {
  check(layers > 0 && slots > 0 && I_ > 0 && H_ > 0, "slot store: {} layers x {} slots of {} x {}", layers, slots, I_,
        H_);
  const int64_t part = I_ * H_;
  storage_ = be_.alloc({int64_t(layers) * slots * 3 * part}, dtype_);
  for (int64_t i = 0; i < int64_t(layers) * slots; ++i) {
    const Tensor b = storage_.rows(i * 3 * part, (i + 1) * 3 * part);
    weights_.push_back({b.rows(0, part).reshape({I_, H_}), b.rows(part, 2 * part).reshape({I_, H_}),
                        b.rows(2 * part, 3 * part).reshape({H_, I_})});
  }
}

Tensor SlotStore::blob(int layer, int slot) const {
  const int64_t n = 3 * I_ * H_, i = int64_t(index(layer, slot));
  return storage_.rows(i * n, (i + 1) * n);
}

void SlotStore::fill(int layer, int slot, const kernels::SwigluWeights& src) {
  const kernels::SwigluWeights& dst = weights(layer, slot);
  for (auto [s, d] : {std::pair{&src.gate, &dst.gate}, std::pair{&src.up, &dst.up}, std::pair{&src.down, &dst.down}}) {
    check(s->shape() == d->shape() && s->dtype() == d->dtype(), "slot store: expert tensor {} {} does not fit slot {} {}",
          *s, dtype_name(s->dtype()), *d, dtype_name(d->dtype()));
    Tensor to = *d;
    if (s->device() == be_.device()) be_.ops().copy(*s, to);  // weights made on the device
    else be_.upload(s->raw(), to);
  }
}

}  // namespace ballast::moe

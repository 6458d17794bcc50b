#pragma once
#include <cstdint>
#include <span>

namespace ballast::runtime {

// Index of the largest logit; ties go to the lowest index (as torch.argmax).
int32_t argmax(std::span<const float> logits);

}  // namespace ballast::runtime

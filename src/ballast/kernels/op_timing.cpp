#include "ballast/kernels/op_timing.h"

#include <algorithm>

namespace ballast::kernels {

std::vector<OpTime> OpTimes::take() {
  std::vector<OpTime> out;
  for (auto& [op, t] : by_op_) out.push_back(t);
  by_op_.clear();
  std::stable_sort(out.begin(), out.end(), [](const OpTime& a, const OpTime& b) { return a.seconds > b.seconds; });
  return out;
}

}  // namespace ballast::kernels

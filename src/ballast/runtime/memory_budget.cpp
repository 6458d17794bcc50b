#include "ballast/runtime/memory_budget.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "ballast/core/error.h"

namespace ballast::runtime {

int64_t cache_rows_for(const kernels::MemoryInfo& m, const CacheBudget& b) {
  check(b.fraction > 0 && b.fraction <= 1 && b.sharing >= 1 && b.slot_bytes >= 0 && b.block_bytes > 0 &&
            b.block_size > 0,
        "cache budget: fraction {}, {} ranks, {} bytes of slots, blocks of {} rows and {} bytes", b.fraction,
        b.sharing, b.slot_bytes, b.block_size, b.block_bytes);
  const double left = double(m.free_bytes) - (1.0 - b.fraction) * double(m.total_bytes);
  const double mine = left / b.sharing - double(b.slot_bytes);
  // Less the padding sequence's block; cache rows are 32-bit slot ids (a small model on a large
  // device could buy more).
  const double most = std::floor(double(std::numeric_limits<int32_t>::max()) / b.block_size) - 1;
  const double blocks = std::min(std::floor(mine / double(b.block_bytes)) - 1, most);
  return blocks > 0 ? int64_t(blocks) * b.block_size : 0;
}

}  // namespace ballast::runtime

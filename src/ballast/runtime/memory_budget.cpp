#include "ballast/runtime/memory_budget.h"

#include <cmath>

#include "ballast/core/error.h"

namespace ballast::runtime {

int64_t cache_rows_for(const kernels::MemoryInfo& m, const CacheBudget& b) {
  check(b.fraction > 0 && b.fraction <= 1 && b.sharing >= 1 && b.slot_bytes >= 0 && b.block_bytes > 0 &&
            b.block_size > 0,
        "cache budget: fraction {}, {} ranks, {} bytes of slots, blocks of {} rows and {} bytes", b.fraction,
        b.sharing, b.slot_bytes, b.block_size, b.block_bytes);
  const double left = double(m.free_bytes) - (1.0 - b.fraction) * double(m.total_bytes);
  const double mine = left / b.sharing - double(b.slot_bytes);
  const double blocks = std::floor(mine / double(b.block_bytes)) - 1;  // less the padding sequence's
  return blocks > 0 ? int64_t(blocks) * b.block_size : 0;
}

}  // namespace ballast::runtime

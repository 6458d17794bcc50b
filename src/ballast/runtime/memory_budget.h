#pragma once
// The state cache sized from a device's memory, as SGLang's --mem-fraction-static does it: the
// weights and the cache together take `fraction` of the device's memory, and the rest stays free
// for what passes allocate as they run (activations, the ops' scratch, graphs, library workspaces).
#include <cstdint>

#include "ballast/kernels/backend.h"

namespace ballast::runtime {

struct CacheBudget {
  double fraction = 0;        // of the device's total memory, for weights and cache
  int sharing = 1;            // ranks whose caches come out of this device's memory
  int64_t slot_bytes = 0;     // the DeltaNet state slots', all of them (they come first)
  int64_t block_bytes = 0;    // one KV block's
  int block_size = 0;         // rows a block
};

// The KV cache rows (whole blocks; the padding sequence's block left out) that the fraction leaves
// one rank, given the device's memory measured with the weights resident and no cache yet:
// (free - (1 - fraction) x total) / sharing - slot_bytes, in blocks, at most what 32-bit slot ids
// address. 0 where nothing is left.
int64_t cache_rows_for(const kernels::MemoryInfo& memory, const CacheBudget& budget);

}  // namespace ballast::runtime

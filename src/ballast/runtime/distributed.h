#pragma once
// Generation over expert-parallel ranks: prompts are dealt round-robin to ranks (attention
// data-parallel), every rank decodes its own in lockstep with the others, and the outputs are
// gathered so that every rank ends with all of them in the original order.
#include <vector>

#include "ballast/dist/communicator.h"
#include "ballast/runtime/engine.h"

namespace ballast::runtime {

struct DistributedResult {
  std::vector<std::vector<int32_t>> outputs;  // per prompt, in the order given
  GenerationStats stats;                      // summed over ranks (seconds: the slowest rank's)
};

DistributedResult generate_distributed(Engine& engine, dist::Communicator& comm,
                                       const std::vector<std::vector<int32_t>>& prompts, int max_new_tokens,
                                       std::span<const int32_t> stop_ids = {});

}  // namespace ballast::runtime

#pragma once
// Generation over expert-parallel ranks: prompts are dealt round-robin to ranks (attention
// data-parallel), every rank decodes its own in lockstep with the others, and the outputs are
// gathered so that every rank ends with all of them in the original order.
#include <functional>
#include <vector>

#include "ballast/dist/communicator.h"
#include "ballast/runtime/engine.h"

namespace ballast::runtime {

struct DistributedResult {
  std::vector<std::vector<int32_t>> outputs;  // per prompt, in the order given
  GenerationStats stats;                      // summed over ranks (seconds: the slowest rank's)
  bool stopped = false;                       // some rank's generation was stopped early
};

// How a rank generates for its share of prompts (Engine::generate, or generate_speculative).
using RankGenerate = std::function<GenerationResult(const std::vector<std::vector<int32_t>>& mine)>;

DistributedResult generate_distributed(dist::Communicator& comm, const std::vector<std::vector<int32_t>>& prompts,
                                       const RankGenerate& generate);

}  // namespace ballast::runtime

#pragma once
// Speculative decoding with the MTP head (NEXTN): per round the head drafts `num_steps` tokens by
// chaining (each step feeds its output after mtp.norm and its drafted token to the next), the
// trunk scores the last accepted token and all drafts in one pass, drafts are accepted left to
// right by speculative sampling (greedy: exactly while they equal the trunk's argmax; sampling:
// with probability min(1, p/q), a rejected one replaced by a draw from max(0, p - q)), one more
// token comes from the trunk, and the trunk's KV cache and DeltaNet states are rolled back to the
// last accepted token. Greedy output is exactly greedy decoding's; sampled output is distributed
// exactly as sampling from the trunk alone.
//
// The head's cache holds one entry per position, always computed from the trunk's true hidden
// state (as vLLM and SGLang do): a round's chained entries are dropped after verification and
// the accepted tokens are re-entered with the trunk's hidden states at the start of the next.
#include <vector>

#include "ballast/runtime/engine.h"

namespace ballast::runtime {

struct SpeculativeOptions {
  int num_steps = 1;  // --speculative-num-steps (chained drafts per round); topk is 1
  SamplingParams sampling;  // the same processing (temperature, top-k, top-p) for drafts and target
};

struct SpeculativeStats {
  int64_t rounds = 0;          // verify passes that had sequences in them, summed over sequences
  int64_t emitted = 0;         // tokens emitted by those rounds
  std::vector<int64_t> proposed, accepted;  // per draft position [num_steps]
  double draft_seconds = 0, verify_seconds = 0;
  double acceptance_length() const { return rounds ? double(emitted) / double(rounds) : 0.0; }
};

// Greedy generation with speculation; same contract as Engine::generate_greedy (EP ranks call it
// together).
GenerationResult generate_speculative(Engine& engine, const std::vector<std::vector<int32_t>>& prompts,
                                      int max_new_tokens, const SpeculativeOptions& opts,
                                      SpeculativeStats* stats = nullptr, std::span<const int32_t> stop_ids = {});

}  // namespace ballast::runtime

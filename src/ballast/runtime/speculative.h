#pragma once
// Speculative decoding with the MTP head (NEXTN), as a strategy of Engine::step(): after every
// trunk pass the head enters the pass's rows into its own cache (each pair of a row's hidden
// state after model.norm and the token after it) and drafts `steps` tokens for every decoding
// sequence by chaining (each step feeds its output after mtp.norm and its drafted token to the
// next). The next trunk pass scores the last token and all drafts of a sequence at once; the
// verify op accepts drafts left to right by speculative sampling (greedy: exactly while they
// equal the trunk's argmax; sampling: with probability min(1, p/q), a rejected one replaced by a
// draw from max(0, p - q)) and adds one more token; the cache then rolls back to the last kept
// row (the DeltaNet state of that row is already in a snapshot slot). Greedy output is exactly
// greedy decoding's; sampled output is distributed exactly as sampling from the trunk alone.
//
// The head's cache holds one entry per position, always computed from the trunk's true hidden
// state (as vLLM and SGLang do): a round's chained entries are dropped after drafting, and the
// accepted tokens are entered with the trunk's hidden states after the verification.
#include <span>
#include <vector>

#include "ballast/runtime/engine.h"

namespace ballast::runtime {

struct SpeculativeOptions {
  int num_steps = 1;        // --speculative-num-steps (chained drafts per round); topk is 1
  SamplingParams sampling;  // the same processing (temperature, top-k, top-p) for drafts and target
};

// Engine::generate with `num_steps` drafts per round for this call; stats, if given, receives the
// call's speculation figures. EP ranks call it together.
GenerationResult generate_speculative(Engine& engine, const std::vector<std::vector<int32_t>>& prompts,
                                      int max_new_tokens, const SpeculativeOptions& opts,
                                      SpeculativeStats* stats = nullptr, std::span<const int32_t> stop_ids = {});

}  // namespace ballast::runtime

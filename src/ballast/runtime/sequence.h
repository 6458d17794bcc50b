#pragma once
// One request as the engine runs it: its tokens (prompt, then what was generated), how to draw
// them, when to stop, where it stands, and its share of the state cache.
#include <cstdint>
#include <string_view>
#include <utility>
#include <vector>

#include "ballast/runtime/sampling_params.h"
#include "ballast/runtime/state_cache.h"

namespace ballast::runtime {

struct Request {
  std::vector<int32_t> prompt;
  SamplingParams sampling;  // its seed is this sequence's own (see sequence_seed)
  int max_new_tokens = 16;
  std::vector<int32_t> stop_ids;  // generation ends after any of these
  // Log-probabilities of the generated tokens (kernels::Ops::token_logprobs): -1 none, else the
  // drawn token's and the top_logprobs most likely ones (<= kernels::kMaxTopLogprobs).
  int top_logprobs = -1;
};

// A generated token's log-probability under the model, and the most likely alternatives.
struct TokenLogprobs {
  float logprob = 0;
  std::vector<std::pair<int32_t, float>> top;  // (id, logprob), most likely first
};

enum class SequenceStatus { waiting, running, finished };
enum class FinishReason { none, stop, length, aborted };
std::string_view finish_reason_name(FinishReason r);  // "stop", "length", "abort"

struct Sequence {
  int64_t id = 0;
  std::vector<int32_t> tokens;  // prompt, then generated
  size_t prompt_len = 0;
  SamplingParams sampling;
  int max_new_tokens = 0;
  std::vector<int32_t> stop_ids;
  int top_logprobs = -1;

  SequenceStatus status = SequenceStatus::waiting;
  FinishReason finish = FinishReason::none;
  CacheEntry cache;
  std::vector<int32_t> drafts;  // MTP drafts awaiting the next verify pass
  int64_t draft_draws = 0;      // drafts drawn so far: the position of the next one's uniform
  int place = -1;               // its place among running sequences (per-sequence device rows)

  size_t generated() const { return tokens.size() - prompt_len; }
  // Tokens the trunk has not run yet (a prefill's remaining prompt, or the last generated token).
  int64_t pending() const { return int64_t(tokens.size()) - cache.length; }
  bool finished() const { return status == SequenceStatus::finished; }
};

}  // namespace ballast::runtime

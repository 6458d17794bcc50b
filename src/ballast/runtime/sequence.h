#pragma once
// One request as the engine runs it: its tokens (prompt, then what was generated), how to draw
// them, when to stop, where it stands, and its share of the state cache.
#include <cstdint>
#include <string_view>
#include <vector>

#include "ballast/runtime/sampling_params.h"
#include "ballast/runtime/state_cache.h"

namespace ballast::runtime {

struct Request {
  std::vector<int32_t> prompt;
  SamplingParams sampling;  // its seed is this sequence's own (see sequence_seed)
  int max_new_tokens = 16;
  std::vector<int32_t> stop_ids;  // generation ends after any of these
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

  SequenceStatus status = SequenceStatus::waiting;
  FinishReason finish = FinishReason::none;
  CacheEntry cache;
  std::vector<int32_t> drafts;  // MTP drafts awaiting the next verify pass
  int place = -1;               // its place among running sequences (per-sequence device rows)

  size_t generated() const { return tokens.size() - prompt_len; }
  // Tokens the trunk has not run yet (a prefill's remaining prompt, or the last generated token).
  int64_t pending() const { return int64_t(tokens.size()) - cache.length; }
  bool finished() const { return status == SequenceStatus::finished; }
};

}  // namespace ballast::runtime

#pragma once
// SGLang's native API as JSON: POST /generate (text or input_ids, sampling_params, stream,
// return_logprob, top_logprobs_num) parsed into a GenerationSpec, its responses (text,
// output_ids, meta_info with finish_reason {type, matched}, token counts, logprobs as
// [logprob, id, text] triples), and /tokenize and /detokenize.
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "ballast/serve/generation.h"

namespace ballast::serve::sglang {

struct Parsed {
  GenerationSpec spec;
  bool return_logprob = false;
  bool return_text_in_logprobs = false;
};

constexpr int64_t kDefaultMaxNewTokens = 128;  // SGLang's default max_new_tokens

Parsed parse_generate(const nlohmann::json& body, const ModelContext& model);

// The response (or a stream chunk: cumulative text and ids so far, finish_reason null until the end).
nlohmann::json generate_response(const ModelContext& model, const Parsed& req, const Generation& g,
                                 const Generation::Delta& so_far, const std::string& rid, bool finished);

nlohmann::json tokenize(const nlohmann::json& body, const ModelContext& model);
nlohmann::json detokenize(const nlohmann::json& body, const ModelContext& model);

}  // namespace ballast::serve::sglang

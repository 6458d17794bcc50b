#pragma once
// OpenAI's API as JSON: /v1/completions and /v1/chat/completions request bodies parsed into a
// GenerationSpec (every field type-checked, unsupported options refused by name), and responses,
// stream chunks, usage, logprobs and /v1/models formatted as OpenAI's clients read them.
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "ballast/serve/generation.h"

namespace ballast::serve::openai {

struct Parsed {
  GenerationSpec spec;
  bool include_usage = false;  // stream_options.include_usage
  bool chat = false;
  int logprobs = -1;           // completions: top alternatives per token; chat: top_logprobs (-1: none)
};

// Throws ApiError (400 bad fields, 404 unknown model).
Parsed parse_completion(const nlohmann::json& body, const ModelContext& model);
Parsed parse_chat(const nlohmann::json& body, const ModelContext& model);

// "stop", "length", "abort".
const char* finish_reason(Outcome o);

// Formats the responses of one request: the whole answer, or its stream's chunks.
class Responder {
 public:
  Responder(const ModelContext& model, const Parsed& request, std::string id, int64_t created);

  nlohmann::json response(const Generation& g, const Generation::Delta& whole);
  // The stream's first chunks (chat: the assistant role), then one per delta, then the usage.
  nlohmann::json opening() const;
  nlohmann::json chunk(const Generation::Delta& d);
  nlohmann::json usage_chunk(const Generation& g) const;
  static nlohmann::json usage(const Generation& g);

 private:
  nlohmann::json logprobs(const Generation::Delta& d);
  nlohmann::json base(const char* object) const;

  const ModelContext& model_;
  const Parsed& req_;
  std::string id_;
  int64_t created_;
  int64_t text_offset_ = 0;  // completions' logprobs.text_offset across chunks
};

nlohmann::json models(const ModelContext& model, int64_t created);

}  // namespace ballast::serve::openai

#pragma once
// One generation request on the HTTP thread that serves it, whatever the endpoint: the prompt
// tokenised and checked against the model's limits, the request submitted to the queue, and
// what the engine sends back read as deltas of text, token ids and logprobs (stop strings
// applied, the request cancelled when one matches or when the client goes away).
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "ballast/runtime/sampling_params.h"
#include "ballast/serve/output_text.h"
#include "ballast/serve/request_queue.h"
#include "ballast/text/tokenizer.h"

namespace ballast::serve {

// What the server knows of the model, fixed at start.
struct ModelContext {
  const text::Tokenizer* tokenizer = nullptr;
  std::string name;                 // --served-model-name
  int64_t context_length = 0;       // prompt + generated tokens, at most
  int32_t vocab_size = 0;           // of the model (ids at or above it are refused)
  runtime::SamplingParams defaults; // generation_config.json's temperature, top_p, top_k (else OpenAI's)
  std::optional<std::chrono::milliseconds> request_timeout;
};

// A generation request as an endpoint parsed it, before tokenisation.
struct GenerationSpec {
  std::optional<std::string> text;             // the prompt text (chat: the rendered messages), or
  std::optional<std::vector<int32_t>> ids;     // the prompt as token ids
  runtime::SamplingParams sampling;
  std::optional<int64_t> max_tokens;           // absent: the endpoint's default
  std::vector<std::string> stop;
  std::vector<int32_t> stop_token_ids;
  bool ignore_eos = false;
  int top_logprobs = -1;                       // -1: no logprobs
  bool stream = false;
};

class Generation {
 public:
  // Tokenises and checks `spec` (ApiError 400 naming what is wrong), then submits it (ApiError
  // 503 when the queue is full or the server stops). default_max_tokens <= 0: up to the context.
  Generation(const ModelContext& model, RequestQueue& queue, GenerationSpec spec, int64_t default_max_tokens);
  // A request still running when its reader leaves (the client went away) is cancelled.
  ~Generation();
  Generation(const Generation&) = delete;
  Generation& operator=(const Generation&) = delete;

  struct Delta {
    std::string text;
    std::vector<int32_t> ids;                      // the tokens behind it (usage counts these)
    std::vector<runtime::TokenLogprobs> logprobs;  // per id, when asked
    bool finished = false;
    Outcome outcome = Outcome::stop;
    std::string error;                             // Outcome::error / timeout: why
  };
  // What came next, waiting up to `wait` (empty when nothing came). After a finished delta, nothing.
  Delta next(std::chrono::milliseconds wait);
  // Reads until the end: the whole output as one delta.
  Delta all();

  uint64_t id() const { return sub_.id; }
  const std::vector<int32_t>& prompt_ids() const { return sub_.request.prompt; }
  int64_t completion_tokens() const { return completion_tokens_; }
  // Why it stopped with Outcome::stop: the stop string, or the stop token id (-1: neither known).
  const std::string& matched_stop() const { return text_.matched(); }
  int32_t matched_token() const { return matched_token_; }
  Clock::time_point arrival() const { return sub_.arrival; }

 private:
  const ModelContext& model_;
  RequestQueue& queue_;
  GenerationSpec spec_;
  Submission sub_;
  TextAssembler text_;
  int64_t completion_tokens_ = 0;
  int32_t matched_token_ = -1;
  int32_t last_token_ = -1;
  bool done_ = false;
};

// The text of one token as logprobs show it (lossy UTF-8: a token may hold part of a character).
std::string token_text(const text::Tokenizer& tok, int32_t id);

}  // namespace ballast::serve

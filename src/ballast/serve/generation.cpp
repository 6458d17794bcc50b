#include "ballast/serve/generation.h"

#include <fmt/format.h>

#include <algorithm>

#include "ballast/kernels/ops.h"
#include "ballast/serve/api_error.h"

namespace ballast::serve {

namespace {

std::vector<int32_t> prompt_of(const ModelContext& m, const GenerationSpec& spec) {
  std::vector<int32_t> ids;
  if (spec.ids) {
    ids = *spec.ids;
  } else if (spec.text) {
    try {
      ids = m.tokenizer->encode(*spec.text);
    } catch (const std::exception& e) {
      throw ApiError(400, fmt::format("the prompt cannot be tokenized: {}", e.what()), "prompt");
    }
  }
  if (ids.empty()) throw ApiError(400, "the prompt is empty", "prompt");
  for (int32_t id : ids)
    if (id < 0 || id >= m.vocab_size)
      throw ApiError(400, fmt::format("prompt token id {} is outside the vocabulary of {}", id, m.vocab_size),
                     "prompt");
  if (int64_t(ids.size()) >= m.context_length)
    throw ApiError(400,
                   fmt::format("the prompt has {} tokens; this model's context length is {} tokens (prompt and "
                               "output together)",
                               ids.size(), m.context_length),
                   "prompt");
  return ids;
}

runtime::Request request_of(const ModelContext& m, const GenerationSpec& spec, std::vector<int32_t> prompt,
                            int64_t default_max_tokens) {
  const int64_t room = m.context_length - int64_t(prompt.size());
  int64_t max_tokens = room;
  if (spec.max_tokens) {
    max_tokens = *spec.max_tokens;
    if (max_tokens <= 0) throw ApiError(400, fmt::format("max_tokens must be at least 1, got {}", max_tokens), "max_tokens");
    if (max_tokens > room)
      throw ApiError(400,
                     fmt::format("this model's context length is {} tokens; the request has {} prompt tokens and "
                                 "asks for {} more (max_tokens at most {})",
                                 m.context_length, prompt.size(), max_tokens, room),
                     "max_tokens");
  } else if (default_max_tokens > 0) {
    max_tokens = std::min(default_max_tokens, room);
  }
  if (spec.top_logprobs > kernels::kMaxTopLogprobs)
    throw ApiError(400, fmt::format("top_logprobs must be at most {}, got {}", kernels::kMaxTopLogprobs,
                                    spec.top_logprobs),
                   "top_logprobs");
  for (int32_t id : spec.stop_token_ids)
    if (id < 0 || id >= m.vocab_size)
      throw ApiError(400, fmt::format("stop token id {} is outside the vocabulary of {}", id, m.vocab_size),
                     "stop_token_ids");
  runtime::Request r;
  r.prompt = std::move(prompt);
  r.sampling = spec.sampling;
  r.max_new_tokens = int(max_tokens);
  r.stop_ids = spec.stop_token_ids;
  if (!spec.ignore_eos)
    for (int32_t id : m.tokenizer->eos_token_ids())
      if (id < m.vocab_size) r.stop_ids.push_back(id);
  r.top_logprobs = spec.top_logprobs;
  return r;
}

}  // namespace

Generation::Generation(const ModelContext& model, RequestQueue& queue, GenerationSpec spec,
                       int64_t default_max_tokens)
    : model_(model), queue_(queue), spec_(std::move(spec)),
      sub_{request_of(model, spec_, prompt_of(model, spec_), default_max_tokens), Clock::now(), std::nullopt,
           std::make_shared<RequestStream>()},
      // Stop tokens end the output without showing.
      text_(*model.tokenizer, spec_.stop, sub_.request.stop_ids) {
  if (model.request_timeout) sub_.deadline = sub_.arrival + *model.request_timeout;
  switch (queue.submit(sub_)) {
    case RequestQueue::Refusal::none: break;
    case RequestQueue::Refusal::full:
      done_ = true;
      throw ApiError(503, fmt::format("the server is at capacity ({} requests in flight); retry later",
                                      queue.capacity()));
    case RequestQueue::Refusal::stopping:
      done_ = true;
      throw ApiError(503, "the server is shutting down");
  }
}

Generation::~Generation() {
  if (!done_) queue_.cancel(sub_.id, Outcome::abort);
}

Generation::Delta Generation::next(std::chrono::milliseconds wait) {
  Delta d;
  if (done_) return d;
  StreamUpdate u = sub_.stream->take(wait);
  for (size_t i = 0; i < u.tokens.size() && !text_.stopped(); ++i) {
    d.text += text_.push(u.tokens[i]);
    d.ids.push_back(u.tokens[i]);
    if (i < u.logprobs.size()) d.logprobs.push_back(u.logprobs[i]);
    last_token_ = u.tokens[i];
  }
  completion_tokens_ += int64_t(d.ids.size());
  if (text_.stopped()) {
    // A stop string matched: the answer is complete; the engine lets the sequence go at its next pass.
    queue_.cancel(sub_.id, Outcome::stop);
    d.finished = true;
    d.outcome = Outcome::stop;
  } else if (u.finished) {
    d.text += text_.finish();
    d.finished = true;
    d.outcome = u.outcome;
    d.error = u.error;
    const auto& stops = sub_.request.stop_ids;
    if (u.outcome == Outcome::stop && std::find(stops.begin(), stops.end(), last_token_) != stops.end())
      matched_token_ = last_token_;
  }
  done_ = d.finished;
  return d;
}

Generation::Delta Generation::all() {
  Delta whole;
  while (!whole.finished) {
    Delta d = next(std::chrono::milliseconds(1000));
    whole.text += d.text;
    whole.ids.insert(whole.ids.end(), d.ids.begin(), d.ids.end());
    whole.logprobs.insert(whole.logprobs.end(), d.logprobs.begin(), d.logprobs.end());
    whole.finished = d.finished;
    whole.outcome = d.outcome;
    whole.error = d.error;
  }
  return whole;
}

std::string token_text(const text::Tokenizer& tok, int32_t id) {
  const int32_t one[] = {id};
  return tok.decode(one);
}

}  // namespace ballast::serve

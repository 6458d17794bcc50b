#include "ballast/serve/openai_protocol.h"

#include <fmt/format.h>

#include "ballast/kernels/ops.h"
#include "ballast/serve/json_fields.h"
#include "ballast/text/chat.h"

namespace ballast::serve::openai {

namespace {

using nlohmann::json;

void check_model(const JsonFields& f, const ModelContext& m) {
  if (auto name = f.string("model"); name && *name != m.name)
    throw ApiError(404, fmt::format("The model '{}' does not exist; this server serves '{}'", *name, m.name), "model");
}

// The fields both endpoints share: sampling, stop, n, streaming, extensions of vLLM and SGLang.
void parse_common(const JsonFields& f, const ModelContext& m, Parsed& p) {
  check_model(f, m);
  GenerationSpec& s = p.spec;
  s.sampling = m.defaults;
  if (auto t = f.number("temperature")) {
    if (*t < 0 || *t > 100) f.bad("temperature", fmt::format("must be in [0, 100], got {}", *t));
    s.sampling.temperature = float(*t);
  }
  if (auto v = f.number("top_p")) {
    if (!(*v > 0 && *v <= 1)) f.bad("top_p", fmt::format("must be in (0, 1], got {}", *v));
    s.sampling.top_p = float(*v);
  }
  if (auto k = f.integer("top_k")) {
    if (*k < -1) f.bad("top_k", fmt::format("must be -1 or 0 (no limit) or positive, got {}", *k));
    s.sampling.top_k = int(std::max<int64_t>(*k, 0));
  }
  if (auto seed = f.integer("seed")) s.sampling.seed = uint64_t(*seed);
  s.stop = f.strings("stop");
  if (s.stop.size() > 16) f.bad("stop", "may hold at most 16 strings");
  if (auto ids = f.ids("stop_token_ids", m.vocab_size)) s.stop_token_ids = *ids;
  s.ignore_eos = f.boolean("ignore_eos").value_or(false);
  if (auto n = f.integer("n"); n && *n != 1) f.bad("n", fmt::format("must be 1 (one choice per request), got {}", *n));
  if (auto n = f.integer("best_of"); n && *n != 1) f.bad("best_of", "must be 1");
  for (const char* penalty : {"presence_penalty", "frequency_penalty"})
    if (auto v = f.number(penalty); v && *v != 0) f.bad(penalty, "is not supported (only 0)");
  if (f.has("logit_bias") && !f.raw("logit_bias").empty()) f.bad("logit_bias", "is not supported");
  s.stream = f.boolean("stream").value_or(false);
  if (f.has("stream_options")) {
    const JsonFields o(f.raw("stream_options"), "stream_options.");
    if (!s.stream) f.bad("stream_options", "is only allowed with stream: true");
    p.include_usage = o.boolean("include_usage").value_or(false);
  }
}

void parse_max_tokens(const JsonFields& f, GenerationSpec& s, const char* key) {
  if (auto v = f.integer(key)) {
    if (*v <= 0) f.bad(key, fmt::format("must be at least 1, got {}", *v));
    s.max_tokens = *v;
  }
}

std::string content_text(const JsonFields& msg, size_t i) {
  const json& c = msg.raw("content");
  const std::string field = fmt::format("messages[{}].content", i);
  if (c.is_null()) return {};
  if (c.is_string()) return c.get<std::string>();
  if (!c.is_array()) throw ApiError(400, fmt::format("'{}' must be a string or a list of parts", field), field);
  std::string text;
  for (size_t k = 0; k < c.size(); ++k) {
    const JsonFields part(c[k], fmt::format("{}[{}].", field, k));
    const auto type = part.string("type");
    if (type != "text")
      throw ApiError(400, fmt::format("'{}[{}].type' {} is not supported (only text)", field, k,
                                      type ? "'" + *type + "'" : "missing"),
                     field);
    text += part.string("text").value_or("");
  }
  return text;
}

json top_alternatives_completion(const text::Tokenizer& tok, const runtime::TokenLogprobs& lp) {
  json top = json::object();
  for (const auto& [id, v] : lp.top) top[token_text(tok, id)] = v;
  return top;
}

json bytes_of(const std::string& s) {
  json b = json::array();
  for (unsigned char c : s) b.push_back(int(c));
  return b;
}

}  // namespace

Parsed parse_completion(const json& body, const ModelContext& m) {
  Parsed p;
  const JsonFields f(body);
  parse_common(f, m, p);
  const json& prompt = f.raw("prompt");
  if (prompt.is_string()) {
    p.spec.text = prompt.get<std::string>();
  } else if (prompt.is_array() && !prompt.empty() && prompt[0].is_number_integer()) {
    p.spec.ids = f.ids("prompt", m.vocab_size);
  } else if (prompt.is_array() && prompt.size() == 1 && (prompt[0].is_string() || prompt[0].is_array())) {
    // One prompt in a list (OpenAI's batch form with n = 1).
    json one = body;
    one["prompt"] = prompt[0];
    return parse_completion(one, m);
  } else if (prompt.is_array() && prompt.size() > 1 && (prompt[0].is_string() || prompt[0].is_array())) {
    f.bad("prompt", fmt::format("holds {} prompts; send one per request", prompt.size()));
  } else if (prompt.is_null() || (prompt.is_array() && prompt.empty())) {
    throw ApiError(400, "the prompt is empty", "prompt");
  } else {
    f.bad("prompt", "must be a string, a list of token ids, or a list holding one of these");
  }
  parse_max_tokens(f, p.spec, "max_tokens");
  if (auto lp = f.integer("logprobs")) {
    if (*lp < 0 || *lp > kernels::kMaxTopLogprobs)
      f.bad("logprobs", fmt::format("must be in [0, {}], got {}", kernels::kMaxTopLogprobs, *lp));
    p.logprobs = int(*lp);
    p.spec.top_logprobs = p.logprobs;
  }
  if (f.boolean("echo").value_or(false)) f.bad("echo", "is not supported");
  if (f.has("suffix")) f.bad("suffix", "is not supported");
  return p;
}

Parsed parse_chat(const json& body, const ModelContext& m) {
  Parsed p;
  p.chat = true;
  const JsonFields f(body);
  parse_common(f, m, p);
  const json& messages = f.raw("messages");
  if (!messages.is_array()) f.bad("messages", "must be a list of messages");
  if (messages.empty()) throw ApiError(400, "'messages' is empty", "messages");
  std::vector<text::ChatMessage> chat;
  for (size_t i = 0; i < messages.size(); ++i) {
    const JsonFields msg(messages[i], fmt::format("messages[{}].", i));
    const auto role = msg.string("role");
    if (!role || (*role != "system" && *role != "user" && *role != "assistant" && *role != "tool" &&
                  *role != "developer"))
      msg.bad("role", "must be one of system, developer, user, assistant, tool");
    text::ChatMessage cm{*role == "developer" ? "system" : *role, content_text(msg, i), std::nullopt};
    if (auto r = msg.string("reasoning_content")) cm.reasoning_content = *r;
    chat.push_back(std::move(cm));
  }
  if (f.has("tools") && !f.raw("tools").empty()) f.bad("tools", "are not supported");
  if (f.has("response_format")) {
    const JsonFields rf(f.raw("response_format"), "response_format.");
    if (rf.string("type").value_or("text") != "text") rf.bad("type", "is not supported (only text)");
  }
  text::ChatOptions opts{.add_generation_prompt = true, .enable_thinking = true};
  if (f.has("chat_template_kwargs")) {
    const JsonFields kw(f.raw("chat_template_kwargs"), "chat_template_kwargs.");
    opts.enable_thinking = kw.boolean("enable_thinking").value_or(true);
  }
  p.spec.text = m.tokenizer->render_chat(chat, opts);
  parse_max_tokens(f, p.spec, "max_tokens");
  parse_max_tokens(f, p.spec, "max_completion_tokens");
  const bool lp = f.boolean("logprobs").value_or(false);
  if (auto k = f.integer("top_logprobs")) {
    if (!lp) f.bad("top_logprobs", "needs logprobs: true");
    if (*k < 0 || *k > kernels::kMaxTopLogprobs)
      f.bad("top_logprobs", fmt::format("must be in [0, {}], got {}", kernels::kMaxTopLogprobs, *k));
    p.logprobs = int(*k);
  } else if (lp) {
    p.logprobs = 0;
  }
  p.spec.top_logprobs = p.logprobs;
  return p;
}

const char* finish_reason(Outcome o) {
  switch (o) {
    case Outcome::stop: return "stop";
    case Outcome::length: return "length";
    default: return "abort";
  }
}

Responder::Responder(const ModelContext& model, const Parsed& request, std::string id, int64_t created)
    : model_(model), req_(request), id_(std::move(id)), created_(created) {}

json Responder::base(const char* object) const {
  return {{"id", id_}, {"object", object}, {"created", created_}, {"model", model_.name}};
}

json Responder::usage(const Generation& g) {
  const int64_t prompt = int64_t(g.prompt_ids().size()), completion = g.completion_tokens();
  return {{"prompt_tokens", prompt}, {"completion_tokens", completion}, {"total_tokens", prompt + completion}};
}

json Responder::logprobs(const Generation::Delta& d) {
  if (req_.logprobs < 0) return nullptr;
  const text::Tokenizer& tok = *model_.tokenizer;
  const size_t n = std::min(d.ids.size(), d.logprobs.size());
  if (req_.chat) {
    json content = json::array();
    for (size_t i = 0; i < n; ++i) {
      const std::string t = token_text(tok, d.ids[i]);
      json top = json::array();
      for (const auto& [id, v] : d.logprobs[i].top) {
        const std::string tt = token_text(tok, id);
        top.push_back({{"token", tt}, {"logprob", v}, {"bytes", bytes_of(tt)}});
      }
      content.push_back({{"token", t}, {"logprob", d.logprobs[i].logprob}, {"bytes", bytes_of(t)}, {"top_logprobs", top}});
    }
    return {{"content", content}};
  }
  json tokens = json::array(), token_lp = json::array(), top = json::array(), offsets = json::array();
  for (size_t i = 0; i < n; ++i) {
    const std::string t = token_text(tok, d.ids[i]);
    tokens.push_back(t);
    token_lp.push_back(d.logprobs[i].logprob);
    top.push_back(top_alternatives_completion(tok, d.logprobs[i]));
    offsets.push_back(text_offset_);
    text_offset_ += int64_t(t.size());
  }
  return {{"tokens", tokens}, {"token_logprobs", token_lp}, {"top_logprobs", top}, {"text_offset", offsets}};
}

json Responder::response(const Generation& g, const Generation::Delta& whole) {
  json r = base(req_.chat ? "chat.completion" : "text_completion");
  json choice = {{"index", 0}, {"logprobs", logprobs(whole)}, {"finish_reason", finish_reason(whole.outcome)}};
  if (req_.chat) choice["message"] = {{"role", "assistant"}, {"content", whole.text}};
  else choice["text"] = whole.text;
  r["choices"] = json::array({choice});
  r["usage"] = usage(g);
  return r;
}

json Responder::opening() const {
  if (!req_.chat) return nullptr;
  json r = base("chat.completion.chunk");
  r["choices"] = json::array({{{"index", 0}, {"delta", {{"role", "assistant"}, {"content", ""}}},
                               {"logprobs", nullptr}, {"finish_reason", nullptr}}});
  if (req_.include_usage) r["usage"] = nullptr;
  return r;
}

json Responder::chunk(const Generation::Delta& d) {
  json r = base(req_.chat ? "chat.completion.chunk" : "text_completion");
  json choice = {{"index", 0}, {"logprobs", logprobs(d)},
                 {"finish_reason", d.finished ? json(finish_reason(d.outcome)) : json(nullptr)}};
  if (req_.chat) choice["delta"] = d.text.empty() && d.finished ? json::object() : json{{"content", d.text}};
  else choice["text"] = d.text;
  r["choices"] = json::array({choice});
  if (req_.include_usage) r["usage"] = nullptr;
  return r;
}

json Responder::usage_chunk(const Generation& g) const {
  json r = base(req_.chat ? "chat.completion.chunk" : "text_completion");
  r["choices"] = json::array();
  r["usage"] = usage(g);
  return r;
}

json models(const ModelContext& m, int64_t created) {
  return {{"object", "list"},
          {"data", json::array({{{"id", m.name},
                                 {"object", "model"},
                                 {"created", created},
                                 {"owned_by", "ballast"},
                                 {"max_model_len", m.context_length}}})}};
}

}  // namespace ballast::serve::openai

#include "ballast/serve/sglang_protocol.h"

#include <fmt/format.h>

#include "ballast/kernels/ops.h"
#include "ballast/serve/json_fields.h"

namespace ballast::serve::sglang {

namespace {
using nlohmann::json;

json triple(const ModelContext& m, const Parsed& req, float lp, int32_t id) {
  return json::array({lp, id, req.return_text_in_logprobs ? json(token_text(*m.tokenizer, id)) : json(nullptr)});
}
}  // namespace

Parsed parse_generate(const json& body, const ModelContext& m) {
  Parsed p;
  const JsonFields f(body);
  const json& text = f.raw("text");
  if (text.is_array()) f.bad("text", "holds a batch; send one prompt per request");
  if (f.has("text") && f.has("input_ids")) throw ApiError(400, "give either 'text' or 'input_ids', not both", "text");
  if (f.has("input_ids")) {
    if (f.raw("input_ids").is_array() && !f.raw("input_ids").empty() && f.raw("input_ids")[0].is_array())
      f.bad("input_ids", "holds a batch; send one prompt per request");
    p.spec.ids = f.ids("input_ids", m.vocab_size);
  } else {
    p.spec.text = f.string("text");
    if (!p.spec.text) throw ApiError(400, "give the prompt as 'text' or 'input_ids'", "text");
  }
  p.spec.stream = f.boolean("stream").value_or(false);
  p.return_logprob = f.boolean("return_logprob").value_or(false);
  p.return_text_in_logprobs = f.boolean("return_text_in_logprobs").value_or(false);
  if (p.return_logprob) {
    const int64_t k = f.integer("top_logprobs_num").value_or(0);
    if (k < 0 || k > kernels::kMaxTopLogprobs)
      f.bad("top_logprobs_num", fmt::format("must be in [0, {}], got {}", kernels::kMaxTopLogprobs, k));
    p.spec.top_logprobs = int(k);
  }
  GenerationSpec& s = p.spec;
  s.sampling = m.defaults;
  s.max_tokens = kDefaultMaxNewTokens;
  if (f.has("sampling_params")) {
    const JsonFields sp(f.raw("sampling_params"), "sampling_params.");
    if (auto v = sp.integer("max_new_tokens")) {
      if (*v <= 0) sp.bad("max_new_tokens", fmt::format("must be at least 1, got {}", *v));
      s.max_tokens = *v;
    }
    if (auto t = sp.number("temperature")) {
      if (*t < 0 || *t > 100) sp.bad("temperature", fmt::format("must be in [0, 100], got {}", *t));
      s.sampling.temperature = float(*t);
    }
    if (auto v = sp.number("top_p")) {
      if (!(*v > 0 && *v <= 1)) sp.bad("top_p", fmt::format("must be in (0, 1], got {}", *v));
      s.sampling.top_p = float(*v);
    }
    if (auto k = sp.integer("top_k")) {
      if (*k < -1 || *k == 0) sp.bad("top_k", fmt::format("must be -1 (no limit) or positive, got {}", *k));
      s.sampling.top_k = int(std::max<int64_t>(*k, 0));
    }
    for (const char* seed : {"sampling_seed", "seed"})
      if (auto v = sp.integer(seed)) s.sampling.seed = uint64_t(*v);
    s.stop = sp.strings("stop");
    if (auto ids = sp.ids("stop_token_ids", m.vocab_size)) s.stop_token_ids = *ids;
    s.ignore_eos = sp.boolean("ignore_eos").value_or(false);
    if (auto n = sp.integer("n"); n && *n != 1) sp.bad("n", "must be 1");
  }
  return p;
}

json generate_response(const ModelContext& m, const Parsed& req, const Generation& g, const Generation::Delta& d,
                       const std::string& rid, bool finished) {
  json finish = nullptr;
  if (finished) {
    switch (d.outcome) {
      case Outcome::stop:
        finish = {{"type", "stop"},
                  {"matched", !g.matched_stop().empty() ? json(g.matched_stop())
                              : g.matched_token() >= 0  ? json(g.matched_token())
                                                        : json(nullptr)}};
        break;
      case Outcome::length: finish = {{"type", "length"}, {"length", g.completion_tokens()}}; break;
      default: finish = {{"type", "abort"}, {"message", d.error.empty() ? "aborted" : d.error}}; break;
    }
  }
  json meta = {{"id", rid},
               {"finish_reason", finish},
               {"prompt_tokens", g.prompt_ids().size()},
               {"completion_tokens", g.completion_tokens()},
               {"cached_tokens", 0},
               {"e2e_latency", std::chrono::duration<double>(Clock::now() - g.arrival()).count()}};
  if (req.return_logprob) {
    json out = json::array(), top = json::array();
    for (size_t i = 0; i < d.ids.size() && i < d.logprobs.size(); ++i) {
      out.push_back(triple(m, req, d.logprobs[i].logprob, d.ids[i]));
      json alts = json::array();
      for (const auto& [id, v] : d.logprobs[i].top) alts.push_back(triple(m, req, v, id));
      top.push_back(alts);
    }
    meta["output_token_logprobs"] = out;
    meta["output_top_logprobs"] = top;
  }
  return {{"text", d.text}, {"output_ids", d.ids}, {"meta_info", meta}};
}

json tokenize(const json& body, const ModelContext& m) {
  const JsonFields f(body);
  const json& prompt = f.raw("prompt").is_null() ? f.raw("text") : f.raw("prompt");
  if (!prompt.is_string()) throw ApiError(400, "'prompt' must be a string", "prompt");
  std::vector<int32_t> ids;
  try {
    ids = m.tokenizer->encode(prompt.get<std::string>());
  } catch (const std::exception& e) {
    throw ApiError(400, fmt::format("the prompt cannot be tokenized: {}", e.what()), "prompt");
  }
  return {{"tokens", ids}, {"count", ids.size()}, {"max_model_len", m.context_length}};
}

json detokenize(const json& body, const ModelContext& m) {
  const JsonFields f(body);
  const auto ids = f.ids("tokens", m.tokenizer->vocab_size());
  if (!ids) throw ApiError(400, "'tokens' must be a list of token ids", "tokens");
  return {{"text", m.tokenizer->decode(*ids, /*skip_special=*/f.boolean("skip_special_tokens").value_or(false))}};
}

}  // namespace ballast::serve::sglang

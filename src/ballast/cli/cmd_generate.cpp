// ballast generate | logits: greedy decoding and one-pass logits.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <map>
#include <nlohmann/json.hpp>

#include "ballast/cli/commands.h"
#include "ballast/cli/model_args.h"
#include "ballast/core/error.h"
#include "ballast/io/safetensors.h"

namespace ballast::cli {

namespace {

struct GenerateArgs {
  std::string model, prompt_ids, prompts_file;
  int max_new_tokens = 32;
  int threads = 0;
  bool json = false;
};

int run_generate(const GenerateArgs& a) {
  std::vector<std::vector<int32_t>> prompts;
  if (!a.prompts_file.empty()) prompts = read_prompts_file(a.prompts_file);
  if (!a.prompt_ids.empty()) prompts.push_back(parse_ids(a.prompt_ids));
  check(!prompts.empty(), "give a prompt: --prompt-ids 1,2,3 or --prompts-file FILE");
  const auto dir = a.model.empty() ? default_model_dir() : std::filesystem::path(a.model);
  auto engine = load_engine(dir, a.threads);
  for (auto& p : prompts)
    for (int32_t id : p)
      check(id < engine->config().vocab_size, "prompt token id {} is outside the vocabulary of {}", id,
            engine->config().vocab_size);
  auto res = engine->generate_greedy(prompts, a.max_new_tokens);
  const auto& s = res.stats;
  const double prefill_tps = s.prefill_seconds > 0 ? s.prefill_tokens / s.prefill_seconds : 0;
  const double decode_tps = s.decode_seconds > 0 ? s.decode_tokens / s.decode_seconds : 0;
  if (a.json) {
    nlohmann::json j;
    j["output_ids"] = prompts.size() == 1 ? nlohmann::json(res.outputs[0]) : nlohmann::json(res.outputs);
    j["prefill_tokens"] = s.prefill_tokens;
    j["decode_tokens"] = s.decode_tokens;
    j["prefill_tokens_per_s"] = prefill_tps;
    j["decode_tokens_per_s"] = decode_tps;
    fmt::print("{}\n", j.dump());
  } else {
    for (auto& out : res.outputs) fmt::print("{}\n", fmt::join(out, ","));
    fmt::print(stderr, "prefill {} tokens at {:.1f} tok/s, decode {} tokens at {:.1f} tok/s\n", s.prefill_tokens,
               prefill_tps, s.decode_tokens, decode_tps);
  }
  return 0;
}

struct LogitsArgs {
  std::string model, prompt_ids, out;
  int threads = 0;
};

int run_logits(const LogitsArgs& a) {
  const auto ids = parse_ids(a.prompt_ids);
  check(!ids.empty(), "--prompt-ids is empty");
  const auto dir = a.model.empty() ? default_model_dir() : std::filesystem::path(a.model);
  auto engine = load_engine(dir, a.threads);
  std::vector<float> logits = engine->prefill_logits(ids);
  const int64_t V = engine->config().vocab_size;
  Tensor t = Tensor::borrow(logits.data(), {int64_t(ids.size()), V}, DType::F32);
  io::write_safetensors(a.out, {{"logits", t}});
  fmt::print(stderr, "wrote logits [{}, {}] to {}\n", ids.size(), V, a.out);
  return 0;
}

}  // namespace

void add_generate(CLI::App& app, Runner& run) {
  auto a = std::make_shared<GenerateArgs>();
  auto* c = app.add_subcommand("generate", "Greedy decoding of one prompt or a batch of prompts");
  c->add_option("--model", a->model, "Model directory (config.json + safetensors); default: the shipped model");
  c->add_option("--prompt-ids", a->prompt_ids, "Prompt as comma-separated token ids");
  c->add_option("--prompts-file", a->prompts_file, "File with one comma-separated id list per line (one batch)");
  c->add_option("--max-new-tokens", a->max_new_tokens, "Tokens to generate per prompt")->check(CLI::Range(1, 1 << 20));
  c->add_option("--threads", a->threads, "CPU threads (0 = all cores)");
  c->add_flag("--json", a->json, "Print one JSON object");
  c->callback([a, &run] { run = [a] { return run_generate(*a); }; });
}

void add_logits(CLI::App& app, Runner& run) {
  auto a = std::make_shared<LogitsArgs>();
  auto* c = app.add_subcommand("logits", "Write the float32 logits [T, vocab] of one prefill pass");
  c->add_option("--model", a->model, "Model directory; default: the shipped model");
  c->add_option("--prompt-ids", a->prompt_ids, "Prompt as comma-separated token ids")->required();
  c->add_option("--out", a->out, "Output .safetensors file (tensor 'logits')")->required();
  c->add_option("--threads", a->threads, "CPU threads (0 = all cores)");
  c->callback([a, &run] { run = [a] { return run_logits(*a); }; });
}

}  // namespace ballast::cli

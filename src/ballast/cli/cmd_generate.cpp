// ballast generate | logits: greedy decoding (one rank, in-process expert-parallel ranks, or MPI
// ranks) and one-pass logits.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>

#include "ballast/cli/commands.h"
#include "ballast/cli/engine_args.h"
#include "ballast/cli/model_args.h"
#include "ballast/cli/option_checks.h"
#include "ballast/cli/stop_signals.h"
#include "ballast/core/error.h"
#include "ballast/eplb/load.h"
#include "ballast/io/safetensors.h"
#include "ballast/runtime/distributed.h"
#include "ballast/runtime/speculative.h"
#include "ballast/text/tokenizer.h"

namespace ballast::cli {

namespace {

struct GenerateArgs {
  std::string model, prompt_ids, prompts_file, prompt;
  bool chat = false;
  int max_new_tokens = 32;
  bool json = false;
  EngineArgs engine;
  runtime::SamplingParams sampling;
};

// What one run produced, as rank 0 reports it.
struct Report {
  std::vector<std::vector<int32_t>> outputs;
  runtime::GenerationStats stats;
  nlohmann::json ep, speculative, cache;
  bool stopped = false;  // by SIGINT/SIGTERM: the outputs are what was generated until then
};

// Speculation figures over all ranks.
nlohmann::json speculative_summary(runtime::SpeculativeStats st, dist::Communicator* comm) {
  if (comm) {
    std::vector<int64_t> v{st.rounds, st.emitted};
    v.insert(v.end(), st.proposed.begin(), st.proposed.end());
    v.insert(v.end(), st.accepted.begin(), st.accepted.end());
    comm->all_reduce_sum(v);
    const size_t S = st.proposed.size();
    st.rounds = v[0];
    st.emitted = v[1];
    std::copy(v.begin() + 2, v.begin() + 2 + long(S), st.proposed.begin());
    std::copy(v.begin() + 2 + long(S), v.end(), st.accepted.begin());
  }
  std::vector<double> rate;
  for (size_t k = 0; k < st.proposed.size(); ++k)
    rate.push_back(st.proposed[k] ? double(st.accepted[k]) / double(st.proposed[k]) : 0.0);
  return {{"algorithm", "NEXTN"},           {"num_steps", st.proposed.size()},
          {"verify_rounds", st.rounds},     {"acceptance_length", st.acceptance_length()},
          {"acceptance_rate_per_position", rate}, {"draft_seconds", st.draft_seconds},
          {"verify_seconds", st.verify_seconds}};
}

Report run_on_rank(const GenerateArgs& a, const std::filesystem::path& dir, dist::Communicator* comm,
                   dist::DataPlane* data, int threads, const std::vector<std::vector<int32_t>>& prompts,
                   std::span<const int32_t> stop, const std::atomic<bool>* stopped_by_signal) {
  const EngineArgs& e = a.engine;
  const int ranks = comm ? comm->size() : 1;
  const bool speculate = e.speculate();
  runtime::EngineOptions opts =
      engine_options(e, comm, data,
                     to_cache_options(e.cache, prompts, (prompts.size() + size_t(ranks) - 1) / size_t(ranks),
                                      a.max_new_tokens, speculate ? 2 * e.speculative_steps : 0,
                                      model::load_model_config(dir).max_position_embeddings));
  // Speculation is this command's to switch on, per generate call (generate_speculative).
  opts.speculative_steps = 0;
  opts.stop = stopped_by_signal;
  auto engine = load_rank_engine(dir, e, opts, threads);
  for (auto& p : prompts)
    for (int32_t id : p)
      check(id < engine->config().vocab_size, "prompt token id {} is outside the vocabulary of {}", id,
            engine->config().vocab_size);
  auto* trunk = engine->trunk_ep();
  if (!e.ep.dump_distribution.empty() && trunk) trunk->domain.recorder.start();
  Report rep;
  rep.cache = {{"max_total_tokens", engine->max_total_tokens()},
               {"max_running_requests", opts.cache.max_running_requests},
               {"context_length", engine->context_length()}};
  runtime::SpeculativeStats spec_stats;
  auto generate = [&](const std::vector<std::vector<int32_t>>& mine) {
    if (!speculate) return engine->generate(mine, a.max_new_tokens, stop, a.sampling);
    return runtime::generate_speculative(*engine, mine, a.max_new_tokens,
                                         {.num_steps = e.speculative_steps, .sampling = a.sampling}, &spec_stats, stop);
  };
  if (comm) {
    auto r = runtime::generate_distributed(*comm, prompts, generate);
    rep.outputs = std::move(r.outputs);
    rep.stats = r.stats;
    rep.stopped = r.stopped;
    rep.ep = ep_summary(*engine, comm->size());
    // Every pass's load is summed over ranks before it is recorded: every rank holds the whole load.
    if (!e.ep.dump_distribution.empty() && trunk && comm->rank() == 0)
      eplb::write_load(e.ep.dump_distribution, trunk->domain.recorder.dump());
  } else {
    auto r = generate(prompts);
    rep.outputs = std::move(r.outputs);
    rep.stats = r.stats;
    rep.stopped = r.stopped;
  }
  if (speculate) rep.speculative = speculative_summary(spec_stats, comm);
  return rep;
}

int run_generate(const GenerateArgs& a) {
  const auto dir = a.model.empty() ? default_model_dir() : std::filesystem::path(a.model);
  std::vector<std::vector<int32_t>> prompts;
  if (!a.prompts_file.empty()) prompts = read_prompts_file(a.prompts_file);
  if (!a.prompt_ids.empty()) prompts.push_back(parse_ids(a.prompt_ids));
  std::optional<text::Tokenizer> tok;
  std::vector<int32_t> stop;
  if (!a.prompt.empty()) {
    tok.emplace(text::Tokenizer::load(dir));
    std::string rendered = a.prompt;
    if (a.chat) {
      const text::ChatMessage m{"user", a.prompt, std::nullopt};
      rendered = tok->render_chat(std::span<const text::ChatMessage>(&m, 1), {.add_generation_prompt = true,
                                                                               .enable_thinking = false});
    }
    prompts.push_back(tok->encode(rendered));
    stop = tok->eos_token_ids();
  }
  check(!prompts.empty(), "give a prompt: --prompt TEXT, --prompt-ids 1,2,3 or --prompts-file FILE");

  // SIGINT/SIGTERM: every rank ends its requests at its next step and what they generated is
  // printed (exit 128 + the signal); a second signal ends the process at once.
  std::atomic<bool> stop_requested{false};
  std::atomic<int> stop_signal{0};
  StopSignals signals([&](int sig) {
    if (stop_signal.exchange(sig) != 0) std::_Exit(128 + sig);
    fmt::print(stderr, "{}: stopping at the next step; printing what was generated (again to quit at once)\n",
               strsignal(sig));
    stop_requested.store(true);
  });
  Report rep;
  std::mutex mu;
  bool has_rank0 = false;
  const int ranks = run_on_ranks(a.engine, [&](dist::Communicator* comm, dist::DataPlane* data, int threads) {
    Report r = run_on_rank(a, dir, comm, data, threads, prompts, stop, &stop_requested);
    std::lock_guard lk(mu);
    if (!comm || comm->rank() == 0) {
      rep = std::move(r);
      has_rank0 = true;
    }
  });
  const int exit_code = rep.stopped ? 128 + stop_signal.load() : 0;
  if (!has_rank0) return exit_code;  // an MPI rank other than 0: rank 0 reports

  const auto& s = rep.stats;
  const double prefill_tps = s.prefill_seconds > 0 ? s.prefill_tokens / s.prefill_seconds : 0;
  const double decode_tps = s.decode_seconds > 0 ? s.decode_tokens / s.decode_seconds : 0;
  std::vector<std::string> texts;
  if (tok)
    for (auto& o : rep.outputs) texts.push_back(tok->decode(o, /*skip_special=*/true));
  if (a.json) {
    nlohmann::json j;
    j["output_ids"] = rep.outputs.size() == 1 ? nlohmann::json(rep.outputs[0]) : nlohmann::json(rep.outputs);
    if (tok) j["text"] = texts.size() == 1 ? nlohmann::json(texts[0]) : nlohmann::json(texts);
    j["prefill_tokens"] = s.prefill_tokens;
    j["decode_tokens"] = s.decode_tokens;
    j["prefill_tokens_per_s"] = prefill_tps;
    j["decode_tokens_per_s"] = decode_tps;
    j["passes"] = s.passes;
    j["cache"] = rep.cache;  // per rank
    if (rep.stopped) j["stopped"] = strsignal(stop_signal.load());
    if (!rep.ep.is_null()) j["expert_parallel"] = rep.ep;
    if (!rep.speculative.is_null()) {
      j["speculative"] = rep.speculative;
      j["acceptance_length"] = rep.speculative["acceptance_length"];
    }
    fmt::print("{}\n", j.dump());
  } else {
    if (tok)
      for (auto& t : texts) fmt::print("{}{}\n", a.chat ? "" : a.prompt, t);
    else
      for (auto& out : rep.outputs) fmt::print("{}\n", fmt::join(out, ","));
    fmt::print(stderr, "prefill {} tokens at {:.1f} tok/s, decode {} tokens at {:.1f} tok/s{}\n", s.prefill_tokens,
               prefill_tps, s.decode_tokens, decode_tps, ranks > 1 ? fmt::format(" over {} ranks", ranks) : "");
  }
  std::fflush(stdout);
  return exit_code;
}

struct LogitsArgs {
  std::string model, prompt_ids, out;
  int threads = 0;
  DeviceArgs device;
};

int run_logits(const LogitsArgs& a) {
  const auto ids = parse_ids(a.prompt_ids);
  check(!ids.empty(), "--prompt-ids is empty");
  const auto dir = a.model.empty() ? default_model_dir() : std::filesystem::path(a.model);
  runtime::EngineOptions opts;
  opts.cache = to_cache_options(CacheArgs{}, {ids}, 1, 0, 0, model::load_model_config(dir).max_position_embeddings);
  auto engine = load_engine(dir, a.device, a.threads, opts);
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
  auto* c = app.add_subcommand("generate", "Generate from one prompt or a batch of prompts (greedy or sampled)");
  c->add_option("--model", a->model, "Model directory (config.json + safetensors); default: the shipped model");
  c->add_option("--prompt", a->prompt, "Prompt text (tokenized with the model's tokenizer.json)");
  c->add_flag("--chat", a->chat, "Wrap --prompt as a user message in the chat format");
  c->add_option("--prompt-ids", a->prompt_ids, "Prompt as comma-separated token ids");
  c->add_option("--prompts-file", a->prompts_file, "File with one comma-separated id list per line (one batch)");
  c->add_option("--max-new-tokens", a->max_new_tokens, "Tokens to generate per prompt")->check(CLI::Range(1, 1 << 20));
  c->add_flag("--json", a->json, "Print one JSON object");
  c->add_option("--temperature", a->sampling.temperature, "0 = greedy (default); else sample")->check(finite_range(0, 100));
  c->add_option("--top-p", a->sampling.top_p, "Nucleus sampling mass")->check(finite_range(1e-6, 1));
  c->add_option("--top-k", a->sampling.top_k, "Sample among the k most likely tokens (0 = all)")->check(CLI::Range(0, 1 << 20));
  c->add_option("--seed", a->sampling.seed, "Sampling seed")->check(unsigned_integer());
  add_engine_options(c, a->engine);
  c->callback([a, &run] {
    validate(a->engine);
    run = [a] { return run_generate(*a); };
  });
}

void add_logits(CLI::App& app, Runner& run) {
  auto a = std::make_shared<LogitsArgs>();
  auto* c = app.add_subcommand("logits", "Write the float32 logits [T, vocab] of one prefill pass");
  c->add_option("--model", a->model, "Model directory; default: the shipped model");
  c->add_option("--prompt-ids", a->prompt_ids, "Prompt as comma-separated token ids")->required();
  c->add_option("--out", a->out, "Output .safetensors file (tensor 'logits')")->required();
  c->add_option("--threads", a->threads, "CPU threads (0 = all cores)")->check(CLI::Range(0, 1024));
  add_device_option(c, a->device);
  c->callback([a, &run] { run = [a] { return run_logits(*a); }; });
}

}  // namespace ballast::cli

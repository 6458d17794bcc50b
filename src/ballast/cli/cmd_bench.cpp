// ballast bench: CPU prefill and decode throughput on a model (the shipped one, a directory, or a
// random mid-size model written to a temporary directory), with decode's achieved memory
// bandwidth reported against this machine's measured copy bandwidth, as a ratio.
#include <fmt/format.h>

#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>

#include "ballast/cli/commands.h"
#include "ballast/cli/model_args.h"
#include "ballast/core/clock.h"
#include "ballast/core/error.h"
#include "ballast/core/thread_pool.h"
#include "ballast/model/config.h"
#include "ballast/model/param_count.h"
#include "ballast/model/random_checkpoint.h"
#include "ballast/runtime/speculative.h"

namespace ballast::cli {

namespace {

struct BenchArgs {
  std::string model;
  bool synthetic = false;
  int prompt_len = 256, decode_steps = 32, batch = 1, threads = 0, repeats = 3;
  int speculative_steps = 0;  // > 0: also decode with MTP speculation, in the same run
  bool json = false;
  std::string device = "auto";
  bool disable_cuda_graph = false;
};


// Copy bandwidth (bytes read + bytes written per second) of a parallel memcpy over buffers far
// larger than the caches: the speed of light for a decode step that streams weights once. On a
// GPU, the backend's own device-to-device copy of 2 GiB.
double measure_copy_bandwidth(kernels::Backend& be, int threads) {
  if (be.device() != Device::CPU) {
    const int64_t n = int64_t(1) << 29;  // floats: 2 GiB
    Tensor a = be.alloc({n}, DType::F32), b = be.alloc({n}, DType::F32);
    be.ops().zero(a);
    double best = 0;
    for (int r = 0; r < 6; ++r) {
      be.synchronize();
      const double t0 = now_seconds();
      be.ops().copy(a, b);
      be.synchronize();
      if (r > 0) best = std::max(best, 2.0 * double(a.nbytes()) / seconds_since(t0));
    }
    return best;
  }
  ThreadPool pool(threads);
  const size_t bytes = size_t(1) << 30;
  std::vector<char> a(bytes, 1), b(bytes, 2);
  double best = 0;
  for (int r = 0; r < 5; ++r) {
    const double t0 = now_seconds();
    pool.parallel_for(int64_t(bytes >> 20), [&](int64_t i0, int64_t i1) {
      std::memcpy(b.data() + (i0 << 20), a.data() + (i0 << 20), size_t(i1 - i0) << 20);
    });
    best = std::max(best, 2.0 * double(bytes) / seconds_since(t0));
  }
  return best;
}

// Bytes one decode step touches per sequence: the weights a token visits (its k routed experts,
// everything else but the embedding table, of which it reads one row) and its DeltaNet state
// (read and written) and KV cache (read) at context length `context`.
double decode_bytes_per_token(const model::ModelConfig& c, double weight_bytes, int64_t context) {
  const auto p = model::count_parameters(c);
  double params = double(p.active_per_token() - p.embedding + c.hidden_size);
  if (p.lm_head == 0) params += double(p.embedding);  // tied: lm_head reads the whole table
  return params * weight_bytes + 2.0 * double(model::deltanet_state_bytes(c)) +
         double(model::kv_bytes_per_token(c, 4)) * double(context);
}

int run_bench(const BenchArgs& a) {
  std::filesystem::path dir;
  std::filesystem::path tmp;
  if (a.synthetic) {
    tmp = std::filesystem::temp_directory_path() / fmt::format("ballast-bench-{}", ::getpid());
    fmt::print(stderr, "writing a random mid-size model (H=1024, 8 layers, 64 experts, top-8, bf16) to {}\n",
               tmp.string());
    model::write_random_checkpoint(model::random_model_config({}), tmp, 1234);
    dir = tmp;
  } else {
    dir = a.model.empty() ? default_model_dir() : std::filesystem::path(a.model);
  }
  struct Cleanup {
    std::filesystem::path p;
    ~Cleanup() {
      std::error_code ec;
      if (!p.empty()) std::filesystem::remove_all(p, ec);
    }
  } cleanup{tmp};

  const model::ModelConfig cfg = model::load_model_config(dir);
  std::mt19937 rng(7);
  std::vector<std::vector<int32_t>> prompts(static_cast<size_t>(a.batch));
  for (auto& p : prompts)
    for (int i = 0; i < a.prompt_len; ++i) p.push_back(int32_t(rng() % uint32_t(cfg.vocab_size)));
  // Every prompt's prefill in one pass, as the figures are per pass.
  CacheArgs cache;
  cache.chunked_prefill_size = std::max(cache.chunked_prefill_size, a.batch * a.prompt_len);
  runtime::EngineOptions opts;
  opts.cache = to_cache_options(cache, prompts, prompts.size(), a.decode_steps + 1, 2 * a.speculative_steps);
  opts.cuda_graphs = !a.disable_cuda_graph;
  auto engine = load_engine(dir, a.device, a.threads, opts);

  // Best of `repeats` runs of prefill + decode.
  runtime::GenerationStats best;
  double best_prefill = 0, best_decode = 0;
  int64_t step_downloads = 0, step_passes = 0;
  for (int r = 0; r < a.repeats; ++r) {
    const kernels::Counters before = engine->backend().counters();
    auto res = engine->generate(prompts, a.decode_steps + 1);
    step_downloads = engine->backend().counters().downloads - before.downloads;
    step_passes = res.stats.passes;
    const auto& s = res.stats;
    best_prefill = std::max(best_prefill, s.prefill_tokens / s.prefill_seconds);
    best_decode = std::max(best_decode, s.decode_tokens / s.decode_seconds);
    best = s;
  }
  // Speculation, measured in the same run on the same prompts: decode speed ratio and acceptance.
  double spec_decode = 0;
  runtime::SpeculativeStats spec;
  if (a.speculative_steps > 0) {
    for (int r = 0; r < a.repeats; ++r) {
      runtime::SpeculativeStats st;
      auto res = runtime::generate_speculative(*engine, prompts, a.decode_steps + 1, {.num_steps = a.speculative_steps}, &st);
      const double tps = res.stats.decode_tokens / res.stats.decode_seconds;
      if (tps > spec_decode) spec_decode = tps, spec = st;
    }
  }
  const double copy_bw = measure_copy_bandwidth(engine->backend(), a.threads);
  const double wbytes = double(dtype_size(engine->model().weights().embed.dtype()));
  const int64_t mid_context = a.prompt_len + a.decode_steps / 2;
  // At batch b a step reads the shared weights once; routed experts differ per sequence, so
  // charge bytes per sequence-token as the batch-1 figure (an upper bound on sharing).
  const double bytes_tok = decode_bytes_per_token(cfg, wbytes, mid_context);
  const double achieved = bytes_tok * best_decode / (a.batch > 1 ? a.batch : 1);
  const double ratio = achieved / copy_bw;

  if (a.json) {
    nlohmann::json j = {{"model", dir.string()},           {"synthetic", a.synthetic},
                        {"device", engine->backend().describe()},
                        {"threads", a.threads},            {"batch", a.batch},
                        {"prompt_len", a.prompt_len},      {"decode_steps", a.decode_steps},
                        {"prefill_tokens_per_s", best_prefill}, {"decode_tokens_per_s", best_decode},
                        {"decode_bytes_per_token", bytes_tok},  {"decode_bandwidth_gb_s", achieved / 1e9},
                        {"copy_bandwidth_gb_s", copy_bw / 1e9}, {"bandwidth_ratio", ratio},
                        // A decode step: kernels and copies in its graph (0: eager), host waits.
                        {"decode_graph_nodes", engine->runner().last_graph_nodes()},
                        {"downloads_per_pass", step_passes ? double(step_downloads) / double(step_passes) : 0.0}};
    if (a.speculative_steps > 0) {
      j["speculative_num_steps"] = a.speculative_steps;
      j["speculative_decode_tokens_per_s"] = spec_decode;
      j["speculative_speedup"] = spec_decode / best_decode;
      j["acceptance_length"] = spec.acceptance_length();
    }
    fmt::print("{}\n", j.dump());
  } else {
    fmt::print("model            {}\n", a.synthetic ? "random mid-size (H=1024, 8 layers, 64 experts, top-8, bf16)" : dir.string());
    fmt::print("device           {}\n", engine->backend().describe());
    fmt::print("prefill          {:.1f} tokens/s ({} x {} tokens)\n", best_prefill, a.batch, a.prompt_len);
    fmt::print("decode           {:.1f} tokens/s (batch {})\n", best_decode, a.batch);
    fmt::print("bytes per token  {:.1f} MB (weights visited + DeltaNet state + KV at {} tokens)\n", bytes_tok / 1e6,
               mid_context);
    fmt::print("decode bandwidth {:.2f} GB/s vs copy bandwidth {:.2f} GB/s: ratio {:.2f}\n", achieved / 1e9,
               copy_bw / 1e9, ratio);
    if (a.speculative_steps > 0)
      fmt::print("speculative      {:.1f} tokens/s with {} MTP draft steps: {:.2f}x decode, acceptance length {:.2f}\n",
                 spec_decode, a.speculative_steps, spec_decode / best_decode, spec.acceptance_length());
  }
  return 0;
}

}  // namespace

void add_bench(CLI::App& app, Runner& run) {
  auto a = std::make_shared<BenchArgs>();
  auto* c = app.add_subcommand("bench", "Prefill/decode throughput and decode bandwidth vs the machine's copy bandwidth");
  c->add_option("--model", a->model, "Model directory; default: the shipped model");
  c->add_flag("--synthetic", a->synthetic, "Benchmark a random mid-size model (H=1024, 8 layers, 64 experts, top-8)");
  c->add_option("--prompt-len", a->prompt_len, "Prompt tokens per sequence")->check(CLI::Range(1, 1 << 20));
  c->add_option("--decode-steps", a->decode_steps, "Decode steps")->check(CLI::Range(1, 1 << 20));
  c->add_option("--batch", a->batch, "Sequences decoded together")->check(CLI::Range(1, 4096));
  c->add_option("--repeats", a->repeats, "Runs; the best is reported")->check(CLI::Range(1, 100));
  c->add_option("--threads", a->threads, "CPU threads (0 = all cores)");
  c->add_option("--speculative-num-steps", a->speculative_steps,
                "Also decode with MTP speculation (NEXTN) of this many draft steps, in the same run")
      ->check(CLI::Range(0, 16));
  c->add_flag("--json", a->json, "Print one JSON object");
  add_device_option(c, a->device);
  c->add_flag("--disable-cuda-graph", a->disable_cuda_graph, "Run decode passes eagerly (no CUDA graphs)");
  c->callback([a, &run] { run = [a] { return run_bench(*a); }; });
}

}  // namespace ballast::cli

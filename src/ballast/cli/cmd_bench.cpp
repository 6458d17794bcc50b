// ballast bench: prefill and decode throughput of a model (the shipped one, a directory, or a
// synthetic model of a published size with random weights made on the device), every figure
// beside the hardware's ceilings measured in the same run: decode as a fraction of the copy
// bandwidth (bytes a step must read / step time), prefill as a fraction of the vendor library's
// dense GEMM rate (FLOPs a pass must do / pass time). With --profile, where a decode step and a
// prefill pass spend their time, op by op.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <unistd.h>
#include <tuple>

#include "ballast/cli/commands.h"
#include "ballast/cli/engine_args.h"
#include "ballast/cli/ep_args.h"
#include "ballast/cli/model_args.h"
#include "ballast/core/clock.h"
#include "ballast/core/error.h"
#include "ballast/dist/mpi_communicator.h"
#include "ballast/model/config.h"
#include "ballast/model/param_count.h"
#include "ballast/model/random_checkpoint.h"
#include "ballast/model/random_weights.h"
#include "ballast/runtime/speculative.h"

namespace ballast::cli {

namespace {

struct BenchArgs {
  std::string model;
  std::string synthetic;  // a preset name (model::preset_names), or empty
  int layers = 0;
  std::string dtype = "bf16";  // synthetic weights: bf16, or fp8 (Qwen's block-scaled FP8 where its releases have it)
  std::string save;            // synthetic models: write them here as a checkpoint directory, and stop
  int prompt_len = 256, decode_steps = 32, threads = 0, repeats = 3;
  int64_t context_length = 0;  // the cache's longest sequence (0: what the runs need)
  double dist_timeout = 600;
  std::string batches = "1", prefills, speculative;
  bool profile = false, json = false;
  bool profiler_window = false;  // one more decode step of the first batch inside it
  std::string json_file;  // also write the JSON object here
  DeviceArgs device;
  PassArgs passes;
  EpArgs ep;  // --ep G: in-process ranks (under mpirun, the MPI world), attention data-parallel
};

// The ranks a bench runs on (one without expert parallelism): their sums and agreement. Under
// expert parallelism every rank runs every pass, so the loops below take the same number of
// steps on every rank.
struct Ranks {
  dist::Communicator* comm = nullptr;
  int rank() const { return comm ? comm->rank() : 0; }
  int size() const { return comm ? comm->size() : 1; }
  double sum(double v) const {
    if (comm) comm->all_reduce_sum(std::span<double>(&v, 1));
    return v;
  }
  bool any(bool flag) const { return comm ? comm->all_reduce_or(flag) : flag; }
  // This rank's share of n sequences.
  int share(int n) const { return n / size() + (rank() < n % size() ? 1 : 0); }
};

std::vector<int> parse_list(const std::string& csv, const char* option, int limit) {
  std::vector<int> out;
  if (csv.empty()) return out;
  for (int32_t v : parse_ids(csv)) {
    check(v > 0 && v <= limit, "{}: {} is not a count in [1, {}]", option, v, limit);
    out.push_back(v);
  }
  return out;
}

std::vector<int32_t> random_prompt(std::mt19937& rng, int len, int vocab) {
  std::vector<int32_t> p(static_cast<size_t>(len));
  for (int32_t& t : p) t = int32_t(rng() % uint32_t(vocab));
  return p;
}

// What a decode step must move and a prefill pass must compute (the numerators of the ratios).
// Bytes of a weight as stored (block-scaled FP8: its elements and its scales).
double stored_bytes(const Tensor& t) {
  return double(t.nbytes()) + (t.dtype() == DType::F8_E4M3_B128 ? double(t.scales().nbytes()) : 0.0);
}

// The trunk's weight bytes as stored, by what a decode step reads of them.
struct WeightBytes {
  double trunk = 0;       // every tensor of the trunk once (a tied head counted once)
  double embedding = 0;   // the embedding table
  double routed = 0;      // every routed expert
  double embed_row = 0;   // one embedding row
  bool tied = false;
};
WeightBytes weight_bytes(const model::ModelWeights& weights) {
  model::ModelWeights w = weights;  // tensor handles: for_each_tensor wants them mutable
  w.mtp.reset();
  WeightBytes b;
  model::for_each_tensor(w, [&](Tensor& t) { b.trunk += stored_bytes(t); });
  b.embedding = stored_bytes(w.embed);
  b.embed_row = w.embed.dim(0) > 0 ? b.embedding / double(w.embed.dim(0)) : 0.0;
  b.tied = w.lm_head.raw() == w.embed.raw();
  for (const auto& l : w.layers)
    for (const auto& e : l.moe.experts) b.routed += stored_bytes(e.gate) + stored_bytes(e.up) + stored_bytes(e.down);
  return b;
}
// The engine's: under expert parallelism its model holds no routed expert (the ranks' slots do), so
// they are counted from a slot's weights, every logical expert of every MoE layer once.
WeightBytes weight_bytes(runtime::Engine& e) {
  WeightBytes b = weight_bytes(e.model().weights());
  if (const moe::ExpertParallelDomain* d = e.trunk_ep()) {
    const kernels::SwigluWeights& w = d->slots.weights(0, 0);
    const double expert = stored_bytes(w.gate) + stored_bytes(w.up) + stored_bytes(w.down);
    b.routed = expert * double(d->domain.placement.layers) * double(e.config().num_experts);
    b.trunk += b.routed;
  }
  return b;
}

struct Work {
  const model::ModelConfig& c;
  model::ParamCounts p;
  WeightBytes wb;
  int64_t kv_element_bytes;  // of the backend's K/V caches (fp32, or bf16 under bf16 products on a GPU)

  // Expected distinct experts of E that b tokens visit per layer, each choosing k uniformly.
  double distinct_experts(int b) const {
    const double E = c.num_experts, k = c.num_experts_per_tok;
    return E > 0 ? E * (1.0 - std::pow(1.0 - k / E, b)) : 0.0;
  }
  // Bytes one decode step of b sequences at `context` reads and writes: every weight but the
  // embedding table and the routed experts once, the routed experts the batch visits, b embedding
  // rows, each sequence's DeltaNet state (read and written) and KV cache (read).
  double step_bytes(int b, int64_t context) const {
    const double shared = wb.trunk - wb.embedding - wb.routed + (wb.tied ? wb.embedding : 0.0);
    const double per_expert = c.num_experts > 0 ? wb.routed / (double(c.num_moe_layers()) * c.num_experts) : 0;
    const double experts = distinct_experts(b) * per_expert * c.num_moe_layers();
    return shared + experts + double(b) * wb.embed_row +
           double(b) * (2.0 * double(model::deltanet_state_bytes(c)) +
                        double(model::kv_bytes_per_token(c, kv_element_bytes)) * double(context));
  }
  // FLOPs of a prefill pass of one sequence of n tokens: 2 per weight a token visits (k routed
  // experts; the lm_head for the last row only), the causal attention's scores and values
  // (4 Hq hd per query-key pair), the delta rule's state update and output (4 dk dv per token and
  // value head).
  double prefill_flops(int64_t n) const {
    const double head = double(p.lm_head == 0 ? p.embedding : p.lm_head);
    const double matrices = double(p.active_per_token() - p.embedding - p.norms) - (p.lm_head == 0 ? 0.0 : head);
    const double pairs = double(n) * double(n + 1) / 2.0;
    return 2.0 * matrices * double(n) + 2.0 * head +
           4.0 * c.num_heads * c.head_dim * pairs * c.num_full_attention_layers() +
           4.0 * c.linear_key_head_dim * c.linear_value_head_dim * c.linear_num_value_heads * double(n) *
               c.num_linear_attention_layers();
  }
};

// Steps the engine until every request it holds has finished (or been aborted).
void drain(runtime::Engine& e, const std::vector<int64_t>& ids) {
  for (int64_t id : ids) e.abort(id);
  while (e.step()) {
  }
}

struct DecodeFigure {
  int batch;
  double tokens_per_s, step_seconds;
  int64_t graph_nodes;  // of the step's graph (0: eager)
  std::vector<kernels::OpTime> profile;
};

constexpr int kWarmupSteps = 3;
// Tokens of the untimed generation before a speculation figure: every graph of its passes warmed
// and captured (a bucket runs eagerly once, is captured the second time, replays after).
constexpr int kSpecWarmupTokens = 16;

// New tokens a decoding sequence of the bench may need: the first ones come while other prompts
// are still being prefilled in chunks (one per prefill pass), then the warm-up, the timed steps and
// the profiled ones. Every sequence must still be running at the last timed step.
int decode_budget(int batch, int context, int steps, int chunk) {
  return int((int64_t(batch) * context + chunk - 1) / chunk) + kWarmupSteps + steps + 3;
}

// Decode of `batch` sequences at `context` tokens: prefill them, run the warm-up steps (graphs are
// captured there), then time `steps` steps, each of which must draw for all `batch` sequences.
// With `profile`, one more step with op timing; with `window`, one more step (as it runs: a graph
// where there is one) inside the external profiler's window.
DecodeFigure measure_decode(runtime::Engine& e, const Ranks& ranks, std::mt19937& rng, int batch, int context,
                           int steps, bool profile, bool window) {
  const int budget = decode_budget(batch, context, steps, int(e.scheduler().options().token_budget));
  std::vector<int64_t> ids;
  for (int i = 0; i < ranks.share(batch); ++i)
    ids.push_back(e.add_request({random_prompt(rng, context, e.config().vocab_size), {}, budget, {}}));
  std::set<int64_t> started;
  while (ranks.any(started.size() < ids.size())) {
    check(e.step(), "bench: the engine stopped before every prompt was prefilled");
    for (const auto& o : e.outputs())
      if (!o.tokens.empty()) started.insert(o.id);
  }
  for (int i = 0; i < kWarmupSteps; ++i) e.step();
  int64_t tokens = 0;
  const double t0 = now_seconds();
  for (int i = 0; i < steps; ++i) {
    e.step();
    for (const auto& o : e.outputs()) tokens += int64_t(o.tokens.size());
  }
  const double seconds = seconds_since(t0);
  tokens = int64_t(ranks.sum(double(tokens)));
  check(tokens == int64_t(batch) * steps, "bench: {} tokens in {} decode steps of batch {} (a sequence stopped early)",
        tokens, steps, batch);
  DecodeFigure f{batch, double(tokens) / seconds, seconds / steps, e.runner().last_graph_nodes(), {}};
  if (profile) {
    e.backend().start_op_timing();
    e.step();
    f.profile = e.backend().stop_op_timing();
  }
  if (window) {
    e.backend().profiler_window(true);
    e.step();
    e.backend().profiler_window(false);
  }
  drain(e, ids);
  return f;
}

struct PrefillFigure {
  int tokens;
  double tokens_per_s, seconds;
  std::vector<kernels::OpTime> profile;
};

// One sequence of n tokens (on the first rank) prefilled in one pass and its first token drawn;
// best of `repeats` after one untimed pass (buffers grow there).
PrefillFigure measure_prefill(runtime::Engine& e, const Ranks& ranks, std::mt19937& rng, int n, int repeats,
                              bool profile) {
  double best = 1e30;
  for (int r = 0; r <= repeats + (profile ? 1 : 0); ++r) {
    const bool profiling = profile && r == repeats + 1;
    const std::vector<int32_t> prompt = random_prompt(rng, n, e.config().vocab_size);
    const int64_t id = ranks.rank() == 0 ? e.add_request({prompt, {}, 1, {}}) : -1;
    if (profiling) e.backend().start_op_timing();
    const double t0 = now_seconds();
    e.step();
    const double s = seconds_since(t0);
    if (profiling) {
      PrefillFigure f{n, double(n) / best, best, e.backend().stop_op_timing()};
      drain(e, {id});
      return f;
    }
    if (r > 0) best = std::min(best, s);
    drain(e, {id});
  }
  return {n, double(n) / best, best, {}};
}

nlohmann::json profile_json(const std::vector<kernels::OpTime>& ops) {
  double total = 0;
  for (const auto& o : ops) total += o.seconds;
  nlohmann::json j = nlohmann::json::array();
  for (const auto& o : ops)
    j.push_back({{"op", o.op}, {"calls", o.calls}, {"seconds", o.seconds}, {"share", total > 0 ? o.seconds / total : 0}});
  return j;
}

void print_profile(const std::string& title, const std::vector<kernels::OpTime>& ops, double wall) {
  double total = 0;
  for (const auto& o : ops) total += o.seconds;
  fmt::print("\n{}, run eagerly with every op timed: {:.3f} ms of op time (timed as measured above: {:.3f} ms)\n",
             title, total * 1e3, wall * 1e3);
  fmt::print("  {:<30} {:>6} {:>10} {:>7}\n", "op", "calls", "ms", "share");
  for (size_t i = 0; i < ops.size() && i < 12; ++i)
    fmt::print("  {:<30} {:>6} {:>10.3f} {:>6.1f}%\n", ops[i].op, ops[i].calls, ops[i].seconds * 1e3,
               total > 0 ? 100.0 * ops[i].seconds / total : 0.0);
}

// --save DIR: the synthetic model as a Hugging Face checkpoint directory (config.json with both layer
// keys, model.safetensors in bf16 from a fixed seed, the shipped model's tokenizer files), for
// `bench --model DIR` and for other engines' converters (llama.cpp's pads the vocabulary past the
// tokenizer's). Made on the host, so it must fit the host's memory.
int save_synthetic(const BenchArgs& a) {
  check(a.dtype == "bf16", "--save writes bf16 checkpoints (--dtype fp8 makes FP8 weights on the device only)");
  const std::filesystem::path dir(a.save);
  check(!std::filesystem::exists(dir) || std::filesystem::is_empty(dir), "--save {}: exists and is not empty",
        dir.string());
  const model::RandomModelShape shape = model::preset_shape(a.synthetic, a.layers);
  const nlohmann::json config = model::random_model_config(shape);
  const model::ModelConfig cfg = model::parse_model_config(config, "synthetic " + a.synthetic);
  const int64_t params = model::count_parameters(cfg).total();
  const double bytes = 2.0 * double(params);
  const double host = double(sysconf(_SC_PHYS_PAGES)) * double(sysconf(_SC_PAGESIZE));
  check(bytes < 0.8 * host, "--save: {} of {} layers is {:.1f} GB in bf16, more than this host's memory ({:.1f} GB) "
        "allows; keep fewer with --layers", a.synthetic, shape.layers, bytes / 1e9, host / 1e9);
  const std::filesystem::path tok = default_model_dir();  // whose tokenizer files go along
  fmt::print(stderr, "writing synthetic {} ({} layers, {:.2f} B parameters, {:.1f} GB bf16) to {}\n", a.synthetic,
             shape.layers, double(params) / 1e9, bytes / 1e9, dir.string());
  model::write_random_checkpoint(config, dir, /*seed=*/1, DType::BF16);
  for (const char* f : {"tokenizer.json", "tokenizer_config.json"})
    if (std::filesystem::exists(tok / f)) std::filesystem::copy_file(tok / f, dir / f);
  fmt::print("{}\n", dir.string());
  return 0;
}

int run_bench(const BenchArgs& a) {
  const std::vector<int> batches = parse_list(a.batches, "--batch", 1 << 16);
  std::vector<int> prefills = parse_list(a.prefills, "--prefill", 1 << 24);
  const std::vector<int> spec_steps = parse_list(a.speculative, "--speculative-num-steps", runtime::kMaxDraftSteps);
  check(!batches.empty(), "--batch: no batch size given");
  check(a.synthetic.empty() || a.model.empty(), "--synthetic and --model: give one");
  check(a.layers == 0 || !a.synthetic.empty(), "--layers applies to --synthetic models only");
  check(a.dtype == "bf16" || !a.synthetic.empty(), "--dtype applies to --synthetic models only (a checkpoint has its own)");
  check(a.device.quantization == "none" || a.synthetic.empty(),
        "--quantization applies to checkpoints (synthetic models take --dtype fp8)");
  check(a.save.empty() || !a.synthetic.empty(), "--save applies to --synthetic models only");
  if (!a.save.empty()) return save_synthetic(a);
  const int bmax = *std::max_element(batches.begin(), batches.end());
  if (prefills.empty()) prefills = {a.prompt_len};
  const int pmax = *std::max_element(prefills.begin(), prefills.end());
  const int smax = spec_steps.empty() ? 0 : *std::max_element(spec_steps.begin(), spec_steps.end());

  // Limits for every run of this bench: bmax sequences of prompt_len + decode, or one of pmax.
  runtime::EngineOptions opts;
  runtime::CacheOptions& cache = opts.cache;
  cache.max_running_requests = bmax;
  // A pass holds the longest prefill, or the prompts of the batch (up to 16k rows).
  cache.chunked_prefill_size = std::max({pmax, 2048, int(std::min<int64_t>(int64_t(bmax) * a.prompt_len, 16384))});
  const int64_t per_seq =
      a.prompt_len + decode_budget(bmax, a.prompt_len, a.decode_steps, cache.chunked_prefill_size) + 2 * smax + 8;
  const int64_t page = cache.page_size;
  cache.max_total_tokens = std::max(int64_t(bmax) * (per_seq + page), int64_t(pmax) + 2 * page);
  cache.context_length = std::max<int64_t>(per_seq, pmax + 1);
  check(a.context_length == 0 || a.context_length >= cache.context_length,
        "--context-length {}: the runs need sequences of {} tokens", a.context_length, cache.context_length);
  if (a.context_length > 0) cache.context_length = a.context_length;
  a.passes.apply(opts);

  EngineArgs ranks_args;
  ranks_args.ep = a.ep;
  ranks_args.threads = a.threads;
  ranks_args.device = a.device;
  // The ranks of this process share one set of synthetic weights, made by the first to need it on
  // a backend of its own (each rank's expert slots are filled from it): a set per rank would take
  // G times the memory (the 80B shape's 8 layers are 27.6 GB in bf16).
  struct SharedWeights {
    std::once_flag once, released;
    std::unique_ptr<kernels::Backend> backend;
    model::ModelWeights weights;
    double seconds = 0;
  } shared;
  ranks_args.dist_timeout = a.dist_timeout;
  run_on_ranks(ranks_args, [&](dist::Communicator* comm, dist::DataPlane* data, int threads) {
    const Ranks ranks{comm};
    runtime::EngineOptions o = opts;
    o.comm = comm;
    o.data = data;
    check(comm || a.ep.init_location.empty() || a.ep.init_location == "trivial",
          "--init-expert-location {}: the run has no expert parallelism to place (add --ep G, or run under mpirun)",
          a.ep.init_location);
    if (comm) {  // attention data-parallel: each rank decodes its share of the batch
      o.ep = to_ep_options(a.ep, ranks.size());
      const int share = (bmax + ranks.size() - 1) / ranks.size();
      o.cache.max_running_requests = share;
      // The ranks' passes together hold what one rank's would (SGLang divides its chunked prefill
      // size by the attention data-parallel ranks likewise): every rank's expert-parallel buffers
      // take up to G x its rows x top-k rows of the hidden size, and in-process ranks share a device.
      o.cache.chunked_prefill_size = std::max(pmax, (cache.chunked_prefill_size + ranks.size() - 1) / ranks.size());
    }
    const int gpu = rank_gpu(a.device, comm);
    std::unique_ptr<runtime::Engine> engine;
    std::string model_name;
    if (!a.synthetic.empty()) {
      // With speculation, the model gets its MTP head (one layer, as the releases have it).
      model::RandomModelShape shape = model::preset_shape(a.synthetic, a.layers);
      shape.mtp_layers = smax > 0 ? 1 : 0;
      model::ModelConfig cfg = model::parse_model_config(model::random_model_config(shape), "synthetic " + a.synthetic);
      std::call_once(shared.once, [&] {
        const double t0 = now_seconds();
        shared.backend = make_backend(a.device, threads, gpu);
        shared.weights =
            model::random_weights(cfg, *shared.backend, 1234, a.dtype == "fp8" ? DType::F8_E4M3_B128 : DType::BF16);
        shared.backend->synchronize();
        shared.seconds = seconds_since(t0);
      });
      auto backend = make_backend(a.device, threads, gpu);
      if (ranks.rank() == 0)
        fmt::print(stderr, "made {:.1f} GB of random {} weights on {} in {:.1f} s ({} of this process)\n",
                   weight_bytes(shared.weights).trunk / 1e9, a.dtype, backend->describe(), shared.seconds,
                   ranks.size() > 1 && !dist::mpi_launched() ? fmt::format("shared by the {} ranks", ranks.size())
                                                             : std::string("the rank"));
      engine = runtime::Engine::create(std::move(cfg), shared.weights, std::move(backend), o);
      // Once every rank has its engine, the shared set is let go: under expert parallelism the
      // routed experts then live in the ranks' slots alone, and every other weight in the engines.
      if (comm) comm->barrier();
      std::call_once(shared.released, [&] { shared.weights = {}; });
      model_name = fmt::format("synthetic {} ({} of {} layers, {})", a.synthetic, shape.layers,
                               model::preset_shape(a.synthetic).layers, a.dtype);
    } else {
      const std::filesystem::path dir = a.model.empty() ? default_model_dir() : std::filesystem::path(a.model);
      engine = load_engine(dir, a.device, threads, o, ranks.rank() == 0, gpu);
      model_name = dir.string();
    }
    runtime::Engine& e = *engine;
    const model::ModelConfig& cfg = e.config();
    const Work work{cfg, model::count_parameters(cfg), weight_bytes(e), int64_t(dtype_size(e.backend().kv_cache_dtype()))};
    // The ceilings, measured by the first rank alone on a quiet GPU: in-process ranks share it, so
    // every rank has done its setup (one of them freed the shared weights) before, and waits on the
    // host while it runs (else its first pass's kernels run beside the measurement).
    if (comm) comm->barrier();
    const kernels::Ceilings ceil = ranks.rank() == 0 ? e.backend().measure_ceilings() : kernels::Ceilings{};
    if (comm) comm->barrier();

    std::mt19937 rng(7);
    std::vector<DecodeFigure> decode;
    for (size_t i = 0; i < batches.size(); ++i) {
      DecodeFigure best{};
      for (int r = 0; r < a.repeats; ++r) {
        DecodeFigure f =
            measure_decode(e, ranks, rng, batches[i], a.prompt_len, a.decode_steps, a.profile && i == 0 && r == 0,
                           a.profiler_window && i == 0 && r == 0);
        if (f.profile.empty() && !best.profile.empty()) f.profile = best.profile;
        if (r == 0 || f.tokens_per_s > best.tokens_per_s) best = std::move(f);
      }
      decode.push_back(std::move(best));
    }
    std::vector<PrefillFigure> prefill;
    for (size_t i = 0; i < prefills.size(); ++i)
      prefill.push_back(measure_prefill(e, ranks, rng, prefills[i], a.repeats, a.profile && i == 0));
    // Every rank's activations after its largest passes (before speculation makes the runner anew).
    const double workspace = ranks.sum(double(e.runner().workspace_bytes()));

    // Speculation: decode with and without drafts on the same prompts, by generate().
    struct SpecFigure {
      int batch, steps;
      double plain, speculative, acceptance;
    };
    std::vector<SpecFigure> spec;
    for (int b : spec_steps.empty() ? std::vector<int>{} : batches) {
      std::vector<std::vector<int32_t>> prompts;
      for (int i = 0; i < ranks.share(b); ++i) prompts.push_back(random_prompt(rng, a.prompt_len, cfg.vocab_size));
      // Tokens per second of the batch: every rank's tokens over the same lockstep time.
      auto rate = [&](const runtime::GenerationStats& s) { return ranks.sum(double(s.decode_tokens)) / s.decode_seconds; };
      // Each figure after an untimed run: a number of draft steps is the engine's for as long as it
      // serves (its passes' graphs are captured once, as a server does at its first requests), not
      // set up again for every timed run.
      double plain = 0;
      e.generate(prompts, kSpecWarmupTokens);
      for (int r = 0; r < a.repeats; ++r) plain = std::max(plain, rate(e.generate(prompts, a.decode_steps + 1).stats));
      for (int s : spec_steps) {
        SpecFigure f{b, s, plain, 0, 0};
        e.set_speculative_steps(s);
        e.generate(prompts, kSpecWarmupTokens);
        for (int r = 0; r < a.repeats; ++r) {
          runtime::SpeculativeStats st;
          const auto res = runtime::generate_speculative(e, prompts, a.decode_steps + 1, {.num_steps = s}, &st);
          const double tps = rate(res.stats);
          const double acceptance = ranks.sum(double(st.emitted)) / std::max(1.0, ranks.sum(double(st.rounds)));
          if (tps > f.speculative) f.speculative = tps, f.acceptance = acceptance;
        }
        e.set_speculative_steps(0);
        spec.push_back(f);
      }
    }
    // The graphs every rank's backend holds after the runs (each bucket of each pass kind, and under
    // in-process EP each combination of the ranks' buckets met) and the memory they took.
    const double graphs = ranks.sum(double(e.backend().counters().graphs));
    const double graph_bytes = ranks.sum(double(e.backend().counters().graph_bytes));
    // Under expert parallelism the ranks' slots hold the experts (trunk and MTP domains; the model
    // keeps none), with migration's staging beside them.
    double slots = 0, staging = 0;
    for (moe::ExpertParallelDomain* d : {e.trunk_ep(), e.mtp_ep()})
      if (d) slots += double(d->slots.bytes()), staging += double(d->rebalancer.staging_bytes());
    slots = ranks.sum(slots), staging = ranks.sum(staging);
    if (ranks.rank() != 0) return;
    const kernels::MemoryInfo memory = e.backend().memory();  // after every run
    const int64_t context = a.prompt_len + a.decode_steps / 2;
    auto decode_row = [&](const DecodeFigure& f) {
      const double bytes = work.step_bytes(f.batch, context);
      return std::tuple{bytes / f.batch, bytes / f.step_seconds};
    };
    {
      nlohmann::json j = {{"model", model_name},
                          {"device", e.backend().describe()},
                          {"ranks", ranks.size()},
                          {"threads", a.threads},
                          {"prompt_len", a.prompt_len},
                          {"decode_steps", a.decode_steps},
                          {"context_length", e.context_length()},
                          {"overlap_schedule", !a.passes.no_overlap},
                          {"copy_bandwidth_gb_s", ceil.copy_bytes_per_s / 1e9},
                          {"gemm_tflop_s", ceil.gemm_flops_per_s / 1e12},
                          {"gemm", ceil.gemm},
                          {"params_total", work.p.total()},
                          {"params_active_per_token", work.p.active_per_token()},
                          // A decode step of the first batch: kernels and copies in its graph (0: eager).
                          {"decode_graph_nodes", decode[0].graph_nodes},
                          {"memory", {{"trunk_weights_gb", work.wb.trunk / 1e9},
                                      {"cache_gb", double(e.cache().bytes()) / 1e9},
                                      {"cache_rows", e.max_total_tokens()},
                                      {"device_free_gb", double(memory.free_bytes) / 1e9},
                                      {"device_total_gb", double(memory.total_bytes) / 1e9},
                                      {"workspace_gb", workspace / 1e9},
                                      {"graphs", int64_t(graphs)},
                                      {"graphs_mb", graph_bytes / 1e6},
                                      {"routed_experts_gb", work.wb.routed / 1e9},
                                      {"expert_slots_gb", slots / 1e9},
                                      {"migration_staging_gb", staging / 1e9}}}};
      // The first batch and prefill at the top level too (what earlier versions printed).
      // Expert parallelism: per-pass balancedness and each rebalance (experts and bytes moved, its
      // time), rank 0's, as generate reports them.
      if (e.trunk_ep()) j["expert_parallel"] = ep_summary(e, ranks.size());
      j["decode_tokens_per_s"] = decode[0].tokens_per_s;
      j["prefill_tokens_per_s"] = prefill[0].tokens_per_s;
      j["decode"] = nlohmann::json::array();
      for (const auto& f : decode) {
        const auto [per_token, bw] = decode_row(f);
        j["decode"].push_back({{"batch", f.batch}, {"tokens_per_s", f.tokens_per_s}, {"step_ms", f.step_seconds * 1e3},
                               {"graph_nodes", f.graph_nodes},
                               {"bytes_per_token", per_token}, {"bandwidth_gb_s", bw / 1e9},
                               {"bandwidth_ratio", bw / ceil.copy_bytes_per_s}});
      }
      j["bandwidth_ratio"] = j["decode"][0]["bandwidth_ratio"];
      j["prefill"] = nlohmann::json::array();
      for (const auto& f : prefill) {
        const double flops = work.prefill_flops(f.tokens);
        j["prefill"].push_back({{"tokens", f.tokens}, {"tokens_per_s", f.tokens_per_s}, {"seconds", f.seconds},
                                {"tflop", flops / 1e12}, {"tflop_s", flops / f.seconds / 1e12},
                                {"gemm_ratio", flops / f.seconds / ceil.gemm_flops_per_s}});
      }
      if (a.profile) {
        j["decode_profile"] = {{"batch", decode[0].batch}, {"ops", profile_json(decode[0].profile)}};
        j["prefill_profile"] = {{"tokens", prefill[0].tokens}, {"ops", profile_json(prefill[0].profile)}};
      }
      for (const auto& s : spec)
        j["speculative"].push_back({{"batch", s.batch}, {"num_steps", s.steps}, {"decode_tokens_per_s", s.plain},
                                    {"speculative_tokens_per_s", s.speculative}, {"speedup", s.speculative / s.plain},
                                    {"acceptance_length", s.acceptance},
                                    {"round_in_plain_steps", s.acceptance * s.plain / s.speculative}});
      if (!a.json_file.empty()) {
        std::ofstream f(a.json_file);
        f << j.dump(1) << "\n";
        check(f.good(), "--json-file {}: cannot write", a.json_file);
      }
      if (a.json) {
        fmt::print("{}\n", j.dump());
        return;
      }
    }
    fmt::print("model     {}: {:.2f} B parameters, {:.2f} B active per token\n", model_name, work.p.total() / 1e9,
               work.p.active_per_token() / 1e9);
    fmt::print("device    {}{}\n", e.backend().describe(),
               ranks.size() > 1 ? fmt::format(" x {} expert-parallel ranks, rows and weights {}", ranks.size(),
                                               e.ep_transport())
                                : std::string());
    fmt::print("ceilings  copy {:.0f} GB/s, GEMM {:.4g} TFLOP/s ({})\n", ceil.copy_bytes_per_s / 1e9,
               ceil.gemm_flops_per_s / 1e12, ceil.gemm);
    fmt::print("memory    {:.2f} GB of trunk weights, {:.2f} GB of cache ({} KV rows), {:.2f} GB of activation workspace{}; "
               "the device {:.1f} of {:.1f} GB free after the runs\n",
               work.wb.trunk / 1e9, double(e.cache().bytes()) / 1e9, e.max_total_tokens(), workspace / 1e9,
               ranks.size() > 1 ? fmt::format(" (the {} ranks')", ranks.size()) : std::string(),
               double(memory.free_bytes) / 1e9, double(memory.total_bytes) / 1e9);
    if (slots > 0)
      fmt::print("experts   {:.2f} GB in the {} ranks' expert slots and {:.2f} GB of staging for migration, for the "
                 "model's {:.2f} GB of routed experts\n",
                 slots / 1e9, ranks.size(), staging / 1e9, work.wb.routed / 1e9);
    if (graphs > 0) fmt::print("graphs    {:.0f} held after the runs, {:.1f} MB of device memory taken as they were made\n",
                               graphs, graph_bytes / 1e6);
    fmt::print("\ndecode at {} tokens of context (bytes: weights read once per step, the experts the batch visits,\n"
               "states and KV per sequence; {})\n", context,
               a.passes.no_overlap ? "each pass landed before the next is issued"
                                   : "the overlap schedule: each pass issued before the last one's tokens land");
    fmt::print("  {:>6} {:>12} {:>10} {:>14} {:>12} {:>10} {:>7}\n", "batch", "tokens/s", "ms/step", "MB/token", "GB/s",
               "of copy", "graph");
    for (const auto& f : decode) {
      const auto [per_token, bw] = decode_row(f);
      fmt::print("  {:>6} {:>12.1f} {:>10.3f} {:>14.2f} {:>12.1f} {:>9.1f}% {:>7}\n", f.batch, f.tokens_per_s,
                 f.step_seconds * 1e3, per_token / 1e6, bw / 1e9, 100 * bw / ceil.copy_bytes_per_s,
                 f.graph_nodes > 0 ? fmt::format("{}", f.graph_nodes) : "eager");
    }
    fmt::print("\nprefill of one sequence in one pass (FLOPs: 2 per weight visited, attention, delta rule)\n");
    fmt::print("  {:>8} {:>12} {:>10} {:>10} {:>10} {:>10}\n", "tokens", "tokens/s", "ms", "TFLOP", "TFLOP/s", "of GEMM");
    for (const auto& f : prefill) {
      const double flops = work.prefill_flops(f.tokens);
      fmt::print("  {:>8} {:>12.1f} {:>10.2f} {:>10.4g} {:>10.4g} {:>9.1f}%\n", f.tokens, f.tokens_per_s,
                 f.seconds * 1e3, flops / 1e12, flops / f.seconds / 1e12,
                 100 * flops / f.seconds / ceil.gemm_flops_per_s);
    }
    if (a.profile) {
      print_profile(fmt::format("decode step, batch {}", decode[0].batch), decode[0].profile, decode[0].step_seconds);
      print_profile(fmt::format("prefill pass, {} tokens", prefill[0].tokens), prefill[0].profile, prefill[0].seconds);
    }
    if (!spec.empty()) {
      // A round (verification and drafts) in plain decode steps: the speedup at any acceptance length
      // is that length over it (random weights accept next to nothing: the round's cost still holds).
      fmt::print("\nMTP speculation (NEXTN), decode of {} tokens after {}-token prompts\n", a.decode_steps, a.prompt_len);
      fmt::print("  {:>6} {:>6} {:>12} {:>12} {:>8} {:>11} {:>11}\n", "batch", "steps", "plain tok/s", "spec tok/s",
                 "speedup", "acceptance", "round/step");
      for (const auto& s : spec)
        fmt::print("  {:>6} {:>6} {:>12.1f} {:>12.1f} {:>7.2f}x {:>11.2f} {:>11.2f}\n", s.batch, s.steps, s.plain,
                   s.speculative, s.speculative / s.plain, s.acceptance, s.acceptance * s.plain / s.speculative);
    }
    });
  return 0;
}

}  // namespace

void add_bench(CLI::App& app, Runner& run) {
  auto a = std::make_shared<BenchArgs>();
  auto* c = app.add_subcommand("bench", "Prefill and decode throughput beside the device's measured ceilings");
  c->add_option("--model", a->model, "Model directory; default: the shipped model");
  c->add_option("--synthetic", a->synthetic,
                fmt::format("A model of a published size with random weights made on the device: {} (default "
                            "mid-size)", fmt::join(model::preset_names(), ", ")))
      ->expected(0, 1);
  c->add_option("--layers", a->layers, "Synthetic models: keep the first N layers (the weights must fit the device)")
      ->check(CLI::Range(1, 1024));
  c->add_option("--dtype", a->dtype,
                "Synthetic models: bf16, or fp8 (e4m3 with 128 x 128 block scales where Qwen's -FP8 releases have "
                "them; embedding, head, routers and DeltaNet a/b stay bf16)")
      ->check(CLI::IsMember({"bf16", "fp8"}));
  c->add_option("--save", a->save,
                "Synthetic models: write the model to this directory as a Hugging Face checkpoint (bf16, a fixed "
                "seed, the shipped model's tokenizer) instead of benchmarking; then bench it with --model DIR");
  c->add_option("--prompt-len", a->prompt_len, "Context of the decoding sequences (prompt tokens)")
      ->check(CLI::Range(1, 1 << 20));
  c->add_option("--decode-steps", a->decode_steps, "Decode steps timed")->check(CLI::Range(1, 1 << 20));
  c->add_option("--batch", a->batches, "Sequences decoded together, a list: 1,8,32");
  c->add_option("--prefill", a->prefills, "Prefill lengths (one sequence, one pass), a list: 1024,8192 "
                                          "(default: --prompt-len)");
  c->add_option("--context-length", a->context_length,
                 "The longest sequence the engine is built for, as a server's (default: what the runs need; a "
                 "server's default is the model's trained length)")
      ->check(CLI::Range(int64_t(1), int64_t(1) << 30));
  c->add_option("--repeats", a->repeats, "Runs of each figure; the best is reported")->check(CLI::Range(1, 100));
  c->add_option("--threads", a->threads, "CPU threads (0 = all cores)")->check(CLI::Range(0, 1024));
  c->add_option("--speculative-num-steps", a->speculative,
                "Also decode with MTP speculation (NEXTN) of these draft steps, a list: 1,2,3")
      ->expected(1);
  c->add_flag("--profile", a->profile,
              "Time every op of one decode step (first batch) and one prefill pass (first length)");
  c->add_flag("--profiler-window", a->profiler_window,
              "After the first batch's timed decode steps, run one more inside an external profiler's window "
              "(ncu --profile-from-start off, nsys --capture-range cudaProfilerApi)");
  c->add_flag("--json", a->json, "Print one JSON object");
  c->add_option("--json-file", a->json_file, "Also write the JSON object to this file");
  add_device_option(c, a->device);
  add_ep_options(c, a->ep);
  add_dist_timeout_option(c, a->dist_timeout);
  add_pass_options(c, a->passes);
  c->callback([a, c, &run] {
    if (c->get_option("--synthetic")->count() > 0 && a->synthetic.empty()) a->synthetic = "mid-size";
    run = [a] { return run_bench(*a); };
  });
}

}  // namespace ballast::cli

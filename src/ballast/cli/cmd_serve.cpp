// ballast serve: the engine behind an OpenAI-compatible HTTP server (src/ballast/serve), on one
// rank, --ep G in-process ranks, or MPI ranks (rank 0 serves HTTP; every rank runs the loop).
#include <unistd.h>

#include <csignal>
#include <fmt/format.h>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "ballast/cli/commands.h"
#include "ballast/cli/engine_args.h"
#include "ballast/cli/option_checks.h"
#include "ballast/cli/stop_signals.h"
#include "ballast/core/error.h"
#include "ballast/dist/mpi_communicator.h"
#include "ballast/eplb/load.h"
#include "ballast/serve/engine_loop.h"
#include "ballast/serve/http_server.h"
#include "ballast/text/tokenizer.h"

namespace ballast::cli {

namespace {

struct ServeArgs {
  std::string model, served_model_name;
  std::string host = "127.0.0.1";
  int port = 30000;
  EngineArgs engine;
  // Request defaults (otherwise generation_config.json's, otherwise OpenAI's).
  std::optional<float> temperature, top_p;
  std::optional<int> top_k;
  int max_queued_requests = 256;
  double request_timeout = 600, shutdown_timeout = 30;
  int http_threads = 512;
  int64_t max_request_bytes = int64_t(8) << 20;
  std::string recorder_dir = "/tmp";
};

// The defaults of generation_config.json (temperature, top_p, top_k), under the flags'.
runtime::SamplingParams default_sampling(const std::filesystem::path& dir, const ServeArgs& a) {
  runtime::SamplingParams s;
  s.temperature = 1.0f;  // OpenAI's default
  if (std::ifstream in(dir / "generation_config.json"); in) {
    const auto j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (j.is_object()) {
      // A value out of range would sample wrongly without a word: refused, naming the file.
      const std::string file = (dir / "generation_config.json").string();
      auto number = [&](const char* key, double lo, double hi) -> std::optional<double> {
        if (!j.contains(key) || !j[key].is_number()) return std::nullopt;
        const double v = j[key].get<double>();
        check(v >= lo && v <= hi, "{}: {} {} is outside [{}, {}]", file, key, v, lo, hi);
        return v;
      };
      if (auto t = number("temperature", 0, 100)) s.temperature = float(*t);
      if (auto p = number("top_p", 1e-6, 1)) s.top_p = float(*p);
      if (auto k = number("top_k", 0, 1 << 20); k && j["top_k"].is_number_integer()) s.top_k = int(*k);
    }
  }
  if (a.temperature) s.temperature = *a.temperature;
  if (a.top_p) s.top_p = *a.top_p;
  if (a.top_k) s.top_k = *a.top_k;
  return s;
}

// Serving's cache limits: 64 sequences per rank unless the flags say, over the KV rows
// --mem-fraction-static leaves (by default kGpuMemFraction on a GPU: the engine sizes them once the
// weights are in) or --max-total-tokens gives (by default 64 K on the CPU), and a context of the
// model's trained length, within the cache (less the drafts' headroom).
constexpr double kGpuMemFraction = 0.85;
runtime::CacheOptions serve_cache(const ServeArgs& a, int max_position_embeddings) {
  const EngineArgs& e = a.engine;
  runtime::CacheOptions c;
  c.page_size = e.cache.page_size;
  c.chunked_prefill_size = e.cache.chunked_prefill_size;
  c.max_running_requests = e.cache.max_running_requests > 0 ? e.cache.max_running_requests : 64;
  c.mem_fraction_static = e.cache.mem_fraction_static > 0                                   ? e.cache.mem_fraction_static
                          : e.cache.max_total_tokens == 0 && cuda_devices_for(e.device) > 0 ? kGpuMemFraction
                                                                                            : 0.0;
  if (c.mem_fraction_static > 0) {
    c.context_length = e.cache.context_length;  // checked by the engine against the pool it sizes
    return c;
  }
  c.max_total_tokens = e.cache.max_total_tokens > 0 ? e.cache.max_total_tokens : int64_t(1) << 16;
  const int64_t headroom = e.speculate() ? 2 * int64_t(e.speculative_steps) : 0;
  const int64_t room = c.max_total_tokens - headroom;
  check(room > 1, "--max-total-tokens {} leaves no room for a sequence", c.max_total_tokens);
  if (e.cache.context_length > 0) {
    check(e.cache.context_length <= room,
          "--context-length {} does not fit the cache of {} rows{} (raise --max-total-tokens)",
          e.cache.context_length, c.max_total_tokens,
          headroom ? fmt::format(" less {} for speculation", headroom) : std::string());
    c.context_length = e.cache.context_length;
  } else {
    c.context_length = max_position_embeddings > 0 ? std::min<int64_t>(max_position_embeddings, room) : room;
  }
  return c;
}

nlohmann::json server_info(const ServeArgs& a, const std::filesystem::path& dir, int ranks,
                           const runtime::CacheOptions& c, const runtime::Engine& engine) {
  const EngineArgs& e = a.engine;
  return {{"model_path", dir.string()},
          {"served_model_name", a.served_model_name},
          {"host", a.host},
          {"port", a.port},
          {"device", e.device.device},
          {"matmul_precision", e.device.matmul_precision},
          {"ep_size", ranks},
          {"ep_num_redundant_experts", e.ep.redundant},
          {"enable_eplb", e.ep.enable_eplb},
          {"eplb_algorithm", e.ep.algorithm},
          {"eplb_rebalance_num_iterations", e.ep.rebalance_iterations},
          {"ep_dispatch_algorithm", e.ep.dispatch},
          {"expert_distribution_recorder_mode", e.ep.recorder_mode},
          {"speculative_algorithm", e.speculate() ? nlohmann::json(e.speculative_algorithm) : nlohmann::json(nullptr)},
          {"speculative_num_steps", e.speculate() ? e.speculative_steps : 0},
          {"disable_cuda_graph", e.passes.disable},
          {"disable_overlap_schedule", e.passes.no_overlap},
          {"cuda_graph_bs", engine.runner().limits().graph_sizes},  // the sizes the engine keeps graphs for
          {"cuda_graph_max_bs", e.passes.max_bs > 0 ? nlohmann::json(e.passes.max_bs) : nlohmann::json(nullptr)},
          {"max_running_requests", c.max_running_requests},
          {"max_total_tokens", c.max_total_tokens},
          {"mem_fraction_static", c.mem_fraction_static > 0 ? nlohmann::json(c.mem_fraction_static) : nlohmann::json(nullptr)},
          {"chunked_prefill_size", c.chunked_prefill_size},
          {"page_size", c.page_size},
          {"context_length", c.context_length},
          {"max_queued_requests", a.max_queued_requests},
          {"request_timeout", a.request_timeout},
          {"shutdown_timeout", a.shutdown_timeout}};
}

int run_serve(ServeArgs a) {
  const bool default_model = a.model.empty();
  const auto dir = default_model ? default_model_dir() : std::filesystem::path(a.model);
  if (a.served_model_name.empty()) a.served_model_name = default_model ? dir.filename().string() : a.model;
  const model::ModelConfig cfg = model::load_model_config(dir);
  const runtime::CacheOptions cache = serve_cache(a, cfg.max_position_embeddings);

  const int ranks = run_on_ranks(a.engine, [&](dist::Communicator* comm, dist::DataPlane* data, int threads) {
    const bool rank0 = !comm || comm->rank() == 0;
    auto engine = load_rank_engine(dir, a.engine, engine_options(a.engine, comm, data, cache), threads);
    runtime::CacheOptions built = cache;  // the limits as the engine sized them (the same on every rank)
    built.max_total_tokens = engine->max_total_tokens();
    built.context_length = engine->context_length();
    auto* trunk = engine->trunk_ep();
    const std::string& dump = a.engine.ep.dump_distribution;
    if (!dump.empty() && trunk) trunk->domain.recorder.start();
    if (!rank0) {
      // Rank 0 decides when to stop; the others leave with its last plan. An MPI process of
      // another rank ignores the signals (in-process ranks share rank 0's handlers).
      if (dist::mpi_launched()) {
        std::signal(SIGTERM, SIG_IGN);
        std::signal(SIGINT, SIG_IGN);
      }
      serve::EngineLoop(*engine, comm, nullptr, nullptr).run();
      return;
    }
    const text::Tokenizer tokenizer = text::Tokenizer::load(dir);
    serve::ModelContext model;
    model.tokenizer = &tokenizer;
    model.name = a.served_model_name;
    model.context_length = built.context_length;
    model.vocab_size = engine->config().vocab_size;
    model.defaults = default_sampling(dir, a);
    if (a.request_timeout > 0) model.request_timeout = std::chrono::milliseconds(int64_t(a.request_timeout * 1e3));

    const int nranks = comm ? comm->size() : 1;
    serve::RequestQueue queue(size_t(nranks) * size_t(cache.max_running_requests) + size_t(a.max_queued_requests));
    serve::ServerMetrics metrics;
    serve::LoopOptions lo;
    lo.drain_timeout = std::chrono::milliseconds(int64_t(a.shutdown_timeout * 1e3));
    serve::EngineLoop loop(*engine, comm, &queue, &metrics, lo);
    serve::HttpOptions ho;
    ho.host = a.host;
    ho.port = a.port;
    ho.threads = a.http_threads;
    ho.max_body_bytes = size_t(a.max_request_bytes);
    ho.recorder_dir = a.recorder_dir;
    ho.model_path = ho.tokenizer_path = dir.string();
    ho.server_info = server_info(a, dir, nranks, built, *engine);
    serve::HttpServer http(model, queue, metrics, ho);
    http.bind();
    std::thread listener([&] { http.listen(); });
    fmt::print(stderr, "serving {} on http://{}:{} ({} rank{}, context {} tokens, pid {})\n", model.name, a.host,
               http.port(), nranks, nranks > 1 ? "s" : "", built.context_length, ::getpid());
    {
      StopSignals signals([&](int sig) {
        fmt::print(stderr, "{}: no new requests; finishing {} in flight (at most {} s)\n", strsignal(sig),
                   queue.in_flight(), a.shutdown_timeout);
        http.stop_accepting();
      });
      try {
        loop.run();
      } catch (...) {
        http.stop();
        listener.join();
        throw;
      }
    }
    http.stop();
    listener.join();
    if (!dump.empty() && trunk) eplb::write_load(dump, trunk->domain.recorder.dump());
    fmt::print(stderr, "stopped\n");
  });
  (void)ranks;
  return 0;
}

}  // namespace

void add_serve(CLI::App& app, Runner& run) {
  auto a = std::make_shared<ServeArgs>();
  auto* c = app.add_subcommand("serve", "Serve the model over HTTP: OpenAI's API, SGLang's native endpoints, /metrics");
  c->add_option("--model", a->model, "Model directory (config.json + safetensors); default: the shipped model");
  c->add_option("--served-model-name", a->served_model_name, "The model's name in the API (default: --model as given)");
  c->add_option("--host", a->host, "Address to listen on");
  c->add_option("--port", a->port, "Port to listen on (0: any free port)")->check(CLI::Range(0, 65535));
  add_engine_options(c, a->engine);
  c->add_option("--temperature", a->temperature, "Default temperature of requests that give none")
      ->check(finite_range(0, 100));
  c->add_option("--top-p", a->top_p, "Default nucleus mass")->check(finite_range(1e-6, 1));
  c->add_option("--top-k", a->top_k, "Default top-k (0 = all)")->check(CLI::Range(0, 1 << 20));
  c->add_option("--max-queued-requests", a->max_queued_requests,
                "Requests admitted beyond what runs at once; more get 503 with Retry-After")
      ->check(CLI::Range(0, 1 << 24));
  c->add_option("--request-timeout", a->request_timeout, "Seconds a request may take (0: no limit)")
      ->check(finite_range(0, 1e7));
  c->add_option("--shutdown-timeout", a->shutdown_timeout,
                "On SIGTERM/SIGINT: seconds in-flight requests may still run before they are aborted")
      ->check(finite_range(0, 1e7));
  c->add_option("--http-threads", a->http_threads, "Connections served at once")->check(CLI::Range(1, 1 << 16));
  c->add_option("--max-request-bytes", a->max_request_bytes, "Largest request body (413 beyond)")
      ->check(CLI::Range(int64_t(1024), int64_t(1) << 34));
  c->add_option("--expert-distribution-recorder-dir", a->recorder_dir,
                "Where /dump_expert_distribution_record writes its files");
  c->callback([a, &run] {
    validate(a->engine);
    run = [a] { return run_serve(*a); };
  });
}

}  // namespace ballast::cli

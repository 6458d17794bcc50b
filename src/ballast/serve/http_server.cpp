#include "ballast/serve/http_server.h"

#include <fmt/format.h>
#include <httplib.h>

#include <atomic>
#include <chrono>
#include <ctime>
#include <filesystem>
#include <thread>

#include "ballast/core/error.h"
#include "ballast/eplb/load.h"
#include "ballast/serve/api_error.h"
#include "ballast/serve/json_fields.h"
#include "ballast/serve/openai_protocol.h"
#include "ballast/serve/sglang_protocol.h"
#include "ballast/serve/sse.h"

namespace ballast::serve {

using nlohmann::json;
using std::chrono::milliseconds;

namespace {

constexpr milliseconds kPoll{250};            // how often a waiting stream looks up
constexpr int kPollsPerKeepAlive = 4;          // an idle stream writes a comment about once a second
constexpr milliseconds kCommandWait{60000};   // an engine command answered within a minute or never

int64_t unix_now() { return int64_t(std::time(nullptr)); }

void reply(httplib::Response& res, int status, const json& body) {
  res.status = status;
  // Text from the model may hold invalid UTF-8 bytes (a token cut mid-character): shown as U+FFFD.
  res.set_content(body.dump(-1, ' ', false, json::error_handler_t::replace), "application/json");
}

}  // namespace

struct HttpServer::Impl {
  Impl(const ModelContext& model, RequestQueue& queue, ServerMetrics& metrics, HttpOptions options)
      : model(model), queue(queue), metrics(metrics), opt(std::move(options)) {}

  const ModelContext& model;
  RequestQueue& queue;
  ServerMetrics& metrics;
  HttpOptions opt;
  httplib::Server svr;
  std::atomic<uint64_t> next_request{0};
  std::atomic<uint64_t> next_seed{uint64_t(std::chrono::steady_clock::now().time_since_epoch().count())};
  const int64_t started = unix_now();
  // Generation responses being written: stop() lets them end (httplib cuts a stream it is
  // writing when its listener closes).
  std::atomic<int> writing{0};
  socket_t listen_fd = -1;
  struct Writing {
    explicit Writing(std::atomic<int>& n) : n(n) { ++n; }
    ~Writing() { --n; }
    std::atomic<int>& n;
  };

  std::string request_id(const char* prefix) {
    return fmt::format("{}{:x}{:08x}", prefix, started, next_request.fetch_add(1));
  }

  // A request without a seed draws from a stream of its own.
  void seed(GenerationSpec& s, bool seeded) {
    if (!seeded) s.sampling.seed = next_seed.fetch_add(0x9e3779b97f4a7c15ULL);
  }

  // Runs a handler, answering what it throws: ApiError as its status, anything else as 500.
  template <typename Fn>
  void guarded(const httplib::Request& req, httplib::Response& res, Fn&& fn) {
    try {
      fn();
    } catch (const ApiError& e) {
      if (e.status == 503) {
        res.set_header("Retry-After", "1");
        metrics.refused(queue.accepting() ? "overloaded" : "stopping");
      } else if (e.status < 500) {
        metrics.refused("invalid");
      }
      reply(res, e.status, error_body(e.status, e.what(), e.param));
    } catch (const std::exception& e) {
      reply(res, 500, error_body(500, fmt::format("{} {}: {}", req.method, req.path, e.what())));
    }
  }

  void generation_reply(httplib::Response& res, const Generation::Delta& whole, const json& body) {
    if (whole.outcome == Outcome::error) throw ApiError(500, whole.error);
    if (whole.outcome == Outcome::timeout) throw ApiError(408, "the request timed out (--request-timeout)");
    reply(res, 200, body);
  }

  // Streams a generation: `write` formats each delta as events; the provider closes with [DONE].
  // A client that goes away makes a write fail: the Generation is dropped, which cancels it.
  template <typename Format>
  void stream(httplib::Response& res, std::shared_ptr<Generation> gen, Format format) {
    res.set_header("Cache-Control", "no-cache");
    res.set_header("X-Accel-Buffering", "no");
    auto idle = std::make_shared<int>(0);
    auto writing_guard = std::make_shared<Writing>(writing);
    res.set_chunked_content_provider(
        "text/event-stream",
        [gen, format, idle](size_t, httplib::DataSink& sink) mutable {
          Generation::Delta d = gen->next(kPoll);
          std::string out = format(*gen, d);
          if (out.empty()) {
            if (++*idle < kPollsPerKeepAlive) return true;
            out = sse::kKeepAlive;
          }
          *idle = 0;
          if (!sink.write(out.data(), out.size())) return false;
          if (d.finished) sink.done();
          return true;
        },
        [gen, writing_guard](bool) mutable {
          gen.reset();
          writing_guard.reset();
        });
  }

  static std::string error_event(const Generation::Delta& d) {
    const int status = d.outcome == Outcome::timeout ? 408 : 500;
    return sse::event(
        error_body(status, d.outcome == Outcome::timeout ? "the request timed out (--request-timeout)" : d.error));
  }

  void openai_endpoint(const httplib::Request& req, httplib::Response& res, bool chat) {
    const json body = parse_request_body(req.body);
    auto parsed = std::make_shared<openai::Parsed>(chat ? openai::parse_chat(body, model)
                                                        : openai::parse_completion(body, model));
    seed(parsed->spec, JsonFields(body).has("seed"));
    // Completions default to OpenAI's 16 tokens, chat to the rest of the context (as vLLM).
    auto gen = std::make_shared<Generation>(model, queue, parsed->spec, chat ? 0 : 16);
    auto responder = std::make_shared<openai::Responder>(model, *parsed, request_id(chat ? "chatcmpl-" : "cmpl-"),
                                                         unix_now());
    if (!parsed->spec.stream) {
      const Generation::Delta whole = gen->all();
      generation_reply(res, whole, responder->response(*gen, whole));
      return;
    }
    auto opened = std::make_shared<bool>(false);
    stream(res, gen, [parsed, responder, opened](const Generation& g, const Generation::Delta& d) {
      std::string out;
      if (!*opened) {
        *opened = true;
        if (json o = responder->opening(); !o.is_null()) out += sse::event(o);
      }
      if (d.finished && (d.outcome == Outcome::error || d.outcome == Outcome::timeout))
        return out + error_event(d) + std::string(sse::kDone);
      if (!d.text.empty() || !d.ids.empty() || d.finished) out += sse::event(responder->chunk(d));
      if (d.finished) {
        if (parsed->include_usage) out += sse::event(responder->usage_chunk(g));
        out += sse::kDone;
      }
      return out;
    });
  }

  void generate_endpoint(const httplib::Request& req, httplib::Response& res) {
    const json body = parse_request_body(req.body);
    auto parsed = std::make_shared<sglang::Parsed>(sglang::parse_generate(body, model));
    const json& sp = body.contains("sampling_params") ? body["sampling_params"] : json::object();
    seed(parsed->spec, sp.is_object() && (sp.contains("seed") || sp.contains("sampling_seed")));
    auto gen = std::make_shared<Generation>(model, queue, parsed->spec, sglang::kDefaultMaxNewTokens);
    const std::string rid = request_id("");
    if (!parsed->spec.stream) {
      const Generation::Delta whole = gen->all();
      generation_reply(res, whole, sglang::generate_response(model, *parsed, *gen, whole, rid, true));
      return;
    }
    // SGLang streams the text and ids so far in every event.
    auto so_far = std::make_shared<Generation::Delta>();
    stream(res, gen, [this, parsed, so_far, rid](const Generation& g, const Generation::Delta& d) {
      if (d.finished && (d.outcome == Outcome::error || d.outcome == Outcome::timeout))
        return error_event(d) + std::string(sse::kDone);
      if (d.text.empty() && d.ids.empty() && !d.finished) return std::string();
      so_far->text += d.text;
      so_far->ids.insert(so_far->ids.end(), d.ids.begin(), d.ids.end());
      so_far->logprobs.insert(so_far->logprobs.end(), d.logprobs.begin(), d.logprobs.end());
      so_far->outcome = d.outcome;
      std::string out = sse::event(sglang::generate_response(model, *parsed, g, *so_far, rid, d.finished));
      if (d.finished) out += sse::kDone;
      return out;
    });
  }

  CommandResult run(Command c) {
    auto f = queue.command(c);
    if (f.wait_for(kCommandWait) != std::future_status::ready) throw ApiError(503, "the engine did not answer");
    return f.get();
  }

  void record_endpoint(httplib::Response& res, Command c) {
    CommandResult r = run(c);
    if (!r.ok) throw ApiError(400, r.message);
    json body = {{"message", r.message}};
    if (r.load) {
      // The same file as `generate --dump-expert-distribution` writes.
      const auto ms = std::chrono::duration_cast<milliseconds>(std::chrono::system_clock::now().time_since_epoch());
      const std::string path =
          (std::filesystem::path(opt.recorder_dir) / fmt::format("expert_distribution_recorder_{}.json", ms.count()))
              .string();
      eplb::write_load(path, *r.load);
      body["path"] = path;
      body["passes"] = r.load->passes;
    }
    reply(res, 200, body);
  }

  void health_generate(httplib::Response& res) {
    if (!queue.accepting()) throw ApiError(503, "the server is shutting down");
    GenerationSpec spec;
    spec.ids = std::vector<int32_t>{model.tokenizer->eos_token_ids().empty() ? 0 : model.tokenizer->eos_token_ids()[0]};
    spec.max_tokens = 1;
    spec.ignore_eos = true;
    Generation g(model, queue, spec, 1);
    const Generation::Delta d = g.all();
    if (d.outcome == Outcome::error || d.ids.empty()) throw ApiError(503, "the engine did not generate: " + d.error);
    res.status = 200;
  }

  void routes() {
    auto post = [this](const char* path, auto fn) {
      svr.Post(path, [this, fn](const httplib::Request& req, httplib::Response& res) {
        guarded(req, res, [&] { fn(req, res); });
      });
    };
    auto get = [this](const char* path, auto fn) {
      svr.Get(path, [this, fn](const httplib::Request& req, httplib::Response& res) {
        guarded(req, res, [&] { fn(req, res); });
      });
    };
    auto both = [&](const char* path, auto fn) {
      get(path, fn);
      post(path, fn);
    };
    using Req = const httplib::Request&;
    using Res = httplib::Response&;
    post("/v1/completions", [this](Req q, Res r) { openai_endpoint(q, r, false); });
    post("/v1/chat/completions", [this](Req q, Res r) { openai_endpoint(q, r, true); });
    get("/v1/models", [this](Req, Res r) { reply(r, 200, openai::models(model, started)); });
    post("/generate", [this](Req q, Res r) { generate_endpoint(q, r); });
    post("/tokenize", [this](Req q, Res r) { reply(r, 200, sglang::tokenize(parse_request_body(q.body), model)); });
    post("/detokenize", [this](Req q, Res r) { reply(r, 200, sglang::detokenize(parse_request_body(q.body), model)); });
    get("/health", [this](Req, Res r) {
      if (!queue.accepting()) throw ApiError(503, "the server is shutting down");
      r.status = 200;
    });
    get("/health_generate", [this](Req, Res r) { health_generate(r); });
    both("/get_model_info", [this](Req, Res r) {
      reply(r, 200,
            {{"model_path", opt.model_path},
             {"tokenizer_path", opt.tokenizer_path},
             {"served_model_name", model.name},
             {"is_generation", true},
             {"max_model_len", model.context_length}});
    });
    both("/get_server_info", [this](Req, Res r) {
      json info = opt.server_info;
      info["version"] = "ballast";
      info["requests_in_flight"] = queue.in_flight();
      info["max_requests_in_flight"] = queue.capacity();
      reply(r, 200, info);
    });
    both("/flush_cache", [this](Req, Res r) {
      const CommandResult c = run(Command::flush_cache);
      r.status = c.ok ? 200 : 400;
      r.set_content(c.message, "text/plain");
    });
    both("/start_expert_distribution_record", [this](Req, Res r) { record_endpoint(r, Command::start_record); });
    both("/stop_expert_distribution_record", [this](Req, Res r) { record_endpoint(r, Command::stop_record); });
    both("/dump_expert_distribution_record", [this](Req, Res r) { record_endpoint(r, Command::dump_record); });
    get("/metrics", [this](Req, Res r) { r.set_content(metrics.text(), "text/plain; version=0.0.4; charset=utf-8"); });

    // Whatever no route answered (unknown path or method, a body over the limit) gets an error object.
    svr.set_error_handler(httplib::Server::HandlerWithResponse([this](const httplib::Request& req,
                                                                       httplib::Response& res) {
      if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
      std::string message;
      if (res.status == 404) message = fmt::format("no endpoint {} {}", req.method, req.path);
      else if (res.status == 413) message = fmt::format("the request body is over the limit of {} bytes", opt.max_body_bytes);
      else message = fmt::format("{} {}: HTTP {}", req.method, req.path, res.status);
      if (res.status < 500) metrics.refused("invalid");
      reply(res, res.status, error_body(res.status, message));
      return httplib::Server::HandlerResponse::Handled;
    }));
    svr.set_exception_handler([](const httplib::Request& req, httplib::Response& res, std::exception_ptr ep) {
      std::string what = "unknown error";
      try {
        std::rethrow_exception(ep);
      } catch (const std::exception& e) {
        what = e.what();
      } catch (...) {
      }
      reply(res, 500, error_body(500, fmt::format("{} {}: {}", req.method, req.path, what)));
    });
  }
};

HttpServer::HttpServer(const ModelContext& model, RequestQueue& queue, ServerMetrics& metrics, HttpOptions options)
    : impl_(std::make_unique<Impl>(model, queue, metrics, std::move(options))) {
  auto& svr = impl_->svr;
  // httplib's listen backlog is 5 (compiled into Debian's library): many clients connecting at
  // once would overflow it. The listening socket is noted here and listen() raised after bind.
  svr.set_socket_options([this](socket_t sock) {
    int yes = 1;
    ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
    impl_->listen_fd = sock;
  });
  const int threads = impl_->opt.threads;
  svr.new_task_queue = [threads] { return new httplib::ThreadPool(size_t(threads)); };
  svr.set_payload_max_length(impl_->opt.max_body_bytes);
  svr.set_keep_alive_max_count(1000);
  svr.set_read_timeout(30, 0);
  svr.set_write_timeout(30, 0);
  impl_->routes();
}

HttpServer::~HttpServer() = default;

void HttpServer::bind() {
  auto& i = *impl_;
  if (i.opt.port == 0) {
    const int port = i.svr.bind_to_any_port(i.opt.host);
    check(port > 0, "cannot listen on {}: no free port", i.opt.host);
    i.opt.port = port;
  } else {
    check(i.svr.bind_to_port(i.opt.host, i.opt.port), "cannot listen on {}:{} (in use, or not an address here)",
          i.opt.host, i.opt.port);
  }
  if (i.listen_fd >= 0) ::listen(i.listen_fd, SOMAXCONN);
}

int HttpServer::port() const { return impl_->opt.port; }

void HttpServer::listen() { impl_->svr.listen_after_bind(); }

void HttpServer::stop_accepting() { impl_->queue.stop_accepting(); }

void HttpServer::stop(std::chrono::milliseconds wait) {
  impl_->queue.stop_accepting();
  const auto until = std::chrono::steady_clock::now() + wait;
  while (impl_->writing.load() > 0 && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  impl_->svr.stop();
}

}  // namespace ballast::serve

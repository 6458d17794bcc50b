#pragma once
// The HTTP edge (cpp-httplib, a thread per connection): OpenAI's /v1 endpoints, SGLang's native
// ones and /metrics, routed to the protocol formatters, every failure answered with a status and
// an OpenAI-style error object. Handlers reach the engine only through the RequestQueue.
#include <chrono>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "ballast/serve/generation.h"
#include "ballast/serve/metrics.h"
#include "ballast/serve/request_queue.h"

namespace ballast::serve {

struct HttpOptions {
  std::string host = "127.0.0.1";
  int port = 30000;            // 0: any free port (port() tells which)
  int threads = 512;           // connections served at once
  size_t max_body_bytes = size_t(8) << 20;
  std::string recorder_dir = "/tmp";  // where /dump_expert_distribution_record writes
  nlohmann::json server_info;  // /get_server_info: the server's settings
  std::string model_path, tokenizer_path;
};

class HttpServer {
 public:
  HttpServer(const ModelContext& model, RequestQueue& queue, ServerMetrics& metrics, HttpOptions options);
  ~HttpServer();
  // Binds the listening socket (ballast::Error naming host:port when it cannot).
  void bind();
  int port() const;
  // Serves until stop(); returns once every connection's handler has returned.
  void listen();
  // New requests are refused (503) from now on; those in flight go on. Any thread.
  void stop_accepting();
  // Refuses new requests, waits (up to `wait`) for the responses being written to end, and
  // closes the listener. Any thread.
  void stop(std::chrono::milliseconds wait = std::chrono::milliseconds(10000));

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace ballast::serve

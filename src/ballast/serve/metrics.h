#pragma once
// The server's Prometheus metrics (GET /metrics, text exposition format 0.0.4), kept in a
// prometheus-cpp registry owned by the server (no global registry). HTTP threads count refusals;
// the engine loop counts everything the engine does, from each pass's gathered reports. Every
// update is thread-safe (the library's atomics), and so is text().
#include <memory>
#include <string>
#include <string_view>

#include <prometheus/counter.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include "ballast/serve/request_queue.h"

namespace ballast::serve {

// One expert domain's figures ("trunk" or "mtp"), totals since start.
struct DomainFigures {
  double balancedness = 1.0;  // mean over layers of mean/max rank load, the last pass
  int64_t rebalances = 0, experts_moved = 0, bytes_moved = 0;
  double rebalance_seconds = 0;  // planning and migration, finished rebalances
};

class ServerMetrics {
 public:
  ServerMetrics();

  // HTTP threads: a request refused before it reached the engine (reason: "invalid",
  // "overloaded", "stopping").
  void refused(std::string_view reason);

  // The engine loop.
  void prompt_tokens(int64_t n);
  void generated_tokens(int64_t n);
  void first_token(double ttft_seconds);
  // A request left the engine; tpot < 0 when it emitted fewer than two tokens.
  void finished(Outcome outcome, double e2e_seconds, double tpot_seconds);
  void pass();
  // After each pass: the sums over ranks.
  void state(int64_t waiting, int64_t running, double cache_usage, int64_t preemptions_total);
  void speculation(int64_t rounds_total, int64_t emitted_total);
  void domain(std::string_view name, const DomainFigures& figures);

  std::string text() const;

 private:
  // A counter family's series set to a running total (counters only rise; totals come from the engine).
  static void raise_to(prometheus::Counter& c, double total);

  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>& requests_;
  prometheus::Family<prometheus::Counter>& refused_;
  prometheus::Counter &prompt_tokens_, &generated_tokens_, &passes_, &preemptions_;
  prometheus::Gauge &waiting_, &running_, &cache_usage_;
  prometheus::Histogram &ttft_, &tpot_, &e2e_;
  prometheus::Family<prometheus::Gauge>& balancedness_;
  prometheus::Family<prometheus::Counter>& rebalances_;
  prometheus::Family<prometheus::Counter>& experts_moved_;
  prometheus::Family<prometheus::Counter>& bytes_moved_;
  prometheus::Family<prometheus::Counter>& rebalance_seconds_;
  prometheus::Counter &spec_rounds_, &spec_emitted_;
  prometheus::Gauge& acceptance_length_;
};

}  // namespace ballast::serve

#include "ballast/serve/metrics.h"

#include <prometheus/text_serializer.h>

namespace ballast::serve {

namespace {

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;
using prometheus::Histogram;

prometheus::Counter& counter(prometheus::Registry& r, const std::string& name, const std::string& help) {
  return BuildCounter().Name(name).Help(help).Register(r).Add({});
}
prometheus::Gauge& gauge(prometheus::Registry& r, const std::string& name, const std::string& help) {
  return BuildGauge().Name(name).Help(help).Register(r).Add({});
}
prometheus::Histogram& histogram(prometheus::Registry& r, const std::string& name, const std::string& help,
                                 Histogram::BucketBoundaries buckets) {
  return BuildHistogram().Name(name).Help(help).Register(r).Add({}, std::move(buckets));
}

}  // namespace

ServerMetrics::ServerMetrics()
    : registry_(std::make_shared<prometheus::Registry>()),
      requests_(BuildCounter()
                    .Name("ballast_requests_total")
                    .Help("Requests that left the engine, by outcome (stop, length, abort, timeout, error)")
                    .Register(*registry_)),
      refused_(BuildCounter()
                   .Name("ballast_requests_refused_total")
                   .Help("Requests refused before reaching the engine, by reason (invalid, overloaded, stopping)")
                   .Register(*registry_)),
      prompt_tokens_(counter(*registry_, "ballast_prompt_tokens_total", "Prompt tokens of requests admitted")),
      generated_tokens_(counter(*registry_, "ballast_generation_tokens_total", "Tokens generated")),
      passes_(counter(*registry_, "ballast_passes_total", "Engine steps that ran a forward pass")),
      preemptions_(counter(*registry_, "ballast_preemptions_total",
                           "Sequences preempted for cache room (recomputed later)")),
      waiting_(gauge(*registry_, "ballast_queue_depth", "Requests waiting to be admitted into a pass")),
      running_(gauge(*registry_, "ballast_running_sequences", "Sequences running (all ranks)")),
      cache_usage_(gauge(*registry_, "ballast_cache_usage_ratio", "Fraction of KV cache blocks in use (all ranks)")),
      ttft_(histogram(*registry_, "ballast_time_to_first_token_seconds", "Arrival to first generated token",
                      {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60})),
      tpot_(histogram(*registry_, "ballast_time_per_output_token_seconds",
                      "Mean time between output tokens after the first, per request",
                      {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5})),
      e2e_(histogram(*registry_, "ballast_e2e_request_latency_seconds", "Arrival to the last token",
                     {0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600})),
      balancedness_(BuildGauge()
                        .Name("ballast_expert_balancedness")
                        .Help("Per expert domain: mean over MoE layers of mean/max rank load in the last pass")
                        .Register(*registry_)),
      rebalances_(BuildCounter()
                      .Name("ballast_eplb_rebalances_total")
                      .Help("Per expert domain: rebalances planned")
                      .Register(*registry_)),
      experts_moved_(BuildCounter()
                         .Name("ballast_eplb_experts_moved_total")
                         .Help("Per expert domain: expert copies moved between ranks by rebalancing")
                         .Register(*registry_)),
      bytes_moved_(BuildCounter()
                       .Name("ballast_eplb_bytes_moved_total")
                       .Help("Per expert domain: expert weight bytes moved between ranks by rebalancing")
                       .Register(*registry_)),
      rebalance_seconds_(BuildCounter()
                             .Name("ballast_eplb_rebalance_seconds_total")
                             .Help("Per expert domain: time spent planning and migrating, finished rebalances")
                             .Register(*registry_)),
      spec_rounds_(counter(*registry_, "ballast_spec_verify_rounds_total", "MTP speculation: verifications")),
      spec_emitted_(counter(*registry_, "ballast_spec_emitted_tokens_total",
                            "MTP speculation: tokens the verifications emitted")),
      acceptance_length_(gauge(*registry_, "ballast_spec_acceptance_length",
                               "MTP speculation: tokens emitted per verification since start")) {
  for (Outcome o : {Outcome::stop, Outcome::length, Outcome::abort, Outcome::timeout, Outcome::error})
    requests_.Add({{"outcome", std::string(outcome_name(o))}});
  for (const char* r : {"invalid", "overloaded", "stopping"}) refused_.Add({{"reason", r}});
}

void ServerMetrics::raise_to(prometheus::Counter& c, double total) {
  if (total > c.Value()) c.Increment(total - c.Value());
}

void ServerMetrics::refused(std::string_view reason) { refused_.Add({{"reason", std::string(reason)}}).Increment(); }
void ServerMetrics::prompt_tokens(int64_t n) { prompt_tokens_.Increment(double(n)); }
void ServerMetrics::generated_tokens(int64_t n) { generated_tokens_.Increment(double(n)); }
void ServerMetrics::first_token(double ttft) { ttft_.Observe(ttft); }
void ServerMetrics::pass() { passes_.Increment(); }

void ServerMetrics::finished(Outcome outcome, double e2e, double tpot) {
  requests_.Add({{"outcome", std::string(outcome_name(outcome))}}).Increment();
  e2e_.Observe(e2e);
  if (tpot >= 0) tpot_.Observe(tpot);
}

void ServerMetrics::state(int64_t waiting, int64_t running, double cache_usage, int64_t preemptions_total) {
  waiting_.Set(double(waiting));
  running_.Set(double(running));
  cache_usage_.Set(cache_usage);
  raise_to(preemptions_, double(preemptions_total));
}

void ServerMetrics::speculation(int64_t rounds_total, int64_t emitted_total) {
  raise_to(spec_rounds_, double(rounds_total));
  raise_to(spec_emitted_, double(emitted_total));
  if (rounds_total > 0) acceptance_length_.Set(double(emitted_total) / double(rounds_total));
}

void ServerMetrics::domain(std::string_view name, const DomainFigures& f) {
  const prometheus::Labels l{{"domain", std::string(name)}};
  balancedness_.Add(l).Set(f.balancedness);
  raise_to(rebalances_.Add(l), double(f.rebalances));
  raise_to(experts_moved_.Add(l), double(f.experts_moved));
  raise_to(bytes_moved_.Add(l), double(f.bytes_moved));
  raise_to(rebalance_seconds_.Add(l), f.rebalance_seconds);
}

std::string ServerMetrics::text() const { return prometheus::TextSerializer().Serialize(registry_->Collect()); }

}  // namespace ballast::serve

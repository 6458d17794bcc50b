#include "ballast/cli/ep_args.h"

#include <algorithm>

#include "ballast/core/error.h"
#include "ballast/eplb/load.h"
#include "ballast/eplb/placement.h"

namespace ballast::cli {

void add_ep_options(CLI::App* c, EpArgs& a) {
  c->add_option("--ep", a.ep, "Expert-parallel ranks in this process (threads); under mpirun, the MPI world")
      ->check(CLI::Range(1, 1024));
  c->add_option("--ep-num-redundant-experts", a.redundant, "Redundant expert slots per MoE layer")->check(CLI::Range(0, 1 << 16));
  c->add_flag("--enable-eplb", a.enable_eplb, "Rebalance experts from the recorded load while generating");
  c->add_option("--eplb-algorithm", a.algorithm, "ballast | deepseek | deepseek_hierarchical")
      ->check(CLI::IsMember({"ballast", "deepseek", "deepseek_hierarchical"}));
  c->add_option("--eplb-rebalance-num-iterations", a.rebalance_iterations, "Forward passes between rebalances")
      ->check(CLI::Range(1, 1 << 30));
  c->add_flag("--eplb-forecast,!--no-eplb-forecast", a.eplb_forecast,
              "ballast: plan each rebalance for the next interval's forecast where a layer's load has a significant "
              "trend (default)");
  c->add_option("--eplb-rebalance-layers-per-chunk", a.layers_per_chunk, "Layers migrated per pass (0: all at once)")
      ->check(CLI::Range(0, 1 << 16));
  c->add_option("--init-expert-location", a.init_location,
                "trivial, or a JSON file with physical_to_logical_map or logical_count");
  c->add_option("--ep-dispatch-algorithm", a.dispatch, "static | random | dynamic | balanced")
      ->check(CLI::IsMember({"static", "random", "dynamic", "balanced"}));
  c->add_option("--expert-distribution-recorder-mode", a.recorder_mode, "stat | per_pass | per_token")
      ->check(CLI::IsMember({"stat", "per_pass", "per_token"}));
  c->add_option("--expert-distribution-recorder-buffer-size", a.recorder_buffer, "Passes kept by the recorder")
      ->check(CLI::Range(1, 1 << 24));
  c->add_option("--ep-ranks-per-node", a.ranks_per_node, "Ranks per node, for dispatch and migration (0: one node)")
      ->check(CLI::Range(0, 1024));
  c->add_option("--dump-expert-distribution", a.dump_distribution,
                "Record the trunk's expert load and write it (JSON, logical_count) at the end");
  c->add_option("--mtp-expert-domain", a.mtp_expert_domain,
                "own: the MTP head's MoE layer is an expert domain of its own (placed, recorded, rebalanced); "
                "sglang: identity placement and paused recording, as SGLang after its fix")
      ->check(CLI::IsMember({"own", "sglang"}));
}

runtime::ExpertParallelOptions to_ep_options(const EpArgs& a, int ranks) {
  runtime::ExpertParallelOptions o;
  check(a.ranks_per_node == 0 || ranks % a.ranks_per_node == 0,
        "--ep-ranks-per-node {}: the {} ranks do not divide into nodes of that size", a.ranks_per_node, ranks);
  // A JSON file holds physical_to_logical_map [L][P] (used as is) or logical_count [L][E]
  // (planned from, with the trunk's planner settings, by the engine).
  if (!a.init_location.empty() && a.init_location != "trivial") {
    const std::string text = eplb::read_text_file(a.init_location);
    if (text.find("physical_to_logical_map") != std::string::npos)
      o.initial_placement = eplb::placement_from_json_text(text, ranks, a.init_location);
    else
      o.initial_load = eplb::load_from_json_text(text, a.init_location);
  }
  auto& t = o.trunk;
  t.redundant = a.redundant;
  t.ranks_per_node = a.ranks_per_node;
  t.dispatch = eplb::parse_dispatch(a.dispatch);
  t.recorder_mode = eplb::parse_recorder_mode(a.recorder_mode);
  t.recorder_window = a.recorder_buffer;
  t.rebalance.enabled = a.enable_eplb;
  t.rebalance.interval = a.rebalance_iterations;
  t.rebalance.layers_per_chunk = a.layers_per_chunk;
  t.rebalance.algorithm = eplb::parse_algorithm(a.algorithm);
  t.rebalance.forecast = a.eplb_forecast;
  // The MTP head's domain takes the same settings, applied to its own placement and load.
  o.mtp = t;
  o.mtp_experts = a.mtp_expert_domain == "sglang" ? runtime::MtpExperts::sglang : runtime::MtpExperts::own_domain;
  return o;
}

nlohmann::json ep_summary(runtime::Engine& engine, int ranks) {
  nlohmann::json j = {{"ranks", ranks}, {"transport", engine.ep_transport()}};
  if (!engine.trunk_ep()) return j;
  const auto& rb = engine.trunk_ep()->rebalancer;
  if (auto* mtp = engine.mtp_ep()) {
    nlohmann::json m = nlohmann::json::array();
    for (const auto& e : mtp->rebalancer.events())
      m.push_back({{"after_pass", e.pass}, {"experts_moved", e.experts_moved}, {"failed", e.failed},
                   {"balancedness_before", e.balancedness_before}, {"balancedness_after", e.balancedness_after}});
    j["mtp_rebalances"] = m;
    j["mtp_balancedness"] = mtp->rebalancer.balancedness();
  }
  nlohmann::json events = nlohmann::json::array();
  for (const auto& e : rb.events())
    events.push_back({{"domain", e.domain},
                      {"after_pass", e.pass},
                      {"layers_changed", e.layers_changed},
                      {"layers_trending", e.layers_trending},
                      {"experts_moved", e.experts_moved},
                      {"bytes_moved", e.bytes_moved},
                      {"plan_ms", e.plan_seconds * 1e3},
                      {"total_ms", e.total_seconds * 1e3},
                      {"balancedness_before", e.balancedness_before},
                      {"balancedness_after", e.balancedness_after},
                      {"failed", e.failed}});
  j["rebalances"] = events;
  const auto& b = rb.balancedness();
  j["balancedness"] = b;
  // Mean per-pass balancedness before the first rebalance, and after the first and the last one
  // (null when no pass ran in that range).
  auto mean = [&](size_t lo, size_t hi) -> nlohmann::json {
    if (hi <= lo) return nullptr;
    double s = 0;
    for (size_t i = lo; i < hi; ++i) s += b[i];
    return s / double(hi - lo);
  };
  if (!rb.events().empty()) {
    auto after = [&](const auto& e) { return std::min(b.size(), size_t(e.pass) + 1); };
    j["balancedness_before_first_rebalance"] = mean(0, std::min(b.size(), size_t(rb.events().front().pass)));
    j["balancedness_after_first_rebalance"] = mean(after(rb.events().front()), b.size());
    j["balancedness_after_last_rebalance"] = mean(after(rb.events().back()), b.size());
  } else {
    j["balancedness_mean"] = mean(0, b.size());
  }
  return j;
}

}  // namespace ballast::cli

#pragma once
// Expert-parallel options, with SGLang's names, shared by the commands that run a model.
#include <CLI/CLI.hpp>

#include <nlohmann/json.hpp>
#include <string>

#include "ballast/runtime/engine.h"

namespace ballast::cli {

struct EpArgs {
  int ep = 1;  // in-process ranks (under mpirun the MPI world is used instead)
  int redundant = 0;
  bool enable_eplb = false;
  std::string algorithm = "ballast";
  int rebalance_iterations = 1000;
  int layers_per_chunk = 0;
  bool eplb_forecast = true;
  std::string init_location = "trivial";
  std::string dispatch = "static";
  std::string recorder_mode = "stat";
  int recorder_buffer = 1000;
  int ranks_per_node = 0;
  std::string dump_distribution;  // write the trunk recorder's dump here at the end
  std::string mtp_expert_domain = "own";  // own | sglang

  // Whether expert-parallel machinery is asked for at all (else the plain single-rank engine).
  bool wanted() const { return ep > 1 || enable_eplb || !dump_distribution.empty() || redundant > 0; }
};

void add_ep_options(CLI::App* cmd, EpArgs& a);
// The engine's options for `ranks` ranks; reads --init-expert-location's file.
runtime::ExpertParallelOptions to_ep_options(const EpArgs& a, int ranks);

// {"ranks", "rebalances": [...], "balancedness": [per pass], "balancedness_first_window",
//  "balancedness_last_window"} of a rank's trunk domain.
nlohmann::json ep_summary(runtime::Engine& engine, int ranks);

}  // namespace ballast::cli

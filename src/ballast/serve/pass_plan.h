#pragma once
// What keeps expert-parallel ranks in agreement while serving: before every pass rank 0
// broadcasts a PassPlan (the requests that join and on which rank, the aborts, the commands,
// whether to stop), every rank applies it and steps, and every rank sends back a RankReport (what
// its sequences emitted, its load) that rank 0 gathers. Both travel as bytes over the control
// plane (Communicator::all_gather), in-process ranks and MPI processes alike.
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "ballast/dist/communicator.h"
#include "ballast/runtime/engine.h"
#include "ballast/serve/request_queue.h"

namespace ballast::serve {

struct PassPlan {
  struct Join {
    uint64_t id;  // the server's request id
    int rank;     // the rank that runs it
    runtime::Request request;
  };
  std::vector<Join> joins;
  std::vector<uint64_t> aborts;
  std::vector<Command> commands;  // run by every rank before the pass, in order
  bool stop = false;              // the last plan: every rank leaves the loop after it
};

struct RankReport {
  struct Output {
    uint64_t id;
    std::vector<int32_t> tokens;
    std::vector<runtime::TokenLogprobs> logprobs;
    bool finished = false;
    runtime::FinishReason reason = runtime::FinishReason::none;
  };
  std::vector<Output> outputs;
  std::vector<std::pair<uint64_t, std::string>> refused;  // joins the engine would not take, and why
  int64_t running = 0, waiting = 0;            // sequences
  int64_t used_blocks = 0, total_blocks = 0;   // KV cache
  int64_t preemptions = 0;                     // since start
  int64_t spec_rounds = 0, spec_emitted = 0;   // MTP verifications and the tokens they emitted, since start
};

dist::Bytes encode(const PassPlan& plan);
PassPlan decode_plan(const dist::Bytes& bytes);
dist::Bytes encode(const RankReport& report);
RankReport decode_report(const dist::Bytes& bytes);

}  // namespace ballast::serve

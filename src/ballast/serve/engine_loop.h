#pragma once
// The serving loop of one rank: Engine::step() over and over, requests joining and leaving at
// every pass (continuous batching). Rank 0 (the only rank without expert parallelism) takes what
// the RequestQueue holds before each pass, plans the pass (PassPlan: which requests join on
// which rank, which end, commands) and broadcasts it; every rank applies the plan and steps in
// lockstep; rank 0 gathers every rank's RankReport and answers each request's stream and the
// metrics. A request the client gave up on, or past its deadline, is aborted at the next pass
// and its cache freed there. Once the queue stops accepting, in-flight requests may finish until
// the drain timeout, the rest are aborted, and the last plan tells every rank to stop.
#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <unordered_map>
#include <vector>

#include "ballast/dist/communicator.h"
#include "ballast/runtime/engine.h"
#include "ballast/serve/metrics.h"
#include "ballast/serve/pass_plan.h"
#include "ballast/serve/request_queue.h"

namespace ballast::serve {

struct LoopOptions {
  std::chrono::milliseconds idle_wait{50};    // how long rank 0 waits for work while idle
  std::chrono::milliseconds drain_timeout{30000};  // after the queue stops accepting
};

class EngineLoop {
 public:
  // Rank 0 gives the queue and metrics; other ranks pass null for both.
  EngineLoop(runtime::Engine& engine, dist::Communicator* comm, RequestQueue* queue, ServerMetrics* metrics,
             LoopOptions options = {});
  // Runs until the plan says stop. On rank 0 an exception fails every request in flight first
  // (and the queue stops accepting), then propagates.
  void run();

 private:
  struct InFlight {
    std::shared_ptr<RequestStream> stream;
    int rank = 0;
    Clock::time_point arrival, first_token;
    std::optional<Clock::time_point> deadline;
    int64_t tokens = 0;
    std::optional<Outcome> ending;  // aborted by the server: reported as this
  };

  bool serving() const { return queue_ != nullptr; }
  dist::Bytes broadcast(dist::Bytes mine);
  std::vector<dist::Bytes> gather(dist::Bytes mine);
  // Rank 0: the next pass's plan from what the queue holds, deadlines and shutdown.
  PassPlan plan_next();
  int least_loaded_rank() const;
  // Every rank: applies the plan, steps, reports.
  RankReport apply(const PassPlan& plan, std::vector<CommandResult>& results, bool& ran);
  CommandResult run_command(Command c);
  // Rank 0: answers streams, commands and metrics from the gathered reports.
  void collect(const std::vector<dist::Bytes>& reports, std::vector<CommandResult>& results, bool ran);
  void end(uint64_t id, Outcome outcome, const std::string& error = {});
  void fail_all(const std::string& why);

  runtime::Engine& engine_;
  dist::Communicator* comm_;
  RequestQueue* queue_;
  ServerMetrics* metrics_;
  LoopOptions opt_;
  // Every rank: its requests' engine ids.
  std::unordered_map<uint64_t, int64_t> local_;
  std::unordered_map<int64_t, uint64_t> global_;
  // Rank 0.
  std::map<uint64_t, InFlight> in_flight_;
  std::vector<int64_t> rank_load_;  // requests in flight per rank
  std::vector<std::promise<CommandResult>> awaiting_;  // the commands of the plan in flight
  std::optional<Clock::time_point> drain_until_;
  int64_t used_blocks_ = 0;  // over ranks, after the last pass
};

}  // namespace ballast::serve

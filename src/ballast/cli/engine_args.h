#pragma once
// The flags of the commands that run the engine (generate, serve): threads, device, CUDA graphs and the overlap schedule,
// cache limits, expert parallelism and EPLB, MTP speculation, and where its ranks come from.
#include <CLI/CLI.hpp>

#include <functional>
#include <string>
#include <vector>

#include "ballast/cli/ep_args.h"
#include "ballast/cli/model_args.h"
#include "ballast/dist/communicator.h"
#include "ballast/dist/data_plane.h"

namespace ballast::cli {

// How passes are issued (SGLang's flags): CUDA graphs of decode, verification and draft passes
// (runtime/graph_sizes.h), and the overlap schedule (EngineOptions::overlap_schedule).
struct PassArgs {
  bool disable = false;       // --disable-cuda-graph
  std::vector<int> sizes;     // --cuda-graph-bs (empty: the default list)
  int max_bs = 0;             // --cuda-graph-max-bs (0: no bound)
  bool no_overlap = false;    // --disable-overlap-schedule
  void apply(runtime::EngineOptions& opts) const;
};
void add_pass_options(CLI::App* cmd, PassArgs& a);

struct EngineArgs {
  int threads = 0;
  EpArgs ep;
  CacheArgs cache;
  DeviceArgs device;
  PassArgs passes;
  std::string speculative_algorithm;  // "NEXTN" (or "MTP"/"EAGLE", which mean the same here)
  int speculative_steps = 1, speculative_topk = 1, speculative_draft_tokens = 0;
  double dist_timeout = 600;  // seconds a rank may wait for the others in one collective (0: for ever)

  bool speculate() const { return !speculative_algorithm.empty(); }
};

void add_engine_options(CLI::App* cmd, EngineArgs& a);
// --dist-timeout SECONDS (commands that run ranks without the other engine flags: bench).
void add_dist_timeout_option(CLI::App* cmd, double& seconds);
// The checks across flags (call from the command's callback); throws CLI::ValidationError.
void validate(const EngineArgs& a);

// The engine's options for a rank of `comm` (null: one rank) with `cache` limits resolved.
runtime::EngineOptions engine_options(const EngineArgs& a, dist::Communicator* comm, dist::DataPlane* data,
                                      const runtime::CacheOptions& cache);
// The GPU of a rank of `comm` (null: the one rank): MPI ranks of one host take its GPUs by local
// rank (dist::local_gpu: an error naming the counts when the host has fewer GPUs than ranks);
// in-process ranks share GPU 0, as does a lone process. 0 where `device` makes no CUDA backend.
int rank_gpu(const DeviceArgs& device, const dist::Communicator* comm);
// How many ranks of `comm` take their caches out of the memory this rank's does
// (CacheOptions::ranks_sharing_memory): in-process ranks all (GPU 0, or the host's memory), MPI
// ranks on GPUs one (a GPU each), MPI ranks on CPUs their host's.
int ranks_sharing_memory(const DeviceArgs& device, const dist::Communicator* comm);
// Loads the engine of one rank (its GPU under MPI: the local rank's; a progress bar on rank 0).
std::unique_ptr<runtime::Engine> load_rank_engine(const std::filesystem::path& dir, const EngineArgs& a,
                                                  const runtime::EngineOptions& opts, int threads);

// Runs fn on every rank this process hosts, each on its own thread with its threads: the MPI
// rank (under mpirun; --ep must then be 1 or the world's size), --ep G in-process ranks sharing
// the cores, or the single rank (comm and data null). Returns the number of ranks. A rank that
// waits in one collective longer than --dist-timeout ends the job (MPI: every process, with a
// one-line error; in-process ranks: an error on every rank).
using RankFn = std::function<void(dist::Communicator* comm, dist::DataPlane* data, int threads)>;
int run_on_ranks(const EngineArgs& a, const RankFn& fn);

}  // namespace ballast::cli

#include "ballast/cli/engine_args.h"

#include <fmt/format.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "ballast/cli/error_line.h"
#include "ballast/cli/option_checks.h"
#include "ballast/core/error.h"
#include "ballast/dist/local_gpu.h"
#include "ballast/dist/mpi_communicator.h"
#include "ballast/runtime/engine.h"
#include "ballast/dist/mpi_data_plane.h"
#ifdef BALLAST_HAS_NCCL
#include "ballast/dist/nccl_data_plane.h"
#endif
#include "ballast/dist/thread_world.h"
#include "ballast/dist/watchdog.h"

namespace ballast::cli {

void add_engine_options(CLI::App* c, EngineArgs& a) {
  c->add_option("--threads", a.threads, "CPU threads per rank (0 = all cores, shared among in-process ranks)")
      ->check(CLI::Range(0, 1024));
  add_ep_options(c, a.ep);
  add_cache_options(c, a.cache);
  add_device_option(c, a.device);
  add_pass_options(c, a.passes);
  c->add_option("--speculative-algorithm", a.speculative_algorithm, "NEXTN: draft with the model's MTP head")
      ->check(CLI::IsMember({"NEXTN", "MTP", "EAGLE"}));
  c->add_option("--speculative-num-steps", a.speculative_steps, "Chained draft steps per verify pass")
      ->check(CLI::Range(1, runtime::kMaxDraftSteps));
  c->add_option("--speculative-eagle-topk", a.speculative_topk, "Drafts per step (only 1: chain drafting)")
      ->check(CLI::Range(1, 1));
  c->add_option("--speculative-num-draft-tokens", a.speculative_draft_tokens,
                "Tokens per verify pass (must be num-steps + 1 with topk 1)");
  add_dist_timeout_option(c, a.dist_timeout);
}

void add_pass_options(CLI::App* c, PassArgs& a) {
  c->add_flag("--disable-cuda-graph", a.disable,
              "Run decode, verification and draft passes eagerly (no CUDA graphs)");
  c->add_option("--cuda-graph-bs", a.sizes,
                "Batch sizes (sequences) whose passes are CUDA graphs, e.g. 1,2,4,8,16: a pass pads to the smallest "
                ">= its own, a larger one runs eagerly (default: 1, 2, 4, then every 8 to 256, then every 16)")
      ->delimiter(',')
      ->check(CLI::Range(1, 1 << 20));
  c->add_option("--cuda-graph-max-bs", a.max_bs, "The largest batch size of --cuda-graph-bs kept (default: no bound)")
      ->check(CLI::Range(1, 1 << 20));
  c->add_flag("--disable-overlap-schedule", a.no_overlap,
              "Land every pass's tokens on the host before the next pass is issued (default: a decode pass is "
              "issued first and reads them on the device, overlapping the host's work with the GPU's)");
}

void PassArgs::apply(runtime::EngineOptions& opts) const {
  opts.cuda_graphs = !disable;
  opts.cuda_graph_bs = sizes;
  opts.cuda_graph_max_bs = max_bs;
  opts.overlap_schedule = !no_overlap;
}

void add_dist_timeout_option(CLI::App* c, double& seconds) {
  c->add_option("--dist-timeout", seconds,
                "Seconds a rank may wait for the others in one collective before the job ends with an error "
                "(0: no limit)")
      ->check(finite_range(0, 1e7));
}

void validate(const EngineArgs& a) {
  if (a.speculative_draft_tokens != 0 && a.speculative_draft_tokens != a.speculative_steps + 1)
    throw CLI::ValidationError("--speculative-num-draft-tokens",
                               "with --speculative-eagle-topk 1 it must be --speculative-num-steps + 1");
}

runtime::EngineOptions engine_options(const EngineArgs& a, dist::Communicator* comm, dist::DataPlane* data,
                                      const runtime::CacheOptions& cache) {
  check(comm || a.ep.init_location.empty() || a.ep.init_location == "trivial",
        "--init-expert-location {}: the run has no expert parallelism to place (add --ep G, or run under mpirun)",
        a.ep.init_location);
  runtime::EngineOptions opts;
  opts.comm = comm;
  opts.data = data;
  if (comm) opts.ep = to_ep_options(a.ep, comm->size());
  a.passes.apply(opts);
  opts.cache = cache;
  opts.cache.ranks_sharing_memory = ranks_sharing_memory(a.device, comm);
  opts.speculative_steps = a.speculate() ? a.speculative_steps : 0;
  if (comm && comm->rank() != 0) opts.log.level = LogLevel::Quiet;
#ifdef BALLAST_HAS_NCCL
  // MPI ranks on GPUs (one each) move rows and weights over NCCL on the backend's stream instead of
  // through host copies; the engine asks for it only when its backend is a GPU's.
  if (auto* mpi = dynamic_cast<dist::MpiCommunicator*>(comm))
    opts.device_data_plane = [mpi, device = a.device](kernels::Backend& be) -> std::unique_ptr<dist::DataPlane> {
      return std::make_unique<dist::NcclDataPlane>(*mpi, rank_gpu(device, mpi), be.stream(), mpi->watchdog());
    };
#endif
  return opts;
}

int ranks_sharing_memory(const DeviceArgs& device, const dist::Communicator* comm) {
  if (!comm) return 1;
  const auto* mpi = dynamic_cast<const dist::MpiCommunicator*>(comm);
  if (!mpi) return comm->size();  // in-process ranks: one GPU, or the host's memory
  return cuda_devices_for(device) > 0 ? 1 : mpi->local_size();  // a GPU a process, or the host's memory
}

int rank_gpu(const DeviceArgs& device, const dist::Communicator* comm) {
  const auto* mpi = dynamic_cast<const dist::MpiCommunicator*>(comm);
  if (!mpi) return 0;
  const int devices = cuda_devices_for(device);
  // (With no GPU at all the CUDA backend says so itself.)
  return devices > 0 ? dist::local_gpu(mpi->local_rank(), mpi->local_size(), devices) : 0;
}

std::unique_ptr<runtime::Engine> load_rank_engine(const std::filesystem::path& dir, const EngineArgs& a,
                                                  const runtime::EngineOptions& opts, int threads) {
  return load_engine(dir, a.device, threads, opts, !opts.comm || opts.comm->rank() == 0, rank_gpu(a.device, opts.comm));
}

int run_on_ranks(const EngineArgs& a, const RankFn& fn) {
  const auto timeout = std::chrono::milliseconds(int64_t(a.dist_timeout * 1e3));
  if (dist::mpi_launched()) {
    // A rank that stops answering leaves the others in MPI for ever: the watchdog ends the job.
    int rank = -1;
    dist::Watchdog watchdog(timeout, [&rank](const std::string& why) {
      std::fputs(error_line(fmt::format("rank {}: {} (--dist-timeout); ending the job", rank, why)).c_str(), stderr);
      std::fflush(stderr);
      dist::MpiSession::abort(kExitError);
    });
    dist::MpiCommunicator comm(&watchdog);
    rank = comm.rank();
    dist::MpiDataPlane data(&watchdog);
    check(a.ep.ep == 1 || a.ep.ep == comm.size(), "--ep {} does not match the MPI world of {} ranks", a.ep.ep,
          comm.size());
    fn(&comm, &data, a.threads);
    return comm.size();
  }
  if (a.ep.wanted()) {
    const int ranks = a.ep.ep;
    const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
    const int threads = a.threads > 0 ? a.threads : int(std::max(1u, cores / unsigned(ranks)));
    dist::ThreadWorld world(ranks, timeout);
    dist::run_ranks(world, [&](dist::Communicator& comm) { fn(&comm, &world.data_plane(comm.rank()), threads); });
    return ranks;
  }
  fn(nullptr, nullptr, a.threads);
  return 1;
}

}  // namespace ballast::cli

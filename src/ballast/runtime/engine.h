#pragma once
// The engine of one rank: a loaded model with its backend and, under expert parallelism, this
// rank's expert slots, the trunk's expert domain and its rebalance schedule; and batched greedy
// generation over it. Under EP every rank runs generate_greedy on its own prompts in lockstep
// (attention data-parallel), so every MoE layer's all-to-all sees every rank.
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "ballast/core/log.h"
#include "ballast/core/thread_pool.h"
#include "ballast/dist/communicator.h"
#include "ballast/io/checkpoint.h"
#include "ballast/kernels/cpu/cpu_ops.h"
#include "ballast/model/model.h"
#include "ballast/moe/ep_runner.h"
#include "ballast/moe/moe_runner.h"
#include "ballast/moe/rebalancer.h"
#include "ballast/runtime/sampler.h"

namespace ballast::runtime {

// How the MTP head's MoE layer is placed under expert parallelism.
enum class MtpExperts {
  own_domain,  // an expert domain of its own: placement, recorder, rebalancing (ballast's design)
  sglang,      // as SGLang after its fix: identity placement (slot = expert), recording paused
};

struct ExpertParallelOptions {
  moe::DomainOptions trunk;      // placement, dispatch, recorder and rebalancing of the trunk
  std::optional<moe::DomainOptions> mtp;  // the MTP head's MoE layer (own_domain); default: the trunk's
  MtpExperts mtp_experts = MtpExperts::own_domain;
  std::string init_expert_location = "trivial";  // or a JSON file: physical_to_logical_map / logical_count
};

struct EngineOptions {
  int threads = 0;  // 0 = all cores
  std::function<void(uint64_t done, uint64_t total)> load_progress;  // while paging weights in
  dist::Communicator* comm = nullptr;  // expert parallelism over these ranks (null: one rank)
  ExpertParallelOptions ep;
  Logger log;
};

struct GenerationStats {
  int64_t prefill_tokens = 0, decode_tokens = 0;
  double prefill_seconds = 0, decode_seconds = 0;
  int64_t passes = 0;  // forward passes this rank took part in
};

struct GenerationResult {
  std::vector<std::vector<int32_t>> outputs;  // new tokens per prompt
  GenerationStats stats;
};

class Engine {
 public:
  static std::unique_ptr<Engine> load(const std::filesystem::path& model_dir, const EngineOptions& opts = {});

  model::Model& model() { return *model_; }
  const model::ModelConfig& config() const { return model_->config(); }
  kernels::Ops& ops() { return ops_; }
  int rank() const { return comm_ ? comm_->rank() : 0; }
  // Whether `mine` holds on any rank (the ranks' agreement to take another pass together).
  bool any_rank(bool mine) { return comm_ ? comm_->all_reduce_or(mine) : mine; }
  int ranks() const { return comm_ ? comm_->size() : 1; }

  // Expert parallelism (null on one rank without EP, and for the MTP head without one).
  struct Domain {
    std::unique_ptr<moe::ExpertDomain> domain;
    std::unique_ptr<moe::SlotStore> slots;
    std::unique_ptr<moe::ExpertParallelRunner> runner;
    std::unique_ptr<moe::Rebalancer> rebalancer;
  };
  moe::ExpertDomain* trunk_domain() { return trunk_.domain.get(); }
  moe::Rebalancer* trunk_rebalancer() { return trunk_.rebalancer.get(); }
  moe::SlotStore* trunk_slots() { return trunk_.slots.get(); }
  Domain& trunk() { return trunk_; }
  Domain& mtp() { return mtp_; }

  // Decoding of all prompts as one batch (greedy, or sampled per `sampling`): one prefill pass,
  // then one decode pass per step. A sequence stops after max_new_tokens or after emitting any id
  // in stop_ids. Under EP all ranks call this together (any of them may have no prompts).
  GenerationResult generate(const std::vector<std::vector<int32_t>>& prompts, int max_new_tokens,
                            std::span<const int32_t> stop_ids = {}, const SamplingParams& sampling = {});

  // One forward pass over `chunks` (empty on a rank with nothing to run under EP), followed by
  // the expert domains' end-of-pass work.
  model::ForwardResult forward(std::span<const model::SeqChunk> chunks);

  // One MTP pass, followed by the MTP domain's end-of-pass work.
  model::ForwardResult mtp_forward(std::span<const model::MtpChunk> chunks);

  // Logits [T, V] of one prefill pass over `ids`.
  std::vector<float> prefill_logits(std::span<const int32_t> ids);

 private:
  Engine(int threads, io::Checkpoint ckpt, dist::Communicator* comm);
  void setup_expert_parallel(const EngineOptions& opts);
  // Places `layers` (one domain's MoE layers) over the ranks and builds its runner and schedule.
  Domain make_domain(const std::string& name, std::span<const model::MoeWeights* const> layers,
                     eplb::Placement initial, const moe::DomainOptions& opts, const Logger& log);

  ThreadPool pool_;
  kernels::CpuOps ops_;
  io::Checkpoint ckpt_;
  dist::Communicator* comm_;
  moe::LocalMoeRunner local_moe_;
  Domain trunk_, mtp_;
  MtpExperts mtp_experts_ = MtpExperts::own_domain;
  std::unique_ptr<model::Model> model_;
};

}  // namespace ballast::runtime

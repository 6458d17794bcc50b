#pragma once
// The engine of one rank (nano-vllm's LLMEngine): a loaded model on a backend, the state cache,
// the scheduler and model runner, and under expert parallelism this rank's expert domains (the
// trunk's and the MTP head's). Requests go in with add_request(); step() runs one pass (and,
// with MTP speculation, its draft passes) and is the one loop that generate(), speculative
// decoding and a server drive. Under expert parallelism every rank steps in lockstep with its own
// sequences (attention data-parallel): every MoE layer is a collective over the ranks.
#include <atomic>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "ballast/core/log.h"
#include "ballast/dist/communicator.h"
#include "ballast/dist/data_plane.h"
#include "ballast/eplb/load.h"
#include "ballast/io/checkpoint.h"
#include "ballast/kernels/backend.h"
#include "ballast/model/model.h"
#include "ballast/moe/expert_parallel.h"
#include "ballast/moe/moe_runner.h"
#include "ballast/runtime/backend_device_queue.h"
#include "ballast/runtime/model_runner.h"
#include "ballast/runtime/sampler.h"
#include "ballast/runtime/scheduler.h"
#include "ballast/runtime/sequence.h"
#include "ballast/runtime/staged_data_plane.h"
#include "ballast/runtime/state_cache.h"

namespace ballast::runtime {

// How the MTP head's MoE layer is placed under expert parallelism.
enum class MtpExperts {
  own_domain,  // an expert domain of its own: placement, recorder, rebalancing (ballast's design)
  sglang,      // as SGLang after its fix: identity placement (slot = expert), recording paused
};

struct ExpertParallelOptions {
  moe::DomainOptions trunk;               // placement, dispatch, recorder and rebalancing of the trunk
  std::optional<moe::DomainOptions> mtp;  // the MTP head's MoE layer (own_domain); default: the trunk's
  MtpExperts mtp_experts = MtpExperts::own_domain;
  // --init-expert-location for the trunk (read by the caller): a placement used as is, or a
  // load planned from with the trunk's planner settings. Neither: trivial.
  std::optional<eplb::Placement> initial_placement;
  std::optional<eplb::LoadTrace> initial_load;
};

// Cache and batch limits (SGLang's option names).
struct CacheOptions {
  int page_size = 16;               // --page-size: rows per KV block
  int64_t max_total_tokens = 0;     // --max-total-tokens: KV rows in the pool (0: see below)
  int max_running_requests = 64;    // --max-running-requests
  int chunked_prefill_size = 2048;  // --chunked-prefill-size: rows per pass, all sequences together
  int64_t context_length = 0;       // --context-length: the longest sequence (0: max_total_tokens)
  // --mem-fraction-static: where max_total_tokens is 0, the KV rows this fraction of the device's
  // memory leaves once the weights are in (runtime/memory_budget.h; 0: 64 K rows), the pool shared
  // by `ranks_sharing_memory` ranks (in-process ranks on one device); every rank takes the
  // smallest share, so that all have one context length.
  double mem_fraction_static = 0;
  int ranks_sharing_memory = 1;
};

// The most chained draft steps a round may have (SGLang's --speculative-num-steps range here).
inline constexpr int kMaxDraftSteps = 16;

struct EngineOptions {
  dist::Communicator* comm = nullptr;  // expert parallelism over these ranks (null: one rank)
  dist::DataPlane* data = nullptr;     // ... and their data plane (with comm)
  // When `data` cannot move this backend's buffers: a plane that can, made over the loaded backend
  // (the CLI's: NCCL on the backend's stream for MPI ranks with a GPU each). Unset, or when it
  // returns null, `data`'s plane on the device (DataPlane::on_device: in-process ranks on one
  // GPU), else host copies (StagedDataPlane).
  std::function<std::unique_ptr<dist::DataPlane>(kernels::Backend&)> device_data_plane;
  ExpertParallelOptions ep;
  CacheOptions cache;
  int speculative_steps = 0;           // NEXTN: chained MTP drafts per round (0: no speculation; at most kMaxDraftSteps)
  bool quantize_fp8 = false;           // load: linear weights to block-scaled FP8 (model/fp8_at_load.h)
  bool cuda_graphs = true;             // decode passes as captured graphs where the backend can (EP: in-process ranks on one GPU)
  // --disable-overlap-schedule turns it off (SGLang's overlap schedule): a decode pass is issued
  // before the previous pass's drawn tokens reach the host, reading them on the device, so that
  // the host's work between passes (landing the tokens, staging the next pass) runs while the GPU
  // computes. Only where every sequence decodes and continues, without speculation or expert
  // parallelism; anything else lands the pass in flight first (Engine::step).
  bool overlap_schedule = true;
  std::vector<int> cuda_graph_bs;      // their batch sizes (graph_sizes.h; empty: the default list)
  int cuda_graph_max_bs = 0;           // ... at most this many sequences (0: the running requests' limit)
  // Once set (by a signal handler's thread), generate() aborts its requests at the next step and
  // returns what they had emitted. Ranks may see it at different steps: one that has stopped takes
  // part in the others' passes with no rows until none has work left.
  const std::atomic<bool>* stop = nullptr;
  std::function<void(uint64_t done, uint64_t total)> load_progress;    // while paging weights in
  std::function<void(uint64_t done, uint64_t total)> upload_progress;  // while copying them to the device
  // Under expert parallelism, while this rank's expert slots of a domain ("trunk", "mtp") are filled.
  std::function<void(const std::string& domain, uint64_t done, uint64_t total)> slot_progress;
  Logger log;
};

struct GenerationStats {
  int64_t prefill_tokens = 0, decode_tokens = 0;
  double prefill_seconds = 0, decode_seconds = 0;  // steps with prefill rows / decode-only steps
  int64_t passes = 0;                              // trunk passes this rank took part in
  int64_t overlapped = 0;                          // ... issued before the pass before had landed (overlap schedule)
};

struct GenerationResult {
  std::vector<std::vector<int32_t>> outputs;  // new tokens per prompt
  GenerationStats stats;
  bool stopped = false;  // EngineOptions::stop ended it early
};

struct SpeculativeStats {
  int64_t rounds = 0;   // verifications, summed over sequences
  int64_t emitted = 0;  // tokens those rounds emitted
  std::vector<int64_t> proposed, accepted;  // per draft position
  double draft_seconds = 0, verify_seconds = 0;
  double acceptance_length() const { return rounds ? double(emitted) / double(rounds) : 0.0; }
};

// What one step produced for one sequence.
struct StepOutput {
  int64_t id;
  std::vector<int32_t> tokens;  // emitted this step
  bool finished;
  FinishReason reason;
  std::vector<TokenLogprobs> logprobs;  // one per token, for a request that asked
};

class Engine {
 public:
  static std::unique_ptr<Engine> load(const std::filesystem::path& model_dir, std::unique_ptr<kernels::Backend> backend,
                                      const EngineOptions& opts = {});
  // An engine over weights already on the backend (model::random_weights: benchmarks of the
  // published sizes). Under expert parallelism each rank's expert slots are copied from them and
  // the engine keeps no other reference to the routed experts (the caller's copy is all that
  // remains: let it go to hold the experts once).
  static std::unique_ptr<Engine> create(model::ModelConfig cfg, model::ModelWeights device_weights,
                                        std::unique_ptr<kernels::Backend> backend, const EngineOptions& opts = {});
  ~Engine();

  const model::ModelConfig& config() const { return model_->config(); }
  model::Model& model() { return *model_; }
  kernels::Backend& backend() { return *backend_; }
  ModelRunner& runner() { return *runner_; }
  const ModelRunner& runner() const { return *runner_; }
  StateCache& cache() { return *cache_; }
  Scheduler& scheduler() { return *scheduler_; }
  int rank() const { return comm_ ? comm_->rank() : 0; }
  int ranks() const { return comm_ ? comm_->size() : 1; }

  // Expert parallelism (null on one rank without it, and for a model without MTP head).
  moe::ExpertParallelDomain* trunk_ep() { return trunk_ep_.get(); }
  // The data plane the expert domains use (the given one, one made by device_data_plane, or host
  // staging over the given one).
  dist::DataPlane* data_plane() { return data_; }
  // How expert parallelism moves rows and weights (the run logs it): "by the given data plane", or
  // the engine's own plane over it ("between device buffers ...", "device to device on the GPU
  // the ranks share ...", "through host copies ..."); empty without expert parallelism.
  const std::string& ep_transport() const { return transport_; }
  // Device-to-host copies the engine's own data plane made (the counts of in-process ranks on one
  // device, or everything under host staging; 0 with the given plane or NCCL's, whose downloads
  // are its own): the transport's price, not the passes'.
  int64_t plane_downloads() const {
    if (plane_queue_) return plane_queue_->downloads();
    const auto* staged = dynamic_cast<const StagedDataPlane*>(own_plane_.get());
    return staged ? staged->downloads() : 0;
  }
  moe::ExpertParallelDomain* mtp_ep() { return mtp_ep_.get(); }

  // Queues a request; returns its id. Throws if it could never fit the cache.
  int64_t add_request(Request request);
  // Finishes a request (reason aborted) at the next step; its cache is freed there.
  void abort(int64_t id);
  // One step: a pass of the trunk over what the scheduler forms and, with speculation, the MTP
  // passes that draft the next round. Under expert parallelism all ranks call it together.
  // Returns false (and runs no pass) once no rank has work left; aborts are still reported then.
  // Under the overlap schedule a decode pass may still be running when step() returns: its tokens
  // are emitted by the next step (which issues its own pass first where it can).
  bool step();
  // What the last step emitted and finished.
  const std::vector<StepOutput>& outputs() const { return outputs_; }

  // Every prompt as a request (greedy, or sampled per `sampling` with the i-th prompt seeded by
  // sequence_seed(sampling, i)), stepped until all are done (or EngineOptions::stop is set: then
  // `stopped` is true and the outputs are what was emitted). Under EP all ranks call it together
  // (any of them may have no prompts).
  GenerationResult generate(const std::vector<std::vector<int32_t>>& prompts, int max_new_tokens,
                            std::span<const int32_t> stop_ids = {}, const SamplingParams& sampling = {});

  // Logits [T, V] of a prefill over `ids` (a sequence of its own, released after). Under EP all
  // ranks call it together; a rank may pass no ids and gets nothing back.
  std::vector<float> prefill_logits(std::span<const int32_t> ids);

  // MTP speculation with `steps` chained drafts per round (0: off); only while no request runs.
  void set_speculative_steps(int steps);
  int speculative_steps() const { return steps_; }
  // The cache's limits as built: KV rows in the pool, and the longest sequence.
  int64_t max_total_tokens() const { return max_total_tokens_; }
  int64_t context_length() const { return context_length_; }
  const SpeculativeStats& speculative_stats() const { return spec_stats_; }
  const GenerationStats& stats() const { return stats_; }

 private:
  // A device buffer that a pass writes everything the host needs into: its expert domain's load
  // [L * P], then the drawn results. One download per pass.
  struct PassOutput {
    Tensor device;  // I32
    int64_t load_size = 0;
    std::vector<int32_t> host;  // where a pass waited for lands (pageable: small copies there come back sooner)
    // Where a pass left in flight lands (page-locked: the copy is queued without a wait), made
    // on first use.
    std::shared_ptr<void> landing;
    int32_t* landing_words() const { return static_cast<int32_t*>(landing.get()); }
    Tensor load() const { return device.rows(0, load_size); }
    Tensor results(int64_t n) const { return device.rows(load_size, load_size + n); }
  };

  Engine(std::unique_ptr<kernels::Backend> backend, std::optional<io::Checkpoint> ckpt, const EngineOptions& opts);
  // What load and create share once the weights are on the device; `source` is where expert
  // slots are filled from under expert parallelism (the host weights, or the device ones); the
  // model then gets `device` without its routed experts.
  void build(model::ModelConfig cfg, model::ModelWeights device, const model::ModelWeights& source);
  PassOutput make_output(int64_t load_size);
  // The pass outputs and, under expert parallelism (host: the weights as loaded), this rank's
  // expert domains with their slots filled.
  void build_outputs(const model::ModelWeights* host);
  void build_cache();  // state cache, scheduler, runner and sampler for the limits and steps_
  // The KV rows --mem-fraction-static buys this rank (the smallest over the ranks), measured with
  // no cache allocated.
  int64_t rows_from_memory(const StateCacheOptions& so);
  StepOutput& output_of(const Sequence& seq);
  // Ends a pass of `rows` rows: sums its domain's load over ranks on the device, downloads [load |
  // the first n results] in one copy, closes the domain's pass; returns the results on the host.
  std::span<const int32_t> finish_pass(PassOutput& out, moe::ExpertParallelDomain* domain, int64_t n, int64_t rows);
  // Puts a drawn token at position `at` of a sequence's tokens (its end, or the placeholder a pass in
  // flight left there) and reports it; false once the sequence is finished.
  bool emit(Sequence& seq, size_t at, int32_t token, const TokenLogprobs* logprobs = nullptr);
  // A pass's draw for a sequence, emitted at `at` and counted as decoded unless the pass prefilled
  // (nothing where the sequence finished before: a row it ran for nothing).
  void emit_draw(Sequence& seq, size_t at, int32_t token, const TokenLogprobs* logprobs, bool prefill);
  // Where a pass's results sit in its download: verdicts [verify_words], draws [draws], then, where
  // a sequence asked (top_k >= 0), the log-probabilities of its `rows` logits rows.
  struct ResultLayout {
    int64_t verify_words = 0, draws = 0, rows = 0;
    int top_k = -1;
  };
  // The logprobs of logits row `row` of a pass's results (null where the sequence did not ask).
  static const TokenLogprobs* logprobs_of(const Sequence& q, const int32_t* host, const ResultLayout& at, int64_t row,
                                          TokenLogprobs& into);
  // The overlap schedule. A pass in flight: its results are on their way to the host and every
  // sequence it drew for holds a placeholder token where its draw goes.
  struct InFlight {
    std::vector<int64_t> seqs;  // the drawing sequences' ids, in the order of the draws
    std::vector<size_t> at;     // each one's placeholder in its tokens
    ResultLayout layout;
    bool prefill = false;
  };
  // Whether the next pass may be issued before the one in flight lands: every running sequence
  // drew in it and continues as a decode of one row that the scheduler can place (no admission,
  // abort, preemption, or length reached), so that the pass's rows are its draws in their order.
  bool continues_in_flight() const;
  // Waits for the pass in flight's results and emits them (the sequences that finish are retired
  // by the step).
  void land();
  // Reports a finished (or aborted) sequence and gives its place and cache back; the caller erases it.
  void retire(Sequence& seq);
  // Reports and removes every finished sequence (aborted ones too).
  void retire_finished();
  Sampler::Row row_of(const Sequence& seq, int64_t position) const;
  // Speculation (speculative.cpp): the MTP passes after a trunk pass that enter the pass's rows
  // into the head's cache and draft the next round of every decoding sequence. A round of drafts:
  struct DraftRound {
    std::vector<Sequence*> drafting;  // the sequences that draft, in the order of the steps' rows
    std::vector<int64_t> padding;     // the rows of each one's first step to roll back after it
    bool samples = false;             // some draft samples: its distribution is kept for verification
    ModelRunner::Result last;         // the step issued last
    Tensor first_ids;                 // [drafting] the first step's drafts on the device
    std::vector<int32_t> first_drafts;  // ... on the host, once downloaded
  };
  // Whether the first draft step of a pass is issued before the pass's results are downloaded:
  // one draft step, every sequence verifies and first steps are padded to S + 1 rows (graphs).
  bool drafts_early(std::span<const Scheduled> pass);  // collective under EP
  // The first step, from what each sequence kept of the trunk pass (kept_rows, on the host), or,
  // early, from the verification's verdicts on the device (the drafts then go to early_ids).
  DraftRound first_draft_step(std::span<const Scheduled> pass, const ModelRunner::Result& trunk,
                              std::span<const int64_t> kept_rows, const Tensor& verdicts = {},
                              Tensor early_ids = {});
  // The chained steps once the host knows the first step's padding; the round's drafts go to the
  // sequences.
  void draft(DraftRound& round);
  // Draws step `step`'s drafts of the round's sequences into ids (keeping each draft's
  // distribution where it samples).
  void sample_drafts(const DraftRound& round, int step, Tensor ids);
  // Under --mtp-expert-domain sglang, the draft layer's load is recorded nowhere.
  std::optional<eplb::Recorder::PauseGuard> pause_mtp_recording();

  std::unique_ptr<kernels::Backend> backend_;
  std::optional<io::Checkpoint> ckpt_;  // the mapped checkpoint (none for create)
  EngineOptions opts_;
  dist::Communicator* comm_;
  std::unique_ptr<dist::DataPlane> own_plane_;  // when the given data plane cannot move this backend's buffers
  const BackendDeviceQueue* plane_queue_ = nullptr;  // own_plane_'s, when it is the ranks' plane on the device
  std::string transport_;                            // ep_transport()
  dist::DataPlane* data_;                       // the given one, or own_plane_
  int steps_ = 0;
  int64_t max_total_tokens_ = 0;  // KV rows in the pool (build_cache)
  int64_t context_length_ = 0;    // the longest sequence, prompt and output (build_cache)
  std::unique_ptr<model::Model> model_;
  std::unique_ptr<moe::LocalMoeRunner> local_moe_;
  PassOutput trunk_out_, mtp_out_;
  std::unique_ptr<moe::ExpertParallelDomain> trunk_ep_, mtp_ep_;
  std::unique_ptr<StateCache> cache_;
  std::unique_ptr<Scheduler> scheduler_;
  std::unique_ptr<GraphGroup> graph_group_;  // in-process ranks on one device: graphs of every rank's pass
  std::unique_ptr<ModelRunner> runner_;
  std::unique_ptr<Sampler> sampler_;
  Tensor kept_probs_;  // [max running * steps, V]: each draft's distribution, for verification
  Tensor verified_ids_;  // with speculation: where each verification logits row's token sits in the verdicts
  std::map<int64_t, std::unique_ptr<Sequence>> seqs_;
  std::optional<InFlight> in_flight_;
  int64_t next_id_ = 0;
  std::vector<StepOutput> outputs_;
  GenerationStats stats_;
  SpeculativeStats spec_stats_;
};

}  // namespace ballast::runtime

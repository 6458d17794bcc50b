#include "ballast/runtime/engine.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>

#include "ballast/core/clock.h"
#include "ballast/core/error.h"
#include "ballast/eplb/plan.h"
#include "ballast/model/fp8_at_load.h"
#include "ballast/runtime/graph_sizes.h"
#include "ballast/runtime/memory_budget.h"

namespace ballast::runtime {

namespace {

// The trunk's starting placement: --init-expert-location's placement as is, or planned from its
// load with the trunk's planner settings, or trivial.
eplb::Placement initial_placement(const ExpertParallelOptions& ep, int layers, int experts, int physical, int ranks) {
  eplb::Placement p;
  if (ep.initial_placement) p = *ep.initial_placement;
  else if (ep.initial_load) p = eplb::plan(*ep.initial_load, moe::plan_options(ep.trunk, ranks, physical - experts));
  else return eplb::Placement::trivial(layers, experts, physical, ranks);
  check(p.layers == layers && p.logical == experts && p.physical == physical && p.ranks == ranks,
        "--init-expert-location: placement is {} layers x {} experts x {} slots over {} ranks, the model needs {} x {} x "
        "{} over {}",
        p.layers, p.logical, p.physical, p.ranks, layers, experts, physical, ranks);
  p.validate();
  return p;
}

// Speculation's draft steps: 0 (none), or 1 to kMaxDraftSteps with the model's MTP head.
void check_draft_steps(int steps, const model::Model& m) {
  check(steps >= 0 && steps <= kMaxDraftSteps && (steps == 0 || m.has_mtp()),
        "speculative decoding needs an MTP head (mtp.* tensors) and 1 to {} draft steps: {} steps, the model has {}",
        kMaxDraftSteps, steps, m.has_mtp() ? "one" : "none");
}

int physical_slots(const moe::DomainOptions& o, int experts, int ranks, const char* what) {
  // More slots than every rank holding every expert serve nothing and cost an expert's weights each.
  check(o.redundant >= 0 && int64_t(o.redundant) <= int64_t(experts) * ranks,
        "{}: {} redundant slots, more than {} ({} experts on each of {} ranks)", what, o.redundant,
        int64_t(experts) * ranks, experts, ranks);
  const int P = experts + o.redundant;
  check(P % ranks == 0, "{}: {} experts + {} redundant slots are not divisible by {} ranks", what,
        experts, o.redundant, ranks);
  return P;
}

}  // namespace

std::string_view finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::none: return "";
    case FinishReason::stop: return "stop";
    case FinishReason::length: return "length";
    case FinishReason::aborted: return "abort";
  }
  return "";
}

Engine::Engine(std::unique_ptr<kernels::Backend> backend, std::optional<io::Checkpoint> ckpt, const EngineOptions& opts)
    : backend_(std::move(backend)), ckpt_(std::move(ckpt)), opts_(opts), comm_(opts.comm), data_(opts.data),
      steps_(opts.speculative_steps) {
  // A plane that moves host memory only: one that moves device buffers where the caller can make
  // it (NCCL), else the same ranks' plane on the device they share (in-process ranks on one GPU),
  // else host copies.
  const Device device = backend_->device();
  if (data_) transport_ = "by the given data plane";
  if (data_ && !data_->moves(device)) {
    transport_ = "between device buffers (the device data plane)";
    if (opts.device_data_plane) own_plane_ = opts.device_data_plane(*backend_);
    if (!own_plane_ || !own_plane_->moves(device)) {
      auto queue = std::make_unique<BackendDeviceQueue>(*backend_);
      BackendDeviceQueue* q = queue.get();
      own_plane_ = data_->on_device(std::move(queue));
      plane_queue_ = own_plane_ ? q : nullptr;
      transport_ = "device to device on the GPU the ranks share (the in-process plane on the device)";
    }
    if (!own_plane_ || !own_plane_->moves(device)) {
      own_plane_ = std::make_unique<StagedDataPlane>(*data_, *backend_);
      plane_queue_ = nullptr;
      transport_ = "through host copies (host staging of the data plane)";
    }
    data_ = own_plane_.get();
    opts_.log.info("expert parallelism over {} ranks: rows and weights {}", data_->size(), transport_);
  }
}

Engine::~Engine() {
  if (in_flight_) backend_->wait_downloads();  // (its host memory goes with trunk_out_)
}

std::unique_ptr<Engine> Engine::load(const std::filesystem::path& model_dir, std::unique_ptr<kernels::Backend> backend,
                                     const EngineOptions& opts) {
  check(backend != nullptr, "Engine::load: no backend");
  check((opts.comm == nullptr) == (opts.data == nullptr),
        "expert parallelism needs both the control plane (comm) and the data plane (data)");
  model::ModelConfig cfg = model::load_model_config(model_dir);
  io::Checkpoint ckpt = io::Checkpoint::open(model_dir);
  if (opts.load_progress) ckpt.prefault(opts.load_progress);
  ckpt.check_finite();
  std::unique_ptr<Engine> e(new Engine(std::move(backend), std::move(ckpt), opts));
  model::ModelWeights host = model::bind_weights(cfg, *e->ckpt_);
  if (opts.quantize_fp8) {  // on the host, before any copy: every rank's slots are filled from these
    const model::Fp8AtLoad q = model::quantize_linear_fp8(host);
    opts.log.info("quantized {} linear weights to FP8 (128 x 128 blocks) at load: {:.2f} GB -> {:.2f} GB", q.tensors,
                  double(q.bytes_before) / 1e9, double(q.bytes_after) / 1e9);
  }
  model::ModelWeights device = host;
  // Under expert parallelism the routed experts go to the ranks' slots from `host`, never here.
  if (opts.comm) model::drop_routed_experts(device);
  // Weights go to the device once, here (a CPU reads them in place: nothing to report).
  uint64_t total = 0, done = 0;
  const bool report = opts.upload_progress && e->backend_->device() != Device::CPU;
  if (report) model::for_each_tensor(device, [&](Tensor& t) { total += t.storage_bytes(); });
  model::for_each_tensor(device, [&](Tensor& t) {
    t = e->backend_->to_device(t);
    if (report) opts.upload_progress(done += t.storage_bytes(), total);
  });
  e->build(std::move(cfg), std::move(device), host);
  return e;
}

std::unique_ptr<Engine> Engine::create(model::ModelConfig cfg, model::ModelWeights device_weights,
                                       std::unique_ptr<kernels::Backend> backend, const EngineOptions& opts) {
  check(backend != nullptr, "Engine::create: no backend");
  check((opts.comm == nullptr) == (opts.data == nullptr),
        "expert parallelism needs both the control plane (comm) and the data plane (data)");
  std::unique_ptr<Engine> e(new Engine(std::move(backend), std::nullopt, opts));
  const model::ModelWeights source = device_weights;  // views: the slots are filled from these
  e->build(std::move(cfg), std::move(device_weights), source);
  return e;
}

void Engine::build(model::ModelConfig cfg, model::ModelWeights device, const model::ModelWeights& source) {
  // Under expert parallelism every MoE layer goes through the ranks' slots, filled from `source`:
  // the model holds no routed expert, so that the experts take their memory once, in the slots.
  if (opts_.comm) model::drop_routed_experts(device);
  local_moe_ = std::make_unique<moe::LocalMoeRunner>(backend_->ops());
  model_ = std::make_unique<model::Model>(std::move(cfg), std::move(device), backend_->ops(), *local_moe_);
  check_draft_steps(steps_, *model_);
  const CacheOptions& c = opts_.cache;
  check(c.chunked_prefill_size > 0 && c.max_running_requests > 0 && c.page_size > 0,
        "cache options: chunked prefill size {}, {} running requests, page size {}", c.chunked_prefill_size,
        c.max_running_requests, c.page_size);
  build_outputs(opts_.comm ? &source : nullptr);
  build_cache();
}

Engine::PassOutput Engine::make_output(int64_t load_size) {
  // Results: at most a verification of every row (drafts + 2 per sequence) and a draw per row,
  // then the logprobs of every logits row (at most a row per pass row): its own and top-K pairs;
  // or a round's drafts (every step's, downloaded after the last).
  const int64_t chunk = opts_.cache.chunked_prefill_size, seqs = opts_.cache.max_running_requests;
  const int64_t results = std::max(3 * chunk + seqs + 16 + chunk * (1 + 2 * kernels::kMaxTopLogprobs),
                                   int64_t(kMaxDraftSteps) * seqs);
  PassOutput out;
  out.load_size = load_size;
  out.device = backend_->alloc({load_size + results}, DType::I32);
  if (load_size > 0) {
    Tensor load = out.load();
    backend_->ops().zero(load);
  }
  return out;
}

void Engine::build_outputs(const model::ModelWeights* host) {
  trunk_out_ = make_output(0);
  mtp_out_ = make_output(0);
  if (!host) return;
  const auto& cfg = config();
  const int G = comm_->size(), E = cfg.num_experts;
  const ExpertParallelOptions& ep = opts_.ep;
  moe::ExpertParallelSetup setup{*backend_, *comm_, *data_, opts_.cache.chunked_prefill_size,
                                 cfg.num_experts_per_tok, opts_.log, opts_.slot_progress};
  std::vector<std::span<const kernels::SwigluWeights>> trunk_layers;
  for (const auto& l : host->layers)
    if (l.ffn == model::FfnType::Moe) trunk_layers.push_back(l.moe.experts);
  if (!trunk_layers.empty()) {
    const int L = int(trunk_layers.size()), P = physical_slots(ep.trunk, E, G, "--ep-num-redundant-experts");
    trunk_out_ = make_output(int64_t(L) * P);
    trunk_ep_ = std::make_unique<moe::ExpertParallelDomain>("trunk", trunk_layers, initial_placement(ep, L, E, P, G),
                                                            ep.trunk, trunk_out_.load().reshape({L, P}), setup);
    model_->set_trunk_moe(trunk_ep_->runner);
  }
  if (host->mtp && host->mtp->layers[0].ffn == model::FfnType::Moe) {
    moe::DomainOptions o = ep.mtp.value_or(ep.trunk);
    if (ep.mtp_experts == MtpExperts::sglang) {
      // SGLang after its fix: the draft layer has no dispatch table (slot = logical expert) and
      // is never rebalanced.
      o.redundant = 0;
      o.rebalance.enabled = false;
    }
    const int P = physical_slots(o, E, G, "MTP expert slots");
    mtp_out_ = make_output(P);
    mtp_ep_ = std::make_unique<moe::ExpertParallelDomain>(
        "mtp", std::vector<std::span<const kernels::SwigluWeights>>{host->mtp->layers[0].moe.experts},
        eplb::Placement::trivial(1, E, P, G), o, mtp_out_.load().reshape({1, P}), setup);
    model_->set_mtp_moe(mtp_ep_->runner);
  }
}

int64_t Engine::rows_from_memory(const StateCacheOptions& so) {
  const CacheOptions& c = opts_.cache;
  const auto& cfg = config();
  CacheBudget b;
  b.fraction = c.mem_fraction_static;
  b.sharing = std::max(1, c.ranks_sharing_memory);
  b.slot_bytes = int64_t(so.slots) * StateCache::slot_bytes(cfg);
  b.block_bytes = StateCache::block_bytes(cfg, backend_->kv_cache_dtype(), so.block_size, so.mtp);
  b.block_size = so.block_size;
  if (b.block_bytes == 0) return int64_t(1) << 16;  // no attention layer: KV rows cost nothing
  // Every rank has its weights in before any measures (the barrier), and has measured before any
  // allocates (the gather).
  if (comm_) comm_->barrier();
  const kernels::MemoryInfo m = backend_->memory();
  int64_t rows = cache_rows_for(m, b);
  if (comm_) {
    dist::Bytes mine(sizeof rows);
    std::memcpy(mine.data(), &rows, sizeof rows);
    for (const dist::Bytes& theirs : comm_->all_gather(mine)) {
      int64_t r = 0;
      std::memcpy(&r, theirs.data(), sizeof r);
      rows = std::min(rows, r);
    }
  }
  const double GB = 1e9, left = double(m.free_bytes) - (1 - b.fraction) * double(m.total_bytes);
  check(rows > 2 * int64_t(steps_) + 1,
        "--mem-fraction-static {}: {:.2f} of the device's {:.2f} GB are free with the weights in and {:.2f} GB are to "
        "stay free for the passes, which leaves {}{}; the {} DeltaNet state slots take {:.2f} GB: no room for a KV "
        "cache of {:.3g} MB a {}-row block (raise the fraction, lower --max-running-requests, or give "
        "--max-total-tokens)",
        b.fraction, double(m.free_bytes) / GB, double(m.total_bytes) / GB, (1 - b.fraction) * double(m.total_bytes) / GB,
        left > 0 ? fmt::format("{:.2f} GB", left / GB) : std::string("nothing"),
        b.sharing > 1 ? fmt::format(" for {} ranks", b.sharing) : std::string(), so.slots, double(b.slot_bytes) / GB,
        double(b.block_bytes) / 1e6, b.block_size);
  opts_.log.info("KV cache: {} rows ({:.2f} GB) from --mem-fraction-static {} ({:.2f} of {:.2f} GB free with the "
                 "weights in{})",
                 rows, double((rows / b.block_size + 1) * b.block_bytes) / GB, b.fraction, double(m.free_bytes) / GB,
                 double(m.total_bytes) / GB, b.sharing > 1 ? fmt::format(", shared by {} ranks", b.sharing) : "");
  return rows;
}

void Engine::build_cache() {
  const CacheOptions& c = opts_.cache;
  const auto& cfg = config();
  const int S = steps_;
  bool deltanet = false;
  for (auto t : cfg.layer_types) deltanet = deltanet || t == model::LayerType::LinearAttention;
  StateCacheOptions so;
  so.block_size = c.page_size;
  // Every running sequence's slot, its snapshots while it verifies, one for prefill_logits and
  // one for the padding sequence.
  so.slots = c.max_running_requests * (1 + (deltanet && S > 0 ? S + 1 : 0)) + 2;
  so.mtp = model_->has_mtp();
  so.entries = c.max_running_requests + 2;  // and the padding sequence, and prefill_logits'
  scheduler_.reset();
  runner_.reset();
  cache_.reset();  // a cache built before (other draft steps) gives its memory back first
  const bool by_memory = c.max_total_tokens <= 0 && c.mem_fraction_static > 0;
  const int64_t total = c.max_total_tokens > 0 ? c.max_total_tokens
                        : by_memory            ? rows_from_memory(so)
                                               : int64_t(1) << 16;
  // Positions past the model's trained length are not refused by the math, only wrong: the
  // context is the model's unless given. Sized by memory, it is also within the pool, less the
  // drafts' headroom (as serve sizes it for a pool it is given).
  const int64_t trained = cfg.max_position_embeddings > 0 ? cfg.max_position_embeddings : total;
  const int64_t room = by_memory ? total - 2 * int64_t(S) : total;
  if (by_memory)
    check(c.context_length <= room, "--context-length {} does not fit the {} cache rows --mem-fraction-static {} leaves{}",
          c.context_length, total, c.mem_fraction_static,
          S > 0 ? fmt::format(" less {} for speculation", 2 * S) : std::string());
  const int64_t context = c.context_length > 0 ? c.context_length : std::min(room, trained);
  context_length_ = context;
  max_total_tokens_ = total;
  so.blocks = (total + c.page_size - 1) / c.page_size + 1;  // + padding's
  so.table_width = (context + S + 1 + c.page_size - 1) / c.page_size;  // the runner's max_blocks_per_seq
  try {
    cache_ = std::make_unique<StateCache>(*backend_, cfg, so);
  } catch (const std::exception& e) {
    fail("the state cache of {} rows (max_total_tokens) and {} state slots (max_running_requests {}) cannot be "
         "allocated: {}", total, so.slots, c.max_running_requests, e.what());
  }
  scheduler_ = std::make_unique<Scheduler>(
      *cache_, SchedulerOptions{c.max_running_requests, c.chunked_prefill_size, S}, comm_);
  RunnerLimits lim;
  lim.max_tokens = c.chunked_prefill_size;
  lim.max_seqs = c.max_running_requests + 1;
  lim.max_blocks_per_seq = int(cache_->blocks_for(context + S + 1));
  lim.max_verify_rows = S + 1;
  // Graphs under expert parallelism only where the ranks share the GPU (threads): one graph of
  // every rank's pass (graph_group.h). Processes would each need the collectives in their graphs.
  lim.graphs = opts_.cuda_graphs && backend_->can_capture() && (!comm_ || data_->shares_device());
  lim.graph_sizes = graph_sizes(opts_.cuda_graph_bs, opts_.cuda_graph_max_bs, lim.max_seqs);
  if (comm_ && lim.graphs && !graph_group_) graph_group_ = std::make_unique<GraphGroup>(*comm_, *backend_, *data_);
  runner_ = std::make_unique<ModelRunner>(*model_, *backend_, *cache_, lim, graph_group_.get());
  sampler_ = std::make_unique<Sampler>(*backend_, std::max(c.chunked_prefill_size, c.max_running_requests),
                                       c.max_running_requests * std::max(S, 1));
  kept_probs_ = Tensor();
  verified_ids_ = Tensor();
  if (S > 0) {
    // Verdicts are [B, S + 2] = [a, tokens...]: logits row i of the verifications emits word
    // i + i / (S + 1) + 1, whatever B is (a prefix of this one table serves every pass).
    std::vector<int32_t> at(size_t(c.max_running_requests) * (S + 1));
    for (size_t i = 0; i < at.size(); ++i) at[i] = int32_t(i + i / size_t(S + 1) + 1);
    verified_ids_ = backend_->alloc({int64_t(at.size())}, DType::I32);
    backend_->upload(at.data(), verified_ids_);
  }
}

void Engine::set_speculative_steps(int steps) {
  check_draft_steps(steps, *model_);
  check(!scheduler_->has_work(), "the number of draft steps can change only while no request runs");
  if (steps == steps_) return;
  steps_ = steps;
  build_cache();
}

int64_t Engine::add_request(Request r) {
  const int64_t V = config().vocab_size;
  for (int32_t id : r.prompt)
    check(id >= 0 && id < V, "prompt token id {} is outside the vocabulary of {}", id, V);
  const SamplingParams& sp = r.sampling;
  check(std::isfinite(sp.temperature) && sp.temperature >= 0 && std::isfinite(sp.top_p) && sp.top_p > 0 &&
            sp.top_p <= 1 && sp.top_k >= 0,
        "sampling: temperature {} must be finite and >= 0, top_p {} in (0, 1], top_k {} >= 0", sp.temperature,
        sp.top_p, sp.top_k);
  check(r.top_logprobs <= kernels::kMaxTopLogprobs, "top_logprobs {} is above the limit of {}", r.top_logprobs,
        kernels::kMaxTopLogprobs);
  check(int64_t(r.prompt.size()) + r.max_new_tokens <= context_length_,
        "a prompt of {} tokens and {} new ones exceed the context length of {}", r.prompt.size(), r.max_new_tokens,
        context_length_);
  auto s = std::make_unique<Sequence>();
  s->id = next_id_++;
  s->prompt_len = r.prompt.size();
  s->tokens = std::move(r.prompt);
  s->sampling = r.sampling;
  s->max_new_tokens = r.max_new_tokens;
  s->stop_ids = std::move(r.stop_ids);
  s->top_logprobs = r.top_logprobs;
  scheduler_->add(*s);
  const int64_t id = s->id;
  seqs_.emplace(id, std::move(s));
  return id;
}

void Engine::abort(int64_t id) {
  auto it = seqs_.find(id);
  if (it == seqs_.end() || it->second->finished()) return;
  it->second->status = SequenceStatus::finished;
  it->second->finish = FinishReason::aborted;
}

StepOutput& Engine::output_of(const Sequence& s) {
  for (auto& o : outputs_)
    if (o.id == s.id) return o;
  return outputs_.emplace_back(StepOutput{s.id, {}, false, FinishReason::none});
}

bool Engine::emit(Sequence& s, size_t at, int32_t token, const TokenLogprobs* logprobs) {
  if (s.finished()) return false;
  check(at >= s.prompt_len && at <= s.tokens.size(), "emit: token position {} of a sequence of {}", at, s.tokens.size());
  if (at == s.tokens.size()) s.tokens.push_back(token);
  else s.tokens[at] = token;
  StepOutput& out = output_of(s);
  out.tokens.push_back(token);
  if (logprobs) out.logprobs.push_back(*logprobs);
  if (std::find(s.stop_ids.begin(), s.stop_ids.end(), token) != s.stop_ids.end()) s.finish = FinishReason::stop;
  else if (int64_t(at + 1 - s.prompt_len) >= s.max_new_tokens) s.finish = FinishReason::length;
  if (s.finish != FinishReason::none) {
    s.status = SequenceStatus::finished;
    s.tokens.resize(at + 1);  // a placeholder after it (a pass in flight drew past the end) is no token
  }
  return !s.finished();
}

void Engine::emit_draw(Sequence& s, size_t at, int32_t token, const TokenLogprobs* logprobs, bool prefill) {
  const bool open = !s.finished();
  emit(s, at, token, logprobs);
  if (open && !prefill) ++stats_.decode_tokens;
}

const TokenLogprobs* Engine::logprobs_of(const Sequence& q, const int32_t* host, const ResultLayout& at, int64_t row,
                                         TokenLogprobs& into) {
  if (q.top_logprobs < 0) return nullptr;
  const int32_t* a = host + at.verify_words + at.draws;
  const int64_t R = at.rows, K = at.top_k;
  into.logprob = std::bit_cast<float>(a[row]);
  into.top.clear();
  for (int k = 0; k < q.top_logprobs; ++k)
    into.top.emplace_back(a[R + row * K + k], std::bit_cast<float>(a[R + R * K + row * K + k]));
  return &into;
}

Sampler::Row Engine::row_of(const Sequence& s, int64_t position) const {
  return {&s.sampling, s.sampling.seed, int32_t(position)};
}

std::span<const int32_t> Engine::finish_pass(PassOutput& out, moe::ExpertParallelDomain* domain, int64_t n,
                                             int64_t rows) {
  if (domain) {
    Tensor load = out.load();
    data_->all_reduce_sum(load);
  }
  const int64_t words = out.load_size + n;
  out.host.resize(size_t(words));
  if (words > 0) backend_->download(out.device.rows(0, words), out.host.data());
  if (domain) {
    Tensor load = out.load();
    backend_->ops().zero(load);
    domain->end_pass(std::span<const int32_t>(out.host.data(), size_t(out.load_size)), rows);
  }
  return {out.host.data() + out.load_size, size_t(n)};
}

bool Engine::continues_in_flight() const {
  const InFlight& f = *in_flight_;
  const int64_t n = int64_t(f.seqs.size());
  if (scheduler_->waiting() > 0 || int64_t(scheduler_->running()) != n || n > scheduler_->options().token_budget ||
      cache_->free_blocks() < n)  // (a row each needs at most a new block each: no preemption)
    return false;
  for (int64_t id : f.seqs) {
    auto it = seqs_.find(id);
    if (it == seqs_.end()) return false;
    const Sequence& q = *it->second;
    // Aborted, or its last token is the one in flight (tokens hold its placeholder).
    if (q.status != SequenceStatus::running || int64_t(q.generated()) >= q.max_new_tokens) return false;
  }
  return true;
}

void Engine::land() {
  const InFlight f = std::move(*in_flight_);
  in_flight_.reset();
  backend_->wait_downloads();
  const int32_t* host = trunk_out_.landing_words() + trunk_out_.load_size;
  TokenLogprobs lp;
  for (size_t j = 0; j < f.seqs.size(); ++j) {
    auto it = seqs_.find(f.seqs[j]);
    if (it == seqs_.end()) continue;  // finished while the pass ran: its row is dropped
    Sequence& q = *it->second;
    emit_draw(q, f.at[j], host[j], logprobs_of(q, host, f.layout, int64_t(j), lp), f.prefill);
  }
}

void Engine::retire(Sequence& q) {
  StepOutput& o = output_of(q);
  o.finished = true;
  o.reason = q.finish;
  scheduler_->retire(q);
}

void Engine::retire_finished() {
  for (auto it = seqs_.begin(); it != seqs_.end();) {
    if (it->second->finished()) {
      retire(*it->second);
      it = seqs_.erase(it);
    } else {
      ++it;
    }
  }
}

bool Engine::step() {
  outputs_.clear();
  // The pass in flight lands first unless this step's pass can be issued before it does.
  if (in_flight_ && !continues_in_flight()) land();
  // Requests aborted since the last step (and any the landing finished) leave first.
  retire_finished();
  auto scheduled = scheduler_->schedule();
  if (!scheduled) return false;
  const double t0 = now_seconds();
  const int S = steps_;
  // Overlapped: this pass's rows are the pass in flight's draws in their order, one each; its
  // tokens are read from them on the device.
  const bool overlapped = in_flight_.has_value();
  if (overlapped) {
    bool rows_match = scheduled->size() == in_flight_->seqs.size();
    for (size_t i = 0; rows_match && i < scheduled->size(); ++i) {
      const Scheduled& s = (*scheduled)[i];
      rows_match = s.seq->id == in_flight_->seqs[i] && s.rows == 1 && s.draws && !s.verify;
    }
    check(rows_match, "overlap schedule: a pass of {} sequences does not continue the {} in flight", scheduled->size(),
          in_flight_->seqs.size());
  }

  // Verifications first: their logits rows form one block for the verify op.
  std::stable_partition(scheduled->begin(), scheduled->end(), [](const Scheduled& s) { return s.verify; });
  std::vector<std::vector<int32_t>> verify_tokens;
  verify_tokens.reserve(scheduled->size());
  std::vector<ModelRunner::Entry> entries;
  std::vector<Sampler::Row> verify_rows, draw_rows;
  std::vector<int32_t> drafts, draft_rows;
  bool prefill = false, all_draw = true;
  for (const Scheduled& s : *scheduled) {
    Sequence& q = *s.seq;
    ModelRunner::Entry e;
    e.cache = &q.cache;
    const int64_t first = q.cache.length - s.rows;  // position of the pass's first row
    all_draw = all_draw && s.draws && !s.verify;
    if (s.verify) {
      auto& t = verify_tokens.emplace_back(1, q.tokens.back());
      t.insert(t.end(), q.drafts.begin(), q.drafts.end());
      e.tokens = t;
      e.logits = ModelRunner::Logits::all;
      e.verify = true;
      for (int i = 0; i <= S; ++i) verify_rows.push_back(row_of(q, first + i + 1));
      drafts.insert(drafts.end(), q.drafts.begin(), q.drafts.end());
      for (int i = 0; i < S; ++i) draft_rows.push_back(q.place * S + i);
    } else {
      e.tokens = std::span<const int32_t>(q.tokens).subspan(size_t(first), size_t(s.rows));
      e.logits = s.draws ? ModelRunner::Logits::last : ModelRunner::Logits::none;
      if (s.draws) draw_rows.push_back(row_of(q, first + s.rows));
      const bool decode = s.rows == 1 && s.draws && q.generated() > 0;
      if (!decode) {
        prefill = true;
        stats_.prefill_tokens += s.rows;
      }
    }
    entries.push_back(e);
  }

  const int64_t Bv = int64_t(verify_tokens.size()), Rv = Bv * (S + 1), Rs = int64_t(draw_rows.size());
  const int64_t Rout = Bv * (S + 2);  // verdicts: per verification, a count and a + 1 tokens
  // The draws are staged before the pass (a captured graph finds them in place), padded to the
  // rows of a decode graph's batch; the sample op runs inside the pass. A verification pass draws
  // nothing (its padding rows neither): a graph of one captures no draw whose rows would move with
  // the number of sequences it pads.
  static const SamplingParams greedy;
  const int64_t pass_rows = runner_->logit_rows(entries);  // plans the pass (under EP: every rank's)
  const int64_t Rdraw = Bv > 0 ? Rs : pass_rows - Rv;
  while (int64_t(draw_rows.size()) < Rdraw) draw_rows.push_back({&greedy, 0, 0});
  const kernels::SamplingRows staged = Rdraw > 0 ? sampler_->stage(draw_rows) : kernels::SamplingRows{};
  const Tensor results = trunk_out_.results(Rout + Rdraw);
  Tensor verdicts = results.rows(0, Rout).reshape({Bv, S + 2}), ids = results.rows(Rout, Rout + Rdraw);
  // (The pass in flight drew into the same words: this pass reads them before it draws over them,
  // and their download was queued before either.)
  const Tensor in_flight_draws = overlapped ? results.rows(0, Rs) : Tensor();
  const ModelRunner::Result r = runner_->forward(
      entries,
      [&](const ModelRunner::Result& pass) {
        if (Rdraw > 0) sampler_->draw(pass.logits.rows(Rv, Rv + Rdraw), staged, kernels::Draw::target, ids);
      },
      in_flight_draws);
  if (Bv > 0)
    sampler_->verify(runner_->workspace(), r.logits.rows(0, Rv), verify_rows, drafts, S, kept_probs_, draft_rows,
                     verdicts);
  // Log-probabilities of every logits row's token when a sequence of the pass asks, into the
  // same download: [logprob R | top ids R x K | top logprobs R x K] after the draws.
  int K = -1;
  for (const Scheduled& s : *scheduled)
    if (s.verify || s.draws) K = std::max(K, s.seq->top_logprobs);
  const int64_t R = Rv + Rdraw, lp_words = K >= 0 ? R * (1 + 2 * int64_t(K)) : 0;
  if (lp_words > 0) {
    const Tensor area = trunk_out_.results(Rout + Rdraw + lp_words).rows(Rout + Rdraw, Rout + Rdraw + lp_words);
    auto as_f32 = [](const Tensor& t, std::vector<int64_t> shape) {
      return Tensor::borrow(t.raw(), std::move(shape), DType::F32, t.device());
    };
    Tensor token_ids = runner_->workspace().take({R}, DType::I32);
    if (Bv > 0) {
      Tensor verified = token_ids.rows(0, Rv);
      backend_->ops().gather_rows(verdicts.reshape({Bv * (S + 2), 1}), verified_ids_.rows(0, Rv), 1,
                                  verified);
    }
    if (Rdraw > 0) {
      Tensor drawn = token_ids.rows(Rv, R);
      backend_->ops().copy(ids, drawn);
    }
    Tensor lp = as_f32(area.rows(0, R), {R});
    Tensor top_ids = area.rows(R, R + R * K).reshape({R, K});
    Tensor top_lp = as_f32(area.rows(R + R * K, R + 2 * R * K), {R, K});
    backend_->ops().token_logprobs(r.logits.rows(0, R), token_ids, lp, top_ids, top_lp);
  }
  const int64_t words = lp_words > 0 ? Rout + Rdraw + lp_words : Rout + Rs;
  const ResultLayout layout{Rout, Rdraw, R, K};
  ++stats_.passes;
  // While this pass runs: the one before lands.
  if (overlapped) {
    ++stats_.overlapped;
    land();
  }

  // Left in flight where the next pass may continue it: every sequence draws, none of them its last token.
  bool leaves_in_flight = opts_.overlap_schedule && !comm_ && S == 0 && all_draw && Rs > 0;
  for (const Scheduled& s : *scheduled)
    leaves_in_flight = leaves_in_flight && !s.seq->finished() && int64_t(s.seq->generated()) + 1 < s.seq->max_new_tokens;
  if (leaves_in_flight) {
    InFlight f{{}, {}, layout, prefill};
    for (const Scheduled& s : *scheduled) {
      Sequence& q = *s.seq;
      f.seqs.push_back(q.id);
      f.at.push_back(q.tokens.size());
      q.tokens.push_back(-1);  // its draw, once landed
    }
    if (!trunk_out_.landing)
      trunk_out_.landing = backend_->host_buffer(size_t(trunk_out_.device.numel()) * sizeof(int32_t));
    backend_->download_async(trunk_out_.device.rows(0, words), trunk_out_.landing_words());
    in_flight_ = std::move(f);
    (prefill ? stats_.prefill_seconds : stats_.decode_seconds) += seconds_since(t0);
    return true;
  }

  // With one draft step, where every sequence verifies, the draft step goes out before the results
  // come back (it reads the verdicts on the device) and its drafts come back with them.
  const bool early = drafts_early(*scheduled);
  DraftRound round;
  if (early) {
    round = first_draft_step(*scheduled, r, {}, verdicts, trunk_out_.results(words + Bv).rows(words, words + Bv));
    check(int64_t(round.drafting.size()) == Bv, "{} of {} verifying sequences drafted", round.drafting.size(), Bv);
  }
  const std::span<const int32_t> host =
      finish_pass(trunk_out_, trunk_ep_.get(), early ? words + Bv : words, r.hidden.dim(0));
  if (early) round.first_drafts.assign(host.begin() + words, host.end());
  TokenLogprobs lp_row;
  const double t_verified = now_seconds();

  // Emit what was drawn; a verification keeps the rows of its accepted drafts and rolls back the rest.
  std::vector<int64_t> kept(scheduled->size());
  int64_t b = 0, j = 0;
  for (size_t i = 0; i < scheduled->size(); ++i) {
    const Scheduled& s = (*scheduled)[i];
    Sequence& q = *s.seq;
    kept[i] = s.rows;
    if (s.verify) {
      const int32_t* v = host.data() + b++ * (S + 2);  // [a, d_1 .. d_a, one more]
      const int a = v[0];
      check(a >= 0 && a <= S, "verification returned {} accepted drafts of {}", a, S);
      spec_stats_.proposed.resize(size_t(S), 0);
      spec_stats_.accepted.resize(size_t(S), 0);
      for (int k = 0; k < S; ++k) {
        ++spec_stats_.proposed[size_t(k)];
        if (k < a) ++spec_stats_.accepted[size_t(k)];
      }
      ++spec_stats_.rounds;
      const size_t before = q.tokens.size();
      for (int k = 0; k <= a; ++k)
        if (!emit(q, q.tokens.size(), v[1 + k], logprobs_of(q, host.data(), layout, (b - 1) * (S + 1) + k, lp_row)))
          break;
      const int64_t emitted = int64_t(q.tokens.size() - before);
      spec_stats_.emitted += emitted;
      if (!prefill) stats_.decode_tokens += emitted;
      cache_->rollback(q.cache, S - a);
      q.drafts.clear();
      kept[i] = a + 1;
      if (early) round.padding[size_t(b - 1)] = S - a;
    } else if (s.draws) {
      // (A sequence the landing above finished ran this row for nothing.)
      emit_draw(q, q.tokens.size(), host[size_t(Rout + j)], logprobs_of(q, host.data(), layout, Rv + j, lp_row),
                prefill);
      ++j;
    }
  }
  if (Bv > 0) spec_stats_.verify_seconds += t_verified - t0;
  if (S > 0) {
    if (!early) round = first_draft_step(*scheduled, r, kept);
    draft(round);
  }
  // (Only this pass's sequences can have finished since the step began.)
  for (const Scheduled& s : *scheduled)
    if (s.seq->finished()) {
      const int64_t id = s.seq->id;
      retire(*s.seq);
      seqs_.erase(id);
    }
  (prefill ? stats_.prefill_seconds : stats_.decode_seconds) += seconds_since(t0);
  return true;
}

GenerationResult Engine::generate(const std::vector<std::vector<int32_t>>& prompts, int max_new_tokens,
                                  std::span<const int32_t> stop_ids, const SamplingParams& sampling) {
  check(max_new_tokens > 0, "max_new_tokens must be positive");
  const GenerationStats before = stats_;
  std::map<int64_t, size_t> index;
  for (size_t i = 0; i < prompts.size(); ++i) {
    check(!prompts[i].empty(), "empty prompt");
    Request r{prompts[i], sampling, max_new_tokens, {stop_ids.begin(), stop_ids.end()}};
    r.sampling.seed = sequence_seed(sampling, i);
    index[add_request(std::move(r))] = i;
  }
  GenerationResult res;
  res.outputs.resize(prompts.size());
  for (bool ran = true; ran;) {
    if (opts_.stop && opts_.stop->load() && !res.stopped) {
      res.stopped = true;
      for (const auto& [id, i] : index) abort(id);
    }
    ran = step();
    for (const StepOutput& o : outputs_)
      if (auto it = index.find(o.id); it != index.end())
        res.outputs[it->second].insert(res.outputs[it->second].end(), o.tokens.begin(), o.tokens.end());
  }
  res.stats.prefill_tokens = stats_.prefill_tokens - before.prefill_tokens;
  res.stats.decode_tokens = stats_.decode_tokens - before.decode_tokens;
  res.stats.prefill_seconds = stats_.prefill_seconds - before.prefill_seconds;
  res.stats.decode_seconds = stats_.decode_seconds - before.decode_seconds;
  res.stats.passes = stats_.passes - before.passes;
  res.stats.overlapped = stats_.overlapped - before.overlapped;
  return res;
}

std::vector<float> Engine::prefill_logits(std::span<const int32_t> ids) {
  const int64_t V = config().vocab_size, chunk = opts_.cache.chunked_prefill_size;
  for (int32_t id : ids) check(id >= 0 && id < V, "prompt token id {} is outside the vocabulary of {}", id, V);
  CacheEntry e;
  if (!ids.empty()) check(cache_->allocate(e), "prefill_logits: no free state slot");
  std::vector<float> logits;
  size_t done = 0;
  for (;;) {
    const bool more = done < ids.size();
    if (comm_ ? !comm_->all_reduce_or(more) : !more) break;
    std::vector<ModelRunner::Entry> entries;
    const int64_t n = std::min<int64_t>(chunk, int64_t(ids.size() - done));
    if (more) {
      if (!cache_->append(e, {.rows = n})) {
        cache_->release(e);
        fail("prefill_logits: a prompt of {} tokens does not fit the cache of {} rows", ids.size(),
             cache_->total_blocks() * cache_->block_size());
      }
      entries.push_back({&e, ids.subspan(done, size_t(n)), ModelRunner::Logits::all});
    }
    const ModelRunner::Result r = runner_->forward(entries);
    finish_pass(trunk_out_, trunk_ep_.get(), 0, r.hidden.dim(0));
    ++stats_.passes;
    if (more) {
      logits.resize(size_t((done + size_t(n)) * V));
      backend_->download(r.logits, logits.data() + done * V);
      done += size_t(n);
    }
  }
  cache_->release(e);
  return logits;
}

}  // namespace ballast::runtime

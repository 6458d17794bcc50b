#include "ballast/runtime/engine.h"

#include <algorithm>
#include <chrono>

#include "ballast/core/error.h"
#include "ballast/eplb/load.h"
#include "ballast/runtime/sampler.h"

namespace ballast::runtime {

namespace {
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// --init-expert-location: "trivial", or a JSON file holding physical_to_logical_map [L][P]
// (used as is) or logical_count [L][E] (balanced from, with the domain's planner settings).
eplb::Placement initial_placement(const std::string& spec, int layers, int experts, int physical, int ranks,
                                  const moe::DomainOptions& opts) {
  if (spec.empty() || spec == "trivial") return eplb::Placement::trivial(layers, experts, physical, ranks);
  const std::string text = eplb::read_text_file(spec);
  eplb::Placement p;
  if (text.find("physical_to_logical_map") != std::string::npos) {
    p = eplb::placement_from_json_text(text, ranks, spec);
  } else {
    p = eplb::plan(eplb::load_from_json_text(text, spec), moe::plan_options(opts, ranks, physical - experts));
  }
  check(p.layers == layers && p.logical == experts && p.physical == physical,
        "{}: placement is {} layers x {} experts x {} slots, the model needs {} x {} x {}", spec, p.layers, p.logical,
        p.physical, layers, experts, physical);
  return p;
}
}  // namespace

Engine::Engine(int threads, io::Checkpoint ckpt, dist::Communicator* comm)
    : pool_(threads), ops_(&pool_), ckpt_(std::move(ckpt)), comm_(comm) {}

std::unique_ptr<Engine> Engine::load(const std::filesystem::path& model_dir, const EngineOptions& opts) {
  model::ModelConfig cfg = model::load_model_config(model_dir);
  io::Checkpoint ckpt = io::Checkpoint::open(model_dir);
  if (opts.load_progress) ckpt.prefault(opts.load_progress);
  std::unique_ptr<Engine> e(new Engine(opts.threads, std::move(ckpt), opts.comm));
  model::ModelWeights w = model::bind_weights(cfg, e->ckpt_);
  moe::MoeRunner* runner = &e->local_moe_;
  e->model_ = std::make_unique<model::Model>(std::move(cfg), std::move(w), e->ops_, *runner);
  if (opts.comm) e->setup_expert_parallel(opts);
  return e;
}

Engine::Domain Engine::make_domain(const std::string& name, std::span<const model::MoeWeights* const> layers,
                                   eplb::Placement initial, const moe::DomainOptions& opts, const Logger& log) {
  Domain d;
  d.domain = std::make_unique<moe::ExpertDomain>(name, std::move(initial), opts);
  const int K = d.domain->placement.slots_per_rank(), me = comm_->rank();
  const auto& e0 = layers[0]->experts[0];
  d.slots = std::make_unique<moe::SlotStore>(int(layers.size()), K, e0.intermediate(),
                                             int64_t(config().hidden_size), e0.gate.dtype());
  for (int l = 0; l < int(layers.size()); ++l)
    for (int s = 0; s < K; ++s)
      d.slots->fill(l, s, layers[size_t(l)]->experts[size_t(d.domain->placement.layer(l)[me * K + s])]);
  d.runner = std::make_unique<moe::ExpertParallelRunner>(*d.domain, *d.slots, *comm_);
  d.rebalancer = std::make_unique<moe::Rebalancer>(*d.domain, *d.slots, *comm_, log);
  return d;
}

void Engine::setup_expert_parallel(const EngineOptions& opts) {
  const auto& cfg = model_->config();
  const auto& w = model_->weights();
  const int G = comm_->size(), E = cfg.num_experts;
  auto slots_for = [&](const moe::DomainOptions& o, const char* what) {
    const int P = E + o.redundant;
    check(o.redundant >= 0 && P % G == 0, "{}: {} experts + {} redundant slots are not divisible by {} ranks", what,
          E, o.redundant, G);
    return P;
  };
  std::vector<const model::MoeWeights*> trunk_layers;
  for (const auto& l : w.layers)
    if (l.ffn == model::FfnType::Moe) trunk_layers.push_back(&l.moe);
  if (!trunk_layers.empty()) {
    const int P = slots_for(opts.ep.trunk, "--ep-num-redundant-experts");
    const int L = int(trunk_layers.size());
    trunk_ = make_domain("trunk", trunk_layers,
                         initial_placement(opts.ep.init_expert_location, L, E, P, G, opts.ep.trunk), opts.ep.trunk,
                         opts.log);
    model_->set_trunk_moe(*trunk_.runner);
  }
  mtp_experts_ = opts.ep.mtp_experts;
  if (w.mtp && w.mtp->layers[0].ffn == model::FfnType::Moe) {
    std::vector<const model::MoeWeights*> mtp_layers{&w.mtp->layers[0].moe};
    moe::DomainOptions o = opts.ep.mtp.value_or(opts.ep.trunk);
    if (mtp_experts_ == MtpExperts::sglang) {
      // SGLang after its fix: the draft layer has no dispatch table (slot = logical expert) and
      // is never rebalanced.
      o.redundant = 0;
      o.rebalance.enabled = false;
    }
    const int P = slots_for(o, "MTP expert slots");
    mtp_ = make_domain("mtp", mtp_layers, eplb::Placement::trivial(1, E, P, G), o, opts.log);
    model_->set_mtp_moe(*mtp_.runner);
  }
}

model::ForwardResult Engine::forward(std::span<const model::SeqChunk> chunks) {
  model::ForwardResult r = model_->forward(chunks);
  if (trunk_.rebalancer) trunk_.rebalancer->after_pass();
  return r;
}

model::ForwardResult Engine::mtp_forward(std::span<const model::MtpChunk> chunks) {
  std::optional<eplb::Recorder::PauseGuard> paused;
  if (mtp_experts_ == MtpExperts::sglang && mtp_.domain) paused.emplace(mtp_.domain->recorder.pause());
  model::ForwardResult r = model_->mtp_forward(chunks);
  if (mtp_.rebalancer) mtp_.rebalancer->after_pass();
  return r;
}

GenerationResult Engine::generate(const std::vector<std::vector<int32_t>>& prompts, int max_new_tokens,
                                  std::span<const int32_t> stop_ids, const SamplingParams& sampling) {
  GenerationResult res;
  const size_t n = prompts.size();
  res.outputs.resize(n);
  check(max_new_tokens > 0, "max_new_tokens must be positive");
  const int64_t V = config().vocab_size;
  std::vector<model::SequenceState> states;
  for (const auto& p : prompts) {
    check(!p.empty(), "empty prompt");
    states.push_back(model_->new_sequence(int64_t(p.size()) + max_new_tokens));
  }
  auto is_stop = [&](int32_t id) { return std::find(stop_ids.begin(), stop_ids.end(), id) != stop_ids.end(); };
  std::vector<bool> done(n, false);
  std::vector<int32_t> last(n);
  std::vector<float> logits;
  std::vector<std::mt19937_64> rng;
  for (size_t i = 0; i < n; ++i) rng.push_back(sequence_rng(sampling, i));

  // Takes the greedy token of every sequence that ran in `r` (live[j] is the j-th chunk's sequence).
  auto take = [&](const model::ForwardResult& r, const std::vector<size_t>& live) {
    logits.resize(size_t(r.logits.numel()));
    ops_.to_host(r.logits, logits.data());
    for (size_t j = 0; j < live.size(); ++j) {
      const size_t i = live[j];
      const auto row = std::span<const float>(logits).subspan(size_t(r.first_row[j] * V), size_t(V));
      last[i] = sampling.greedy() ? argmax(row) : sample(distribution(row, sampling), rng[i]);
      res.outputs[i].push_back(last[i]);
      done[i] = is_stop(last[i]) || int(res.outputs[i].size()) >= max_new_tokens;
    }
  };

  std::vector<model::SeqChunk> chunks;
  std::vector<size_t> live;
  for (size_t i = 0; i < n; ++i) {
    chunks.push_back({&states[i], prompts[i], false});
    live.push_back(i);
    res.stats.prefill_tokens += int64_t(prompts[i].size());
  }
  auto t0 = std::chrono::steady_clock::now();
  take(forward(chunks), live);
  ++res.stats.passes;
  res.stats.prefill_seconds = seconds_since(t0);

  t0 = std::chrono::steady_clock::now();
  for (;;) {
    chunks.clear();
    live.clear();
    for (size_t i = 0; i < n; ++i)
      if (!done[i]) {
        chunks.push_back({&states[i], std::span<const int32_t>(&last[i], 1), false});
        live.push_back(i);
      }
    // Under EP a rank with nothing left still takes part in the passes of the others.
    if (!any_rank(!live.empty())) break;
    take(forward(chunks), live);
    ++res.stats.passes;
    res.stats.decode_tokens += int64_t(live.size());
  }
  res.stats.decode_seconds = seconds_since(t0);
  return res;
}

std::vector<float> Engine::prefill_logits(std::span<const int32_t> ids) {
  model::SequenceState st = model_->new_sequence(int64_t(ids.size()));
  model::SeqChunk c{&st, ids, true};
  model::ForwardResult r = forward(std::span<const model::SeqChunk>(&c, 1));
  std::vector<float> out(static_cast<size_t>(r.logits.numel()));
  ops_.to_host(r.logits, out.data());
  return out;
}

}  // namespace ballast::runtime

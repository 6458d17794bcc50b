#include "ballast/runtime/engine.h"

#include <algorithm>
#include <chrono>

#include "ballast/core/error.h"
#include "ballast/runtime/sampler.h"

namespace ballast::runtime {

namespace {
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

Engine::Engine(int threads, io::Checkpoint ckpt) : pool_(threads), ops_(&pool_), ckpt_(std::move(ckpt)) {}

std::unique_ptr<Engine> Engine::load(const std::filesystem::path& model_dir, const EngineOptions& opts) {
  model::ModelConfig cfg = model::load_model_config(model_dir);
  io::Checkpoint ckpt = io::Checkpoint::open(model_dir);
  if (opts.load_progress) ckpt.prefault(opts.load_progress);
  std::unique_ptr<Engine> e(new Engine(opts.threads, std::move(ckpt)));
  model::ModelWeights w = model::bind_weights(cfg, e->ckpt_);
  e->model_ = std::make_unique<model::Model>(std::move(cfg), std::move(w), e->ops_, e->local_moe_);
  return e;
}

GenerationResult Engine::generate_greedy(const std::vector<std::vector<int32_t>>& prompts, int max_new_tokens,
                                         std::span<const int32_t> stop_ids) {
  GenerationResult res;
  const size_t n = prompts.size();
  res.outputs.resize(n);
  if (n == 0 || max_new_tokens <= 0) return res;
  const int64_t V = config().vocab_size;
  std::vector<model::SequenceState> states;
  for (const auto& p : prompts) {
    check(!p.empty(), "empty prompt");
    states.push_back(model_->new_sequence(int64_t(p.size()) + max_new_tokens));
  }
  auto is_stop = [&](int32_t id) { return std::find(stop_ids.begin(), stop_ids.end(), id) != stop_ids.end(); };

  std::vector<model::SeqChunk> chunks;
  for (size_t i = 0; i < n; ++i) chunks.push_back({&states[i], prompts[i], false});
  auto t0 = std::chrono::steady_clock::now();
  model::ForwardResult r = model_->forward(chunks);
  res.stats.prefill_seconds = seconds_since(t0);
  for (auto& p : prompts) res.stats.prefill_tokens += int64_t(p.size());

  std::vector<float> logits(size_t(r.logits.numel()));
  ops_.to_host(r.logits, logits.data());
  std::vector<bool> done(n, false);
  std::vector<int32_t> last(n);
  for (size_t i = 0; i < n; ++i) {
    last[i] = argmax(std::span<const float>(logits).subspan(size_t(r.first_row[i] * V), size_t(V)));
    res.outputs[i].push_back(last[i]);
    done[i] = is_stop(last[i]) || max_new_tokens == 1;
  }

  t0 = std::chrono::steady_clock::now();
  for (int step = 1; step < max_new_tokens; ++step) {
    chunks.clear();
    std::vector<size_t> live;
    for (size_t i = 0; i < n; ++i)
      if (!done[i]) {
        chunks.push_back({&states[i], std::span<const int32_t>(&last[i], 1), false});
        live.push_back(i);
      }
    if (live.empty()) break;
    r = model_->forward(chunks);
    res.stats.decode_tokens += int64_t(live.size());
    logits.resize(size_t(r.logits.numel()));
    ops_.to_host(r.logits, logits.data());
    for (size_t j = 0; j < live.size(); ++j) {
      const size_t i = live[j];
      last[i] = argmax(std::span<const float>(logits).subspan(size_t(r.first_row[j] * V), size_t(V)));
      res.outputs[i].push_back(last[i]);
      done[i] = is_stop(last[i]) || int(res.outputs[i].size()) >= max_new_tokens;
    }
  }
  res.stats.decode_seconds = seconds_since(t0);
  return res;
}

std::vector<float> Engine::prefill_logits(std::span<const int32_t> ids) {
  model::SequenceState st = model_->new_sequence(int64_t(ids.size()));
  model::SeqChunk c{&st, ids, true};
  model::ForwardResult r = model_->forward(std::span<const model::SeqChunk>(&c, 1));
  std::vector<float> out(size_t(r.logits.numel()));
  ops_.to_host(r.logits, out.data());
  return out;
}

}  // namespace ballast::runtime

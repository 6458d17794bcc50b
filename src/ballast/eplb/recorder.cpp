#include "ballast/eplb/recorder.h"

#include "ballast/core/error.h"

namespace ballast::eplb {

RecorderMode parse_recorder_mode(const std::string& name) {
  if (name == "stat") return RecorderMode::stat;
  if (name == "per_pass") return RecorderMode::per_pass;
  if (name == "per_token") return RecorderMode::per_token;
  fail("unknown recorder mode '{}' (expected stat, per_pass or per_token)", name);
}

Recorder::Recorder(int layers, int physical, RecorderMode mode, int window)
    : layers_(layers), physical_(physical), window_(window), mode_(mode) {
  check(layers > 0 && physical > 0, "recorder: bad shape {} layers x {} slots", layers, physical);
  check(window > 0, "recorder: window must be >= 1 pass, got {}", window);
}

void Recorder::start() { recording_.store(true); }
void Recorder::stop() { recording_.store(false); }

void Recorder::reset() {
  std::lock_guard lock(mu_);
  ring_.clear();
  ring_tokens_.clear();
}

void Recorder::end_pass(const Placement& pl, std::span<const int32_t> counts, std::vector<std::vector<int32_t>> tokens) {
  std::lock_guard lock(mu_);
  check(pl.layers == layers_ && pl.physical == physical_,
        "recorder: placement is {} layers x {} slots, the recorder {} x {}", pl.layers, pl.physical, layers_,
        physical_);
  check(counts.size() == size_t(layers_) * physical_, "recorder: {} slot counts, expected {} layers x {} slots",
        counts.size(), layers_, physical_);
  if (!recording_.load()) return;
  if (experts_ < 0) experts_ = pl.logical;
  check(pl.logical == experts_, "recorder: placement has {} logical experts, earlier passes {}", pl.logical, experts_);
  const bool paused = paused_.load() > 0;
  std::vector<int32_t> logical(size_t(layers_) * pl.logical, 0);
  for (int l = 0; l < layers_ && !paused; ++l) {
    auto row = pl.layer(l);
    for (int p = 0; p < physical_; ++p) {
      const int32_t c = counts[size_t(l) * physical_ + p];
      check(c >= 0, "recorder: negative count {} for slot {} of layer {}", c, p, l);
      logical[size_t(l) * pl.logical + row[p]] += c;
    }
  }
  ring_.push_back(std::move(logical));
  if (mode_ == RecorderMode::per_token) {
    if (paused || tokens.empty()) tokens.assign(size_t(layers_), {});
    check(tokens.size() == size_t(layers_), "recorder: token ids for {} layers, expected {}", tokens.size(), layers_);
    for (const auto& layer : tokens)
      for (int32_t p : layer) check(p >= 0 && p < physical_, "recorder: slot id {} outside [0, {})", p, physical_);
    ring_tokens_.push_back(std::move(tokens));
  }
  while (int(ring_.size()) > window_) ring_.pop_front();
  while (int(ring_tokens_.size()) > window_) ring_tokens_.pop_front();
}

int Recorder::passes() const {
  std::lock_guard lock(mu_);
  return int(ring_.size());
}

LoadTrace Recorder::dump_window() const {
  std::lock_guard lock(mu_);
  int E = std::max(experts_, 1);
  LoadTrace t(int(ring_.size()), layers_, E);
  for (size_t i = 0; i < ring_.size(); ++i)
    for (size_t j = 0; j < ring_[i].size(); ++j) t.count[i * size_t(layers_) * E + j] = ring_[i][j];
  return t;
}

LoadTrace Recorder::dump() const {
  LoadTrace w = dump_window();
  if (mode_ != RecorderMode::stat) return w;
  if (w.passes == 0) return LoadTrace(1, layers_, w.experts);
  return w.sum();
}

std::vector<std::vector<std::vector<int32_t>>> Recorder::dump_tokens() const {
  std::lock_guard lock(mu_);
  return {ring_tokens_.begin(), ring_tokens_.end()};
}

std::string Recorder::dump_json() const {
  LoadTrace t = dump();
  return load_to_json_text(t, mode_ == RecorderMode::stat);
}

}  // namespace ballast::eplb

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
  open_.reset(new std::atomic<int64_t>[size_t(layers) * physical]);
  for (size_t i = 0; i < size_t(layers) * physical; ++i) open_[i].store(0);
  open_tokens_.resize(layers);
}

void Recorder::start() { recording_.store(true); }
void Recorder::stop() { recording_.store(false); }

void Recorder::reset() {
  std::lock_guard lock(mu_);
  for (size_t i = 0; i < size_t(layers_) * physical_; ++i) open_[i].store(0);
  for (auto& t : open_tokens_) t.clear();
  ring_.clear();
  ring_tokens_.clear();
}

void Recorder::record_slot_counts(int layer, std::span<const int64_t> counts) {
  if (!active()) return;
  check(layer >= 0 && layer < layers_, "recorder: layer {} outside [0, {})", layer, layers_);
  check(int(counts.size()) == physical_, "recorder: {} slot counts, expected {}", counts.size(), physical_);
  for (int p = 0; p < physical_; ++p) {
    check(counts[p] >= 0, "recorder: negative count {} for slot {}", counts[p], p);
    if (counts[p]) open_[size_t(layer) * physical_ + p].fetch_add(counts[p], std::memory_order_relaxed);
  }
}

void Recorder::record_topk(int layer, std::span<const int32_t> ids, int k) {
  if (!active()) return;
  check(layer >= 0 && layer < layers_, "recorder: layer {} outside [0, {})", layer, layers_);
  check(k > 0 && ids.size() % size_t(k) == 0, "recorder: {} ids are not a whole number of top-{} rows", ids.size(), k);
  for (int32_t p : ids) {
    check(p >= 0 && p < physical_, "recorder: slot id {} outside [0, {})", p, physical_);
    open_[size_t(layer) * physical_ + p].fetch_add(1, std::memory_order_relaxed);
  }
  if (mode_ == RecorderMode::per_token) {
    std::lock_guard lock(mu_);
    auto& v = open_tokens_[layer];
    v.insert(v.end(), ids.begin(), ids.end());
  }
}

void Recorder::end_pass(const Placement& pl) {
  std::lock_guard lock(mu_);
  check(pl.layers == layers_ && pl.physical == physical_,
        "recorder: placement is {} layers x {} slots, the recorder {} x {}", pl.layers, pl.physical, layers_,
        physical_);
  std::vector<int32_t> logical(size_t(layers_) * pl.logical, 0);
  for (int l = 0; l < layers_; ++l) {
    auto row = pl.layer(l);
    for (int p = 0; p < physical_; ++p) {
      int64_t c = open_[size_t(l) * physical_ + p].exchange(0);
      logical[size_t(l) * pl.logical + row[p]] += int32_t(c);
    }
  }
  std::vector<std::vector<int32_t>> toks(layers_);
  for (int l = 0; l < layers_; ++l) toks[l].swap(open_tokens_[l]);
  if (!recording_.load()) return;
  if (experts_ < 0) experts_ = pl.logical;
  check(pl.logical == experts_, "recorder: placement has {} logical experts, earlier passes {}", pl.logical, experts_);
  ring_.push_back(std::move(logical));
  if (mode_ == RecorderMode::per_token) ring_tokens_.push_back(std::move(toks));
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

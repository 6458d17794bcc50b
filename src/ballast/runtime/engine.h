#pragma once
// The engine: a loaded model with its backend, and batched greedy generation over it.
#include <filesystem>
#include <functional>
#include <memory>
#include <vector>

#include "ballast/core/thread_pool.h"
#include "ballast/io/checkpoint.h"
#include "ballast/kernels/cpu/cpu_ops.h"
#include "ballast/model/model.h"
#include "ballast/moe/moe_runner.h"

namespace ballast::runtime {

struct EngineOptions {
  int threads = 0;  // 0 = all cores
  std::function<void(uint64_t done, uint64_t total)> load_progress;  // while paging weights in
};

struct GenerationStats {
  int64_t prefill_tokens = 0, decode_tokens = 0;
  double prefill_seconds = 0, decode_seconds = 0;
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

  // Greedy decoding of all prompts as one batch: one prefill pass, then one decode pass per step.
  // A sequence stops after max_new_tokens or after emitting any id in stop_ids.
  GenerationResult generate_greedy(const std::vector<std::vector<int32_t>>& prompts, int max_new_tokens,
                                   std::span<const int32_t> stop_ids = {});

  // Logits [T, V] of one prefill pass over `ids`.
  std::vector<float> prefill_logits(std::span<const int32_t> ids);

 private:
  Engine(int threads, io::Checkpoint ckpt);

  ThreadPool pool_;
  kernels::CpuOps ops_;
  io::Checkpoint ckpt_;
  moe::LocalMoeRunner local_moe_;
  std::unique_ptr<model::Model> model_;
};

}  // namespace ballast::runtime

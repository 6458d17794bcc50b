#pragma once
// Arguments shared by the commands that load a model.
#include <filesystem>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "ballast/runtime/engine.h"

namespace ballast::cli {

// The shipped default model: $BALLAST_MODEL, or models/default above the binary (a build folder
// in the repository) or above the working directory, or share/ballast/models/default above the
// binary (installed).
std::filesystem::path default_model_dir();

// "1,2,3" -> {1, 2, 3}; errors name the offending item.
std::vector<int32_t> parse_ids(const std::string& csv);
// One comma-separated id list per non-empty line.
std::vector<std::vector<int32_t>> read_prompts_file(const std::filesystem::path& path);

// Cache and batch limits (SGLang's flag names); 0 leaves the engine's default, or the command's.
struct CacheArgs {
  int page_size = 16;
  int64_t max_total_tokens = 0;
  int max_running_requests = 0;
  int chunked_prefill_size = 2048;
  int64_t context_length = 0;
  double mem_fraction_static = 0;  // 0: not given
};
void add_cache_options(CLI::App* cmd, CacheArgs& a);
// The options, with what a command knows of its own work for what the flags leave at 0: room for
// `prompts` of which `per_rank` run on one rank, each growing by `new_tokens` (and `extra` rows),
// within serving's bounds (kDefaultMaxRunning sequences, kDefaultMaxTotalTokens rows), and a context
// of the model's `max_position_embeddings` (0: not given). A prompt that cannot fit them is refused
// here, naming the flag to raise; the others wait for room.
// With --mem-fraction-static the engine sizes the KV rows from the device's memory once the
// weights are in (runtime/memory_budget.h); the prompts are then checked by the engine.
constexpr int kDefaultMaxRunning = 64;
constexpr int64_t kDefaultMaxTotalTokens = int64_t(1) << 16;
runtime::CacheOptions to_cache_options(const CacheArgs& a, const std::vector<std::vector<int32_t>>& prompts,
                                       size_t per_rank, int new_tokens, int extra, int max_position_embeddings);

// Where a command runs: --device cuda | cpu (default: cuda when this build has the CUDA backend
// and a GPU is visible, else cpu), and how a GPU multiplies matrices: --matmul-precision bf16
// (tensor cores, the default) | fp32 (equal to the CPU reference).
struct DeviceArgs {
  std::string device = "auto";
  std::string matmul_precision = "bf16";
  std::string cpu_weights = "copy";  // copy | mmap (CpuOptions::copy_weights)
  std::string quantization = "none";  // none | fp8 (EngineOptions::quantize_fp8)
};
void add_device_option(CLI::App* cmd, DeviceArgs& device);
// The backend for `device` ("auto", "cuda" or "cpu"): the CPU with `threads` threads (0 = all
// cores), or CUDA device `gpu`. Errors say why CUDA cannot be had.
std::unique_ptr<kernels::Backend> make_backend(const DeviceArgs& device, int threads, int gpu = 0);
// The CUDA devices make_backend may pick from: 0 when it builds a CPU backend (--device cpu, or
// auto without a GPU) or this build has no CUDA.
int cuda_devices_for(const DeviceArgs& device);

// Builds the backend and loads the engine on it, with a progress bar while the weights are read.
std::unique_ptr<runtime::Engine> load_engine(const std::filesystem::path& dir, const DeviceArgs& device, int threads,
                                             runtime::EngineOptions opts = {}, bool progress = true, int gpu = 0);

}  // namespace ballast::cli

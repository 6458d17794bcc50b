#include "ballast/cli/model_args.h"

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <optional>

#include "ballast/cli/option_checks.h"
#include "ballast/core/error.h"
#include "ballast/core/progress.h"
#include "ballast/kernels/cpu/cpu_backend.h"
#ifdef BALLAST_HAS_CUDA
#include "ballast/kernels/cuda/cuda_backend.h"
#endif

namespace ballast::cli {

std::filesystem::path default_model_dir() {
  if (const char* env = std::getenv("BALLAST_MODEL")) return env;
  // models/default in a folder above the binary (a build folder in the repository), share/ballast
  // above it (after cmake --install), or above the working directory (the repository's root with
  // a build folder elsewhere).
  auto found = [](std::filesystem::path dir) -> std::optional<std::filesystem::path> {
    for (; dir.has_parent_path(); dir = dir.parent_path()) {
      for (auto candidate : {dir / "models" / "default", dir / "share" / "ballast" / "models" / "default"})
        if (std::filesystem::exists(candidate / "config.json")) return std::filesystem::canonical(candidate);
      if (dir == dir.parent_path()) break;
    }
    return std::nullopt;
  };
  std::error_code ec;
  const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec)
    if (auto dir = found(exe.parent_path())) return *dir;
  if (auto dir = found(std::filesystem::current_path(ec))) return *dir;
  fail("no --model given and no default model found (models/default above the binary or the working directory, "
       "share/ballast/models/default after cmake --install, or $BALLAST_MODEL)");
}

std::vector<int32_t> parse_ids(const std::string& csv) {
  std::vector<int32_t> ids;
  size_t start = 0;
  while (start <= csv.size()) {
    size_t end = csv.find(',', start);
    if (end == std::string::npos) end = csv.size();
    std::string item = csv.substr(start, end - start);
    item.erase(0, item.find_first_not_of(" \t\r"));
    item.erase(item.find_last_not_of(" \t\r") + 1);
    if (!item.empty()) {
      char* rest = nullptr;
      long v = std::strtol(item.c_str(), &rest, 10);
      check(rest && *rest == '\0' && v >= 0 && v <= INT32_MAX, "invalid token id '{}'", item);
      ids.push_back(int32_t(v));
    }
    start = end + 1;
  }
  return ids;
}

std::vector<std::vector<int32_t>> read_prompts_file(const std::filesystem::path& path) {
  std::ifstream in(path);
  check(bool(in), "cannot open prompts file {}", path.string());
  std::vector<std::vector<int32_t>> prompts;
  std::string line;
  int lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    try {
      auto ids = parse_ids(line);
      if (!ids.empty()) prompts.push_back(std::move(ids));
    } catch (const Error& e) {
      fail("{}:{}: {}", path.string(), lineno, e.what());
    }
  }
  check(!prompts.empty(), "prompts file {} holds no prompt", path.string());
  return prompts;
}

void add_cache_options(CLI::App* c, CacheArgs& a) {
  c->add_option("--page-size", a.page_size, "Cache rows per KV block")->check(CLI::Range(1, 1 << 12));
  auto* rows = c->add_option("--max-total-tokens", a.max_total_tokens,
                             "KV cache rows per rank (default: what the prompts need)")
                   ->check(CLI::Range(int64_t(1), int64_t(1) << 40));
  c->add_option("--mem-fraction-static", a.mem_fraction_static,
                "Fraction of the device's memory for the weights and the KV cache together: the cache gets what "
                "it leaves once the weights are in (the rest stays free for the passes)")
      ->check(finite_range(0.01, 1.0))
      ->excludes(rows);
  c->add_option("--max-running-requests", a.max_running_requests, "Sequences running at once per rank")
      ->check(CLI::Range(1, 1 << 20));
  c->add_option("--chunked-prefill-size", a.chunked_prefill_size, "Rows per forward pass (prefill is chunked to it)")
      ->check(CLI::Range(1, 1 << 24));
  c->add_option("--context-length", a.context_length, "Longest sequence, prompt and output (default: the cache)")
      ->check(CLI::Range(int64_t(1), int64_t(1) << 40));
}

runtime::CacheOptions to_cache_options(const CacheArgs& a, const std::vector<std::vector<int32_t>>& prompts,
                                       size_t per_rank, int new_tokens, int extra, int max_position_embeddings) {
  runtime::CacheOptions o;
  o.page_size = a.page_size;
  o.chunked_prefill_size = a.chunked_prefill_size;
  o.max_running_requests = a.max_running_requests > 0 ? a.max_running_requests
                                                      : int(std::clamp<size_t>(per_rank, 1, kDefaultMaxRunning));
  if (a.mem_fraction_static > 0) {
    o.mem_fraction_static = a.mem_fraction_static;
    o.context_length = a.context_length;  // 0: the model's, within the pool the engine sizes
    return o;
  }
  int64_t rows = 0;
  for (const auto& p : prompts)
    rows += (int64_t(p.size()) + new_tokens + extra + a.page_size - 1) / a.page_size * a.page_size;
  o.max_total_tokens =
      a.max_total_tokens > 0 ? a.max_total_tokens : std::clamp<int64_t>(rows, 1, kDefaultMaxTotalTokens);
  o.context_length = a.context_length;
  if (o.context_length == 0 && max_position_embeddings > 0)
    o.context_length = std::min<int64_t>(max_position_embeddings, o.max_total_tokens);
  for (size_t i = 0; i < prompts.size(); ++i) {
    const int64_t need = int64_t(prompts[i].size()) + new_tokens;
    check(need + extra <= o.max_total_tokens,
          "prompt {}: {} tokens and {} new ones need {} cache rows, more than --max-total-tokens {}{}", i,
          prompts[i].size(), new_tokens, need + extra, o.max_total_tokens,
          a.max_total_tokens > 0 ? "" : " (the default)");
    check(o.context_length == 0 || need <= o.context_length,
          "prompt {}: {} tokens and {} new ones exceed the context length of {} ({})", i, prompts[i].size(),
          new_tokens, o.context_length,
          a.context_length > 0 ? "--context-length" : "the model's max_position_embeddings");
  }
  return o;
}

void add_device_option(CLI::App* c, DeviceArgs& d) {
  c->add_option("--device", d.device, "cuda | cpu (default: cuda when a GPU is visible)")
      ->check(CLI::IsMember({"auto", "cuda", "cpu"}));
  c->add_option("--matmul-precision", d.matmul_precision,
                "CUDA matrix products: bf16 (tensor cores, fp32 accumulation; default) | fp32 (as the CPU reference)")
      ->check(CLI::IsMember({"bf16", "fp32"}));
  c->add_option("--cpu-weights", d.cpu_weights,
                "CPU weights: copy (into the process's memory at load; default, faster to read) | mmap (read in place "
                "from the checkpoint's mapping: no second copy)")
      ->check(CLI::IsMember({"copy", "mmap"}));
  c->add_option("--quantization", d.quantization,
                "none (default) | fp8: a bf16/f16/f32 checkpoint's linear weights quantized at load to FP8 with "
                "128 x 128 block scales, as Qwen's -FP8 releases store them (half the bytes of bf16)")
      ->check(CLI::IsMember({"none", "fp8"}));
}

#ifdef BALLAST_HAS_CUDA
// Whether `d` asks for the CUDA backend: --device cuda, or auto with a GPU visible.
static bool picks_cuda(const DeviceArgs& d) {
  return d.device == "cuda" || (d.device == "auto" && kernels::cuda_available());
}
#endif

int cuda_devices_for(const DeviceArgs& d) {
#ifdef BALLAST_HAS_CUDA
  if (picks_cuda(d)) return kernels::cuda_device_count();
#endif
  (void)d;
  return 0;
}

std::unique_ptr<kernels::Backend> make_backend(const DeviceArgs& d, int threads, int gpu) {
#ifdef BALLAST_HAS_CUDA
  if (picks_cuda(d))
    return std::make_unique<kernels::CudaBackend>(gpu, kernels::CudaOptions{.bf16_matmul = d.matmul_precision == "bf16"});
#else
  check(d.device != "cuda", "--device cuda: this build has no CUDA backend (nvcc was not found when it was built)");
#endif
  return std::make_unique<kernels::CpuBackend>(threads,
                                               kernels::CpuOptions{.copy_weights = d.cpu_weights == "copy"});
}

std::unique_ptr<runtime::Engine> load_engine(const std::filesystem::path& dir, const DeviceArgs& device, int threads,
                                             runtime::EngineOptions opts, bool progress, int gpu) {
  std::optional<ProgressBar> bar, upload, slots;  // created once the total size is known
  std::string domain;                            // whose slots `slots` shows
  if (progress) {
    opts.load_progress = [&bar](uint64_t done, uint64_t total) {
      if (!bar) bar.emplace("loading weights", total);
      bar->update(done);
    };
    opts.upload_progress = [&bar, &upload](uint64_t done, uint64_t total) {
      bar.reset();  // paging in is over
      if (!upload) upload.emplace("uploading weights", total);
      upload->update(done);
    };
    opts.slot_progress = [&](const std::string& d, uint64_t done, uint64_t total) {
      bar.reset();
      upload.reset();  // the model's weights are in
      if (!slots || d != domain) slots.emplace(fmt::format("filling {} expert slots", d), total), domain = d;
      slots->update(done);
    };
  }
  opts.quantize_fp8 = device.quantization == "fp8";
  auto engine = runtime::Engine::load(dir, make_backend(device, threads, gpu), opts);
  if (bar) bar->finish();
  if (upload) upload->finish();
  if (slots) slots->finish();
  return engine;
}

}  // namespace ballast::cli

#pragma once
// Helpers shared by the runtime tests: the committed fixtures and how to compare against them.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "ballast/io/safetensors.h"
#include "ballast/kernels/cpu/cpu_backend.h"
#include "ballast/runtime/engine.h"

namespace ballast::test {

inline const std::filesystem::path kFixtures = BALLAST_FIXTURES_DIR;
inline const std::filesystem::path kDemoModel = kFixtures.parent_path().parent_path() / "models" / "default";

// An engine on a CPU backend of `threads` threads.
inline std::unique_ptr<runtime::Engine> load_engine(const std::filesystem::path& dir, int threads,
                                                    const runtime::EngineOptions& opts = {}) {
  return runtime::Engine::load(dir, std::make_unique<kernels::CpuBackend>(threads), opts);
}

// A tensor's contents on the host.
template <typename T = float>
std::vector<T> download(kernels::Backend& backend, const Tensor& t) {
  std::vector<T> v(size_t(t.numel()));
  backend.download(t, v.data());
  return v;
}

// Fixture directories that hold `marker` (e.g. reference.safetensors), sorted.
inline std::vector<std::string> fixtures_with(const std::string& marker) {
  std::vector<std::string> names;
  for (auto& e : std::filesystem::directory_iterator(kFixtures))
    if (std::filesystem::exists(e.path() / marker)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

template <typename T>
std::vector<T> values(const Tensor& t) {
  return std::vector<T>(t.data<T>(), t.data<T>() + t.numel());
}

// An id tensor (I32 or I64) as int32 ids.
inline std::vector<int32_t> ids(const io::SafetensorsFile& f, const std::string& name) {
  const Tensor t = f.get(name);
  if (t.dtype() == DType::I64) {
    std::vector<int32_t> out;
    for (int64_t v : values<int64_t>(t)) out.push_back(int32_t(v));
    return out;
  }
  return values<int32_t>(t);
}

// The fewest redundant slots, at least `at_least`, that make E + R divisible by G.
inline int redundant_for(int experts, int ranks, int at_least = 0) {
  int r = at_least;
  while ((experts + r) % ranks) ++r;
  return r;
}

// max |a - b| / max |b|
inline double rel_max_err(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    num = std::max(num, double(std::fabs(a[i] - b[i])));
    den = std::max(den, double(std::fabs(b[i])));
  }
  return a.size() == b.size() ? num / den : INFINITY;
}

}  // namespace ballast::test

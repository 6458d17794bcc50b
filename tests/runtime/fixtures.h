#pragma once
// Helpers shared by the runtime tests: the committed fixtures and how to compare against them.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>

#include <gtest/gtest.h>
#include <string>
#include <vector>

#include "ballast/io/safetensors.h"
#include "ballast/core/error.h"
#include "ballast/kernels/cpu/cpu_backend.h"
#ifdef BALLAST_HAS_CUDA
#include "ballast/kernels/cuda/cuda_backend.h"
#endif
#include "ballast/dist/thread_world.h"
#include "ballast/runtime/backend_device_queue.h"
#include "ballast/runtime/engine.h"
#include "support/recording_backend.h"

namespace ballast::test {

// $BALLAST_FIXTURES_DIR, where the tests run from another checkout (the GPU machine), else the
// source tree's.
inline std::filesystem::path fixtures_dir() {
  const char* env = std::getenv("BALLAST_FIXTURES_DIR");
  return env && *env ? std::filesystem::path(env) : std::filesystem::path(BALLAST_FIXTURES_DIR);
}
inline const std::filesystem::path kFixtures = fixtures_dir();
inline const std::filesystem::path kDemoModel = kFixtures.parent_path().parent_path() / "models" / "default";

// The backend the engine tests run on: the CPU backend of `threads` threads, or with
// BALLAST_TEST_DEVICE=cuda (in a build with CUDA) the CUDA backend on GPU 0, so that the same
// tests hold the GPU to the same outputs.
inline std::unique_ptr<kernels::Backend> test_backend(int threads) {
  const char* env = std::getenv("BALLAST_TEST_DEVICE");
  const std::string device = env ? env : "cpu";
#ifdef BALLAST_HAS_CUDA
  if (device == "cuda") return std::make_unique<kernels::CudaBackend>(0, kernels::CudaOptions{.bf16_matmul = false});
#endif
  if (device != "cpu") throw Error("BALLAST_TEST_DEVICE=" + device + ": not a device this test build has");
  return std::make_unique<kernels::CpuBackend>(threads);
}

// The test device's backend where it captures graphs (CUDA), else the CPU's recording graphs as CUDA
// does (tests/support/recording_backend.h): graph passes run on either.
inline std::unique_ptr<kernels::Backend> capturing_backend(int threads) {
  std::unique_ptr<kernels::Backend> be = test_backend(threads);
  if (be->can_capture()) return be;
  return std::make_unique<RecordingBackend>(std::move(be));
}

// One rank of a ThreadWorld whose passes can be group graphs as on a GPU: there the test backend
// alone (the engine makes its own plane); on the CPU the recording backend and the thread plane
// moving rows through its device queue. Reset `plane` before the engine goes (its queue is the
// engine's backend's).
struct GraphRank {
  std::unique_ptr<kernels::Backend> backend;
  std::unique_ptr<dist::DataPlane> plane;              // null on a GPU
  const runtime::BackendDeviceQueue* queue = nullptr;  // the plane's, where made here
  dist::DataPlane& data(dist::ThreadWorld& world, int rank) { return plane ? *plane : world.data_plane(rank); }
};
inline GraphRank graph_rank(dist::ThreadWorld& world, int rank, int threads = 1) {
  GraphRank r{test_backend(threads)};
  if (r.backend->can_capture()) return r;
  r.backend = std::make_unique<RecordingBackend>(std::move(r.backend));
  auto queue = std::make_unique<runtime::BackendDeviceQueue>(*r.backend);
  r.queue = queue.get();
  r.plane = world.data_plane(rank).on_device(std::move(queue));
  return r;
}

// An engine on the test backend.
inline std::unique_ptr<runtime::Engine> load_engine(const std::filesystem::path& dir, int threads,
                                                    const runtime::EngineOptions& opts = {}) {
  return runtime::Engine::load(dir, test_backend(threads), opts);
}

// A tensor's contents on the host.
template <typename T = float>
std::vector<T> download(kernels::Backend& backend, const Tensor& t) {
  std::vector<T> v(size_t(t.numel()));
  backend.download(t, v.data());
  return v;
}

// A tensor's bytes on the host.
inline std::vector<std::byte> download_bytes(kernels::Backend& backend, const Tensor& t) {
  std::vector<std::byte> v(t.nbytes());
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

// CudaOps: the mixture-of-experts ops (docs/expert-parallel.md) as CUDA kernels, the CPU backend
// (cpu/cpu_moe.cpp) their reference:
//   topk_softmax   few tokens (decode): a block per token, each warp ranking its experts, the
//                  warps' first k ranked among themselves. Many: one warp per token, the row in
//                  registers: softmax in fp32 (a warp-tree sum), then k rounds of a warp argmax.
//                  Both ties to the lower id.
//   dispatch       static and random: one thread per choice. balanced: one block does the exact
//                  per-pass split of eplb::dispatch_balanced and the hand-out to source ranks
//                  (cuda_moe_support.cuh).
//   histogram      per-block shared counts (few bins) or global atomics.
//   group_by       a stable radix sort (CUB) of (group key, index), the invalid keys last; offsets
//                  by binary search of the sorted keys. Few keys: one block, a stable counting sort.
//   moe_experts    the offsets stay on the device: one block lists row tiles per group (groups of
//                  up to 32 rows (8 on the tensor cores) in small tiles, larger groups in tiles of
//                  64; with few tokens every group in small tiles no taller than the tokens), then
//                  per pass (gate+up writing h = silu(gate x) * up x [N, I] in sorted order into
//                  scratch, then down writing y rows) a weight-streaming kernel for the small tiles
//                  (each weight row read once per tile, warp dot products) and a tiled fp32 SIMT
//                  GEMM for the large ones. Persistent grids sized from the shapes walk the tiles
//                  the device listed. The experts' pointers live in a device table per span
//                  (uploaded when the span's contents change, compared on the host at every call).
//                  With bf16 matrix products (CudaOptions) and BF16 weights, the large tiles run
//                  on the tensor cores instead (WMMA 16x16x16 over bf16 copies of x and h, fp32
//                  accumulation); block-scaled FP8 experts too, their e4m3 values exact in bf16,
//                  each 128-block of k summed apart and added times its scale (FP8 weights, bf16
//                  activations: the FP8 rate is not the limit of this kernel). Small tiles read
//                  FP8 in place, 16 elements a lane-step, times the block's scale. On Hopper (sm_90a)
//                  block-scaled FP8 experts whose sizes are whole 128-blocks take the FP8 tensor
//                  cores instead (x and h quantized per row and 128-block): warp-specialized tiles of
//                  up to 192 rows (experts_fp8_kernel) and mma.sync tiles of up to 8.
//   moe_combine    one thread per output element (4 with float4), choices in order, loaded four
//                  at a time.
//   moe_routed     few tokens (decode) in one kernel: a cluster of 8 blocks a (token, choice, part
//                  of I) computing h, sharing it through distributed shared memory, multiplying
//                  slices of down; the last block of each slice of a token's row adds the choices'
//                  rows into out in order (sm_90, FP8 block-scaled or bf16 experts).
// Index data is checked by the kernels: an entry out of range is skipped (never written through)
// and reported in a fault record in mapped host memory, which the next MoE op throws on the host
// (with BALLAST_CUDA_SYNC_CHECKS=1, every MoE op outside stream capture waits for its kernels and
// throws its own fault at once).
#include <cooperative_groups.h>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>

#include <cuda_fp8.h>
#include <mma.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "ballast/core/hash.h"
#include "ballast/kernels/cuda/cuda_moe_support.cuh"
#include "ballast/kernels/cuda/cuda_ops.h"
#include "ballast/kernels/cuda/cuda_rows_support.cuh"
#include "ballast/kernels/cuda/cuda_support.cuh"
#include "ballast/kernels/cuda/cuda_mma_support.cuh"
#include "ballast/kernels/cuda/cuda_wgmma_support.cuh"
#include "ballast/kernels/op_checks.h"

namespace ballast::kernels {

using cuda::aligned16;
using cuda::blocks_for;
using cuda::cdiv;
using cuda::check_cuda;
using cuda::check_launch;
using cuda::expect_device;
using cuda::launch;
using cuda::load4_after_wait;
using cuda::load_u4_after_wait;
using cuda::load_after_wait;
using cuda::switched_on;
using cuda::mma_e4m3;
using cuda::sigmoidf_;
using cuda::silu_;
using cuda::wait_for_prior_kernels;
using cuda::cp_async16;
using cuda::cp_async_commit;
using cuda::cp_async_wait;
using cuda::fence_async_shared;
using cuda::kWarpgroupMma;
using cuda::sw128_kmajor_desc;
using cuda::swizzled128;
using cuda::wgmma_commit;
using cuda::wgmma_fence;
using cuda::wgmma_wait_all;
namespace cm = cuda::moe;  // fault codes and the balanced dispatch (cuda_moe_support.cuh)
// Weight elements as floats (cuda_rows_support.cuh).
using cuda::rows::f8e4m3;
using cuda::rows::load_words;
using cuda::rows::quantize_rows_b128;
using cuda::rows::round_to_16bit;
using cuda::rows::to_float;
using cuda::rows::unpack_word;
using cuda::rows::unpack_words;
using cuda::rows::Words;

namespace {

using cm::Fault;

// ============================================================================================
// Faults
// ============================================================================================

__device__ void report(Fault* f, int code, long long a, long long b, long long c) {
  if (f == nullptr) return;
  if (atomicCAS(&f->claim, 0, 1) != 0) return;
  f->a = a;
  f->b = b;
  f->c = c;
  __threadfence_system();
  atomicExch(&f->code, code);
  __threadfence_system();
}

std::string describe(int code, long long a, long long b, long long c) {
  switch (code) {
    case cm::kHistogramKey: return fmt::format("histogram: keys[{}] = {} not below {} bins", a, b, c);
    case cm::kDispatchId: return fmt::format("dispatch: ids[{}] = {} not below {}", a, b, c);
    case cm::kDispatchReplicaCount:
      return fmt::format("dispatch: replica_count[{}] = {} not in [1, {}]", a, b, c);
    case cm::kDispatchPlacement: return fmt::format("dispatch: slot {} holds expert {}, outside [0, {})", a, b, c);
    case cm::kDispatchNoReplica: return fmt::format("dispatch: expert {} has no replica", a);
    case cm::kDispatchCounts:
      return a < 0 ? fmt::format("dispatch: counts_by_rank sums to {}, above {}", b, c)
                   : fmt::format("dispatch: counts_by_rank entry {} is {} (negative)", a, b);
    case cm::kDispatchOverflow:
      return fmt::format("dispatch: rank {} routes more tokens to expert {} than counts_by_rank[{}][{}] = {}", a, b, a,
                         b, c);
    case cm::kDispatchUnassigned:
      return fmt::format("dispatch: balanced left {} tokens of expert {} unassigned (rank {})", a, b, c);
    case cm::kDispatchInternal:
      return fmt::format("dispatch: internal error, balanced split infeasible at its own upper bound {} ({} of {})", c,
                         a, b);
    case cm::kGroupByValid: return fmt::format("group_by: valid sums to {} of {} keys", a, b);
    case cm::kExpertsOffsets:
      return fmt::format("moe_experts: group {} spans offsets [{}, {}), decreasing or outside perm", a, b, c);
    case cm::kExpertsPerm: return fmt::format("moe_experts: perm[{}] = {} out of range for x and y", a, b);
    case cm::kExpertsNoWeights: return fmt::format("moe_experts: group {} has {} rows but no weights", a, b);
    case cm::kCombineRow: return fmt::format("moe_combine: rows[{}] = {} not in [0, {})", a, b, c);
    case cm::kOnePassId: return fmt::format("moe_routed: ids[{}] = {} not below {} experts", a, b, c);
    case cm::kOnePassNoWeights: return fmt::format("moe_routed: ids[{}] = {} chooses an expert with no weights", a, b);
    case cm::kRoutedSource:
      return fmt::format("gather_routed: source {}'s counts reach row {}, past the {} rows it holds", a, b, c);
    case cm::kRoutedOut:
      return fmt::format("gather_routed: the rows from source {} reach row {} of out, which holds {}", a, b, c);
    default: return fmt::format("moe: device fault {} ({}, {}, {})", code, a, b, c);
  }
}

bool sync_checks() {
  static const bool on = [] {
    const char* v = std::getenv("BALLAST_CUDA_SYNC_CHECKS");
    return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
  }();
  return on;
}

// ============================================================================================
// State of the MoE ops: the fault record, the device tables of experts, device limits
// ============================================================================================

// One expert as the kernels see it (compared bytewise on the host: no padding).
struct ExpertEntry {
  const void* gate;  // nullptr: no weights (the group must be empty)
  const void* up;
  const void* down;
  const float* s_gate;  // F8_E4M3_B128: the block scales of each (else null)
  const float* s_up;
  const float* s_down;
  int64_t inter;     // I
  int32_t dt_gu;     // DType of gate and up
  int32_t dt_down;   // DType of down
};
static_assert(sizeof(ExpertEntry) == 64, "ExpertEntry must have no padding");

class MoeState {
 public:
  explicit MoeState(Counters& counters) : counters_(counters) {
    void* p = nullptr;
    check_cuda(cudaHostAlloc(&p, sizeof(Fault), cudaHostAllocMapped), "moe: cudaHostAlloc");
    std::memset(p, 0, sizeof(Fault));
    host_fault_ = static_cast<Fault*>(p);
    void* d = nullptr;
    check_cuda(cudaHostGetDevicePointer(&d, p, 0), "moe: cudaHostGetDevicePointer");
    fault = static_cast<Fault*>(d);
  }
  ~MoeState() {
    cudaFree(arrivals_);
    for (auto& [key, t] : tables_) {
      cudaFree(t.dev);
      cudaFreeHost(t.host);
    }
    cudaFreeHost(host_fault_);
  }
  MoeState(const MoeState&) = delete;
  MoeState& operator=(const MoeState&) = delete;

  // Throws the fault a kernel reported (and clears it), if any.
  void raise_pending() {
    volatile Fault* f = host_fault_;
    const int code = f->code;
    if (code == 0) return;
    const long long a = f->a, b = f->b, c = f->c;
    f->code = 0;
    f->claim = 0;
    fail("{} (found on the device)", describe(code, a, b, c));
  }
  // After an op's launches: with sync checks on and the stream not capturing, wait and throw.
  void after(cudaStream_t stream) {
    if (!sync_checks()) return;
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    check_cuda(cudaStreamIsCapturing(stream, &status), "moe: cudaStreamIsCapturing");
    if (status != cudaStreamCaptureStatusNone) return;
    check_cuda(cudaStreamSynchronize(stream), "moe: synchronize");
    raise_pending();
  }

  // The device table of `entries`, the contents of the span at `key`: uploaded at first sight and
  // whenever the contents change; otherwise nothing is allocated or copied.
  const ExpertEntry* experts(const void* key, const std::vector<ExpertEntry>& entries, cudaStream_t stream) {
    const size_t n = entries.size(), bytes = n * sizeof(ExpertEntry);
    auto it = tables_.find({key, n});
    if (it != tables_.end() && std::memcmp(it->second.host, entries.data(), bytes) == 0) return it->second.dev;
    if (it == tables_.end()) {
      Table t;
      void* h = nullptr;
      check_cuda(cudaMallocHost(&h, bytes), "moe_experts: cudaMallocHost");
      t.host = static_cast<ExpertEntry*>(h);
      void* d = nullptr;
      const cudaError_t err = cudaMalloc(&d, bytes);
      if (err != cudaSuccess) cudaFreeHost(h);
      check_cuda(err, "moe_experts: cudaMalloc");
      t.dev = static_cast<ExpertEntry*>(d);
      ++counters_.allocations;
      counters_.bytes_allocated += int64_t(bytes);
      it = tables_.emplace(std::make_pair(key, n), t).first;
    } else {
      // The span now holds other experts: the copy queued from the pinned table must have run
      // before it is rewritten.
      cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
      check_cuda(cudaStreamIsCapturing(stream, &status), "moe_experts: cudaStreamIsCapturing");
      check(status == cudaStreamCaptureStatusNone,
            "moe_experts: the experts' span changed while the stream is being captured");
      check_cuda(cudaStreamSynchronize(stream), "moe_experts: synchronize");
    }
    std::memcpy(it->second.host, entries.data(), bytes);
    check_cuda(cudaMemcpyAsync(it->second.dev, it->second.host, bytes, cudaMemcpyHostToDevice, stream),
               "moe_experts: table upload");
    ++counters_.uploads;
    counters_.bytes_uploaded += int64_t(bytes);
    return it->second.dev;
  }

  // moe_routed's arrival counts, `n` of them, zeros between its launches (each launch leaves them
  // so); allocated and zeroed on `stream` at first need.
  unsigned* arrivals(size_t n, cudaStream_t stream) {
    if (arrivals_ == nullptr) {
      arrivals_ = static_cast<unsigned*>(cuda::device_malloc(n * sizeof(unsigned), "moe_routed: arrival counts"));
      ++counters_.allocations;
      counters_.bytes_allocated += int64_t(n * sizeof(unsigned));
      check_cuda(cudaMemsetAsync(arrivals_, 0, n * sizeof(unsigned), stream), "moe_routed: zeroing arrival counts");
    }
    return arrivals_;
  }

  Fault* fault = nullptr;  // device view of the record
  std::vector<ExpertEntry> staging;  // the entries of a call, reused

 private:
  struct Table {
    ExpertEntry* host = nullptr;  // pinned: the source of the queued copy stays alive
    ExpertEntry* dev = nullptr;
  };
  Counters& counters_;
  Fault* host_fault_ = nullptr;
  unsigned* arrivals_ = nullptr;
  std::map<std::pair<const void*, size_t>, Table> tables_;
};

}  // namespace

void CudaOps::raise_device_faults() {
  if (moe_state_) static_cast<MoeState*>(moe_state_.get())->raise_pending();
}

namespace {

MoeState& moe_state(std::shared_ptr<void>& slot, Counters& counters) {
  if (!slot) slot = std::make_shared<MoeState>(counters);
  return *static_cast<MoeState*>(slot.get());
}

// Carves 256-byte aligned pieces out of one scratch buffer (a first pass with no base measures).
class Carve {
 public:
  explicit Carve(void* base = nullptr) : base_(static_cast<char*>(base)) {}
  template <typename T>
  T* take(size_t n) {
    off_ = (off_ + 255) / 256 * 256;
    T* p = base_ ? reinterpret_cast<T*>(base_ + off_) : nullptr;
    off_ += n * sizeof(T);
    return p;
  }
  size_t size() const { return (off_ + 255) / 256 * 256; }

 private:
  char* base_;
  size_t off_ = 0;
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}


// ============================================================================================
// topk_softmax
// ============================================================================================

constexpr int kTopkWarps = 4;
constexpr int kTopkMaxE = 1024;  // 32 elements a lane, in registers (a taken-mask bit each)
constexpr int kTopkMaxK = 32;    // one selection a lane

// A warp per row, the row in registers (lane l holds experts l, l + 32, ...; PER of them): the
// softmax, then k rounds of argmax (larger p, then lower id) over what is not yet taken. A round is
// two warp reductions in hardware (REDUX): the largest p as its bits (p >= 0, so the bits order as
// the values), then the lowest id holding it; a NaN p counts as 0. A row that routed says is not
// routed gets no expert (its flag is loaded beside the logits, not before).
template <int PER>
__global__ void __launch_bounds__(kTopkWarps * 32) topk_softmax_kernel(const float* logits, const int32_t* routed,
                                                                     int64_t T, int E, int k, bool normalize,
                                                                     int32_t* __restrict__ ids,
                                                                     float* __restrict__ weights) {
  wait_for_prior_kernels();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t t = int64_t(blockIdx.x) * kTopkWarps + warp; t < T; t += int64_t(gridDim.x) * kTopkWarps) {
    const bool unrouted = routed != nullptr && routed[t] == 0;
    const float* l = logits + t * E;
    float p[PER];
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int e = lane + 32 * i;
      p[i] = e < E ? l[e] : -INFINITY;
      mx = fmaxf(mx, p[i]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      p[i] = lane + 32 * i < E ? expf(p[i] - mx) : 0.0f;
      sum += p[i];
    }
    sum = warp_sum(sum);  // every lane the same value: the butterfly adds the same pairs
    uint32_t key[PER];
    uint32_t alive = 0;  // bit i: expert lane + 32 i exists and is not taken
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      p[i] = p[i] / sum;
      key[i] = p[i] == p[i] ? __float_as_uint(p[i]) : 0u;
      if (lane + 32 * i < E) alive |= 1u << i;
    }
    float my_p = 0.0f;
    int my_id = -1;
    for (int j = 0; j < k; ++j) {
      uint32_t m = 0;
#pragma unroll
      for (int i = 0; i < PER; ++i) m = (alive >> i) & 1u ? max(m, key[i]) : m;
      const uint32_t best = __reduce_max_sync(0xffffffffu, m);
      int mine = INT_MAX;  // this lane's lowest expert holding the best p
#pragma unroll
      for (int i = PER - 1; i >= 0; --i) mine = ((alive >> i) & 1u) && key[i] == best ? lane + 32 * i : mine;
      const int e = __reduce_min_sync(0xffffffffu, mine);
      if (lane == (e & 31)) alive &= ~(1u << (e >> 5));
      if (lane == j) my_p = __uint_as_float(best), my_id = e;
    }
    const float ksum = warp_sum(lane < k ? my_p : 0.0f);
    if (lane < k) {
      ids[t * k + lane] = unrouted ? -1 : my_id;
      weights[t * k + lane] = unrouted ? 0.0f : normalize ? my_p / ksum : my_p;
    }
  }
}

// Few rows (decode): a block a row, its warps at once where topk_softmax_kernel's one warp runs k
// rounds in a chain (~11,000 cycles at 512 experts and k = 10: session 37's profile). Thread i holds
// experts i, i + NT, ... (V of them). The softmax's max and sum go over the block (every thread adds
// the warps' sums in one order: the same floats everywhere). A choice's key is p's bits above the
// complement of its id, so that a larger key is the op's order (larger p, then the lower id) and
// no two are equal (an expert past E has p = 0 and an id past every real one). Then each key's rank
// among its warp's 32 V (its shuffled neighbours' keys, their ids known); each warp's first k go to
// shared memory as candidates (the row's first k are among them, and each one's rank among the
// candidates is its rank in the row), ranked by P threads each over the candidates: those of rank
// < k are the row's choices, in order. The renormalising sum is topk_softmax_kernel's (one warp,
// lane j the j-th choice).
constexpr int kTopkRowBlockRowsMax = 256;  // rows up to which a row takes a block of its own
// (BALLAST_CUDA_TOPK_ROWS=0: never, for A/B runs)
bool topk_rows_enabled() {
  static const bool on = switched_on("BALLAST_CUDA_TOPK_ROWS");
  return on;
}

template <int V>
__global__ void __launch_bounds__(kTopkMaxE / 2) topk_softmax_rows_kernel(const float* logits, const int32_t* routed,
                                                                         int E, int k, bool normalize,
                                                                         int32_t* __restrict__ ids,
                                                                         float* __restrict__ weights) {
  constexpr int kMaxWarps = kTopkMaxE / 2 / 32;
  __shared__ float warp_max[kMaxWarps], warp_sums[kMaxWarps];
  __shared__ unsigned long long candidates[kMaxWarps * kTopkMaxK], chosen[kTopkMaxK];
  wait_for_prior_kernels();
  const int NT = int(blockDim.x), NW = NT / 32, tid = int(threadIdx.x), warp = tid / 32, lane = tid % 32;
  const int64_t t = blockIdx.x;
  const float* l = logits + t * E;
  const bool unrouted = routed != nullptr && load_after_wait(routed + t) == 0;
  float p[V];
  float mx = -INFINITY;
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const int e = tid + v * NT;
    p[v] = e < E ? load_after_wait(l + e) : -INFINITY;
    mx = fmaxf(mx, p[v]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if (lane == 0) warp_max[warp] = mx;
  __syncthreads();
  mx = warp_max[0];
  for (int w = 1; w < NW; ++w) mx = fmaxf(mx, warp_max[w]);
  float sum = 0.0f;
#pragma unroll
  for (int v = 0; v < V; ++v) {
    p[v] = tid + v * NT < E ? expf(p[v] - mx) : 0.0f;
    sum += p[v];
  }
  sum = warp_sum(sum);
  if (lane == 0) warp_sums[warp] = sum;  // (not warp_max: a thread may still be reading it)
  __syncthreads();
  sum = warp_sums[0];
  for (int w = 1; w < NW; ++w) sum += warp_sums[w];
  auto key_of = [](uint32_t bits, int e) { return (uint64_t(bits) << 32) | uint32_t(~uint32_t(e)); };
  uint32_t bits[V];
  uint64_t key[V];
  int rank[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const int e = tid + v * NT;
    p[v] = p[v] / sum;
    bits[v] = e < E && p[v] == p[v] ? __float_as_uint(p[v]) : 0u;  // a NaN p counts as 0
    key[v] = key_of(bits[v], e);
    rank[v] = 0;
  }
#pragma unroll
  for (int v = 0; v < V; ++v)
#pragma unroll
    for (int u = 0; u < V; ++u) rank[v] += key[u] > key[v];
  for (int o = 1; o < 32; ++o)
#pragma unroll
    for (int u = 0; u < V; ++u) {
      const uint64_t theirs = key_of(__shfl_xor_sync(0xffffffffu, bits[u], o), (tid ^ o) + u * NT);
#pragma unroll
      for (int v = 0; v < V; ++v) rank[v] += theirs > key[v];
    }
#pragma unroll
  for (int v = 0; v < V; ++v)
    if (rank[v] < k) candidates[warp * k + rank[v]] = key[v];
  __syncthreads();
  // P threads a candidate (a power of two: whole groups of adjacent lanes, added by shuffles).
  const int C = NW * k;
  int P = 1;
  while (2 * P * C <= NT) P *= 2;
  const int c = tid / P, part = tid % P;
  const uint64_t mine = c < C ? candidates[c] : 0;
  int above = 0;
  if (c < C)
    for (int j = part; j < C; j += P) above += candidates[j] > mine;
  for (int o = P / 2; o > 0; o >>= 1) above += __shfl_xor_sync(0xffffffffu, above, o);
  if (c < C && part == 0 && above < k) chosen[above] = mine;
  __syncthreads();
  if (warp == 0) {
    const uint64_t s = lane < k ? chosen[lane] : 0;
    const float ps = __uint_as_float(uint32_t(s >> 32));
    const float ksum = warp_sum(lane < k ? ps : 0.0f);
    if (lane < k) {
      ids[t * k + lane] = unrouted ? -1 : int32_t(~uint32_t(s));
      weights[t * k + lane] = unrouted ? 0.0f : normalize ? ps / ksum : ps;
    }
  }
}

// ============================================================================================
// dispatch
// ============================================================================================

__global__ void dispatch_static_kernel(const int32_t* ids, int64_t N, const int32_t* table,
                                       int64_t E, int32_t* __restrict__ slots, Fault* fault) {
  wait_for_prior_kernels();
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < N; i += int64_t(gridDim.x) * blockDim.x) {
    const int32_t e = ids[i];
    if (e >= E) report(fault, cm::kDispatchId, i, e, E);
    slots[i] = e < 0 || e >= E ? -1 : table[e];  // e < 0: a choice of no expert
  }
}

__global__ void dispatch_random_kernel(const int32_t* ids, int64_t N, const int32_t* replicas,
                                       const int32_t* count, int64_t E, int64_t R,
                                       const int64_t* pass_seed, int layer, int rank,
                                       int32_t* __restrict__ slots, Fault* fault) {
  wait_for_prior_kernels();
  // The seed differs per pass and layer; the hash of (rank, choice) spreads one pass's choices.
  const uint64_t seed = uint64_t(pass_seed[0]) * 1000003u + uint64_t(layer);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < N; i += int64_t(gridDim.x) * blockDim.x) {
    const int32_t e = ids[i];
    if (e < 0 || e >= E) {  // e < 0: a choice of no expert
      if (e >= E) report(fault, cm::kDispatchId, i, e, E);
      slots[i] = -1;
      continue;
    }
    const int32_t c = count[e];
    if (c < 1 || c > R) {
      report(fault, cm::kDispatchReplicaCount, e, c, R);
      slots[i] = -1;
      continue;
    }
    const uint64_t h = mix64(seed ^ mix64(uint64_t(rank) << 40 ^ uint64_t(i)));
    slots[i] = replicas[e * R + int64_t(h % uint64_t(c))];
  }
}

constexpr int kBalancedThreads = 512;

struct DeviceBlock {
  Fault* fault;
  __device__ int tid() const { return int(threadIdx.x); }
  __device__ int nt() const { return int(blockDim.x); }
  __device__ void sync() const { __syncthreads(); }
  __device__ void atomic_add(int* p, int v) const { atomicAdd(p, v); }
  __device__ int atomic_cas(int* p, int expected, int desired) const { return atomicCAS(p, expected, desired); }
  __device__ void atomic_add_u64(unsigned long long* p, unsigned long long v) const { atomicAdd(p, v); }
  __device__ void report(int code, long long a, long long b, long long c) const {
    ::ballast::kernels::report(fault, code, a, b, c);
  }
};

__global__ void __launch_bounds__(kBalancedThreads) dispatch_balanced_kernel(cm::balanced::Args a,
                                                                            cm::balanced::Global g, Fault* f) {
  wait_for_prior_kernels();
  extern __shared__ __align__(16) unsigned char balanced_smem[];
  cm::balanced::Shared s;
  cm::balanced::shared_layout(balanced_smem, a.E, a.P, a.G, int(blockDim.x), &s);
  DeviceBlock c{f};
  cm::balanced::run(c, a, g, s);
}

// ============================================================================================
// histogram
// ============================================================================================

constexpr int kHistSharedBins = 12 * 1024;  // 48 KiB of shared counts

__global__ void histogram_kernel(const int32_t* keys, int64_t N, int32_t* __restrict__ counts,
                                 int64_t bins, bool shared, Fault* fault) {
  wait_for_prior_kernels();
  extern __shared__ int hist_smem[];
  if (shared) {
    for (int64_t b = threadIdx.x; b < bins; b += blockDim.x) hist_smem[b] = 0;
    __syncthreads();
  }
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < N; i += int64_t(gridDim.x) * blockDim.x) {
    const int32_t k = keys[i];
    if (k < 0) continue;
    if (k >= bins) {
      report(fault, cm::kHistogramKey, i, k, bins);
      continue;
    }
    if (shared)
      atomicAdd(&hist_smem[k], 1);
    else
      atomicAdd(&counts[k], 1);
  }
  if (shared) {
    __syncthreads();
    for (int64_t b = threadIdx.x; b < bins; b += blockDim.x)
      if (hist_smem[b] != 0) atomicAdd(&counts[b], hist_smem[b]);
  }
}

// ============================================================================================
// group_by
// ============================================================================================

// n = the sum of valid[0 .. vn) (or N without valid), checked to lie in [0, N); one per block.
__device__ int64_t valid_count(const int32_t* valid, int64_t vn, int64_t N, Fault* fault) {
  if (valid == nullptr) return N;
  __shared__ unsigned long long total;
  if (threadIdx.x == 0) total = 0;
  __syncthreads();
  long long part = 0;
  for (int64_t i = threadIdx.x; i < vn; i += blockDim.x) part += valid[i];
  if (part != 0) atomicAdd(&total, (unsigned long long)part);
  __syncthreads();
  const int64_t n = (long long)total;
  if (n < 0 || n > N) {
    if (blockIdx.x == 0 && threadIdx.x == 0) report(fault, cm::kGroupByValid, n, N, 0);
    return n < 0 ? 0 : N;
  }
  return n;
}

// Sort keys: the group of each taking part, `groups` (after every group) for the others.
__global__ void group_keys_kernel(const int32_t* keys, int64_t N, const int32_t* valid,
                                  int64_t vn, int div, int groups, uint32_t* __restrict__ gkey,
                                  int32_t* __restrict__ index, Fault* fault) {
  wait_for_prior_kernels();
  const int64_t n = valid_count(valid, vn, N, fault);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < N; i += int64_t(gridDim.x) * blockDim.x) {
    const int32_t k = keys[i];
    gkey[i] = (i < n && k >= 0) ? uint32_t((k / div) % groups) : uint32_t(groups);
    index[i] = int32_t(i);
  }
}

__device__ __forceinline__ int64_t lower_bound_u32(const uint32_t* a, int64_t n, uint32_t v) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (a[mid] < v)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

__global__ void group_offsets_kernel(const uint32_t* sorted, int64_t N, int groups,
                                     int32_t* __restrict__ counts, int32_t* __restrict__ offsets) {
  wait_for_prior_kernels();
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g <= groups; g += int64_t(gridDim.x) * blockDim.x) {
    const int64_t at = lower_bound_u32(sorted, N, uint32_t(g));
    offsets[g] = int32_t(at);
    if (g < groups) counts[g] = int32_t(lower_bound_u32(sorted, N, uint32_t(g + 1)) - at);
  }
}

__global__ void group_scatter_kernel(const uint32_t* sorted, const int32_t* order,
                                     int64_t N, int groups, int32_t* __restrict__ perm, int32_t* __restrict__ inverse) {
  wait_for_prior_kernels();
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < N; j += int64_t(gridDim.x) * blockDim.x) {
    const bool in = sorted[j] < uint32_t(groups);
    const int32_t i = order[j];  // a permutation of [0, N)
    perm[j] = in ? i : -1;
    if (inverse != nullptr && i >= 0 && i < N) inverse[i] = in ? int32_t(j) : -1;
  }
}

// Few keys (decode and small verify passes): the whole group_by in one block, a stable counting
// sort in shared memory, where the radix sort path takes five launches. Keys and bins must fit
// (kGroupSmallKeys, kGroupSmallBins).
constexpr int kGroupSmallThreads = 1024;
constexpr int kGroupSmallKeys = 1024;  // one key per thread
constexpr int kGroupSmallBins = 4096;  // groups + 1 (the left-out bin)

__global__ void __launch_bounds__(kGroupSmallThreads)
    group_small_kernel(const int32_t* keys, int N, const int32_t* valid, int64_t vn,
                       int div, int groups, int32_t* __restrict__ perm, int32_t* __restrict__ counts,
                       int32_t* __restrict__ offsets, int32_t* __restrict__ inverse, Fault* fault) {
  wait_for_prior_kernels();
  using Scan = cub::BlockScan<int, kGroupSmallThreads>;
  __shared__ typename Scan::TempStorage scan;
  __shared__ int bin_s[kGroupSmallBins];
  __shared__ int key_s[kGroupSmallKeys];
  const int n = int(valid_count(valid, vn, N, fault));
  const int bins = groups + 1, t = int(threadIdx.x);
  for (int g = t; g < bins; g += blockDim.x) bin_s[g] = 0;
  __syncthreads();
  int key = groups;
  if (t < N) {
    const int32_t k = keys[t];
    key = (t < n && k >= 0) ? (k / div) % groups : groups;
    key_s[t] = key;
    atomicAdd(&bin_s[key], 1);
  }
  __syncthreads();
  // Exclusive scan of the bins: each thread sums a run of them, one block scan of the runs.
  const int per = (bins + blockDim.x - 1) / blockDim.x, b0 = t * per, b1 = min(b0 + per, bins);
  int run = 0;
  for (int g = b0; g < b1; ++g) run += bin_s[g];
  int start = 0;
  Scan(scan).ExclusiveSum(run, start);
  for (int g = b0; g < b1; ++g) {
    const int c = bin_s[g];
    offsets[g] = start;  // offsets[groups] = the number sorted
    if (g < groups) counts[g] = c;
    bin_s[g] = start;
    start += c;
  }
  __syncthreads();
  if (t < N) {
    // Stable: the rank among equal keys is the number of them before t (every thread reads the
    // same key_s[j] at once, a broadcast).
    int rank = 0;
    for (int j = 0; j < N; ++j) rank += (j < t && key_s[j] == key) ? 1 : 0;
    const int at = bin_s[key] + rank;
    const bool in = key < groups;
    perm[at] = in ? t : -1;
    if (inverse != nullptr) inverse[t] = in ? at : -1;
  }
}

// N = 0: empty groups (and `valid` must sum to 0).
__global__ void group_empty_kernel(const int32_t* valid, int64_t vn, int groups,
                                   int32_t* __restrict__ counts, int32_t* __restrict__ offsets, Fault* fault) {
  wait_for_prior_kernels();
  valid_count(valid, vn, 0, fault);
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g <= groups; g += int64_t(gridDim.x) * blockDim.x) {
    offsets[g] = 0;
    if (g < groups) counts[g] = 0;
  }
}

// ============================================================================================
// moe_experts
// ============================================================================================

constexpr int kSmallRows = 8;     // rows of a small tile
constexpr int kSmallMax = 32;     // groups of at most this many rows take small tiles (fp32)
constexpr int kSmallMaxTc = 8;    // ... with large tiles on the tensor cores: one small tile at most,
                                  // so that no expert's weights are streamed twice
constexpr int kTileRows = 64;     // BM of the GEMM
constexpr int kTileCols = 64;     // BN
constexpr int kTileK = 32;        // BK
constexpr int kExpertThreads = 256;
constexpr int kTileThreads = 512;

// Elements k .. k+EL-1 (EL = 8 or 16) of a weight row as floats. VEC: 16-byte loads (F32: two for
// 8; F8: one for 16, else 8 bytes), k + EL <= K and the row aligned; otherwise element by element,
// zero past K.
template <typename W, bool VEC, int EL = 8>
__device__ __forceinline__ void load_el(const W* __restrict__ row, int64_t k, int64_t K, float* f) {
  if constexpr (VEC) {
    constexpr int WORDS = EL * int(sizeof(W)) / 4;
    if constexpr (WORDS > 4) {
#pragma unroll
      for (int q = 0; q < WORDS / 4; ++q) unpack_words<W, 4>(load_words<4>(row + k + q * (16 / sizeof(W))), f + q * (16 / sizeof(W)));
    } else {
      unpack_words<W, WORDS>(load_words<WORDS>(row + k), f);
    }
  } else {
#pragma unroll
    for (int e = 0; e < EL; ++e) f[e] = k + e < K ? to_float(row[k + e]) : 0.0f;
  }
}

struct ExpertsArgs {
  const float* x;         // [M, H]
  int64_t M, H;
  const int32_t* perm;    // [Np]
  int64_t Np;
  int row_div;
  float* y;               // [Ny, H]
  int64_t Ny;
  const ExpertEntry* ex;  // [groups]
  float* h;               // [Np, ldh] in sorted order
  int64_t ldh;
  const __nv_bfloat16* xb;  // tensor-core path: x rounded to bf16 [M, H]
  __nv_bfloat16* hb;        // ... and h of its rows, in bf16 [Np, ldh]
  const uint8_t* xq;      // FP8 tensor-core path: x quantized per row and 128-block [M, H] e4m3
  const float* xs;        // ... its scales [H / 128, M]
  const uint8_t* hq;      // ... and h [Np, ldh], quantized after the gate/up pass
  const float* hs;        // ... its scales [ldh / 128, Np]
  const int4* tiles;      // {group, first j, end j, 0}
  const int* ntiles;      // on the device
  int fblocks;            // column blocks of a tile
  Fault* fault;
};

// The x row (perm[j] / row_div) and y row (perm[j]) of entry j of perm, or -1 and -1 where perm[j]
// is out of range (reported when `reports`).
__device__ __forceinline__ void tile_row(const ExpertsArgs& a, int64_t j, bool reports, int64_t& src, int64_t& dst) {
  const int32_t i = a.perm[j];
  if (i >= 0 && i < a.Ny && i / a.row_div < a.M) {
    src = i / a.row_div;
    dst = i;
  } else {
    src = dst = -1;
    if (reports) report(a.fault, cm::kExpertsPerm, j, i, 0);
  }
}

// Sources and destinations of a tile's rows into shared memory, -1 where j is past the tile.
__device__ __forceinline__ void tile_rows(const ExpertsArgs& a, int j0, int rows, int n, int64_t* src, int64_t* dst) {
  for (int r = threadIdx.x; r < n; r += blockDim.x) {
    src[r] = dst[r] = -1;
    if (r < rows) tile_row(a, int64_t(j0) + r, true, src[r], dst[r]);
  }
}

// The same for a tile of at most N rows, each thread its own copy in registers (decode's tiles of one
// or two rows): no shared memory and no barrier stand between an item's tile entry and its weight
// loads. Thread 0 reports a bad perm entry.
template <int N>
__device__ __forceinline__ void tile_rows_own(const ExpertsArgs& a, int j0, int rows, int64_t (&src)[N],
                                              int64_t (&dst)[N]) {
#pragma unroll
  for (int r = 0; r < N; ++r) {
    src[r] = dst[r] = -1;
    if (r < rows) tile_row(a, int64_t(j0) + r, threadIdx.x == 0, src[r], dst[r]);
  }
}

struct Int2Sum {
  __device__ int2 operator()(int2 a, int2 b) const { return make_int2(a.x + b.x, a.y + b.y); }
};

// Lists the row tiles of every group: small tiles {g, j, j + <= small_rows} for groups of <=
// small_max rows, large tiles {g, j, j + <= large_rows} for the others; offsets are checked and
// clamped to perm.
__global__ void __launch_bounds__(kTileThreads) expert_tiles_kernel(const int32_t* offsets, int groups,
                                                                  int small_max, int small_rows, int large_rows,
                                                                  int64_t Np, const ExpertEntry* ex,
                                                                  int4* __restrict__ small, int64_t cap_small,
                                                                  int4* __restrict__ large, int64_t cap_large,
                                                                  int* __restrict__ ntiles,
                                                                  const float* x,
                                                                  __nv_bfloat16* __restrict__ xb, int64_t nround,
                                                                  Fault* fault) {
  wait_for_prior_kernels();
  // Few x rows for the tensor-core tiles are rounded to bf16 here rather than in a launch of their own.
  for (int64_t i = threadIdx.x; i < nround; i += blockDim.x) xb[i] = __float2bfloat16_rn(x[i]);
  using Scan = cub::BlockScan<int2, kTileThreads>;
  __shared__ typename Scan::TempStorage scan;
  int64_t carry_s = 0, carry_l = 0;
  for (int g0 = 0; g0 < groups; g0 += blockDim.x) {
    const int g = g0 + int(threadIdx.x);
    int ns = 0, nl = 0;
    int64_t b = 0, e = 0;
    if (g < groups) {
      const int64_t o0 = offsets[g], o1 = offsets[g + 1];
      if (o0 < 0 || o1 < o0 || o1 > Np) report(fault, cm::kExpertsOffsets, g, o0, o1);
      b = o0 < 0 ? 0 : (o0 > Np ? Np : o0);
      e = o1 < b ? b : (o1 > Np ? Np : o1);
      int64_t c = e - b;
      if (c > 0 && ex[g].gate == nullptr) {
        report(fault, cm::kExpertsNoWeights, g, c, 0);
        c = 0;
      }
      if (c > 0) {
        if (c <= small_max)
          ns = int(cdiv(c, int64_t(small_rows)));
        else
          nl = int(cdiv(c, int64_t(large_rows)));
      }
    }
    // Where this group's small and large tiles start among this round's (one block-wide scan).
    int2 first, total;
    Scan(scan).ExclusiveScan(make_int2(ns, nl), first, make_int2(0, 0), Int2Sum{}, total);
    for (int q = 0; q < ns; ++q) {
      const int64_t at = carry_s + first.x + q;
      const int64_t j0 = b + int64_t(q) * small_rows, j1 = j0 + small_rows < e ? j0 + small_rows : e;
      if (at < cap_small) small[at] = make_int4(g, int(j0), int(j1), 0);
    }
    for (int q = 0; q < nl; ++q) {
      const int64_t at = carry_l + first.y + q;
      const int64_t j0 = b + int64_t(q) * large_rows, j1 = j0 + large_rows < e ? j0 + large_rows : e;
      if (at < cap_large) large[at] = make_int4(g, int(j0), int(j1), 0);
    }
    carry_s += total.x;
    carry_l += total.y;
    __syncthreads();  // the scan's storage is reused
  }
  if (threadIdx.x == 0) {
    ntiles[0] = int(carry_s < cap_small ? carry_s : cap_small);
    ntiles[1] = int(carry_l < cap_large ? carry_l : cap_large);
  }
}

// Small tiles (<= 8 rows): each warp takes FPW output features (rows of the weights) and streams
// them once over K with the loads of U steps in flight, as the few-rows matmul does; lanes hold 8
// consecutive k each and read the tile's input rows straight from global memory (the block's warps
// share them through L1), warp-shuffle sums at the end. No shared staging, no barrier in the loop.
//   GU (gate+up): inputs x rows, outputs h[j, n] = silu(gate . x) * (up . x), n < I.
//   down:         inputs h rows, outputs y[perm[j], n] = down . h, n < H.
// Per tile height MAXR (rows of x a warp keeps sums for): features per warp and K steps whose
// loads are in flight together, chosen to keep ~4 16-byte loads a lane in flight while the
// registers stay few enough for a full SM (the sums are NM x FPW x MAXR a lane). The down
// projection's rows are short (K = the expert's intermediate size, 512 in the released models: one
// or two steps a row), so with two x rows its loads in flight come from four rows a warp (80B FP8,
// 8 layers in ncu: batch 32 403 -> 284 us), and with one x row from eight rows of one step: an item
// is then 16 KB of weights like a gate/up item, where 2 rows of 2 steps (one of them past K for
// FP8's 512) made 4 KB items whose per-item latency (tile -> expert -> perm) the grid paid 4x as
// often (80B FP8, alternated in one run, batch 1 / 4 / 8: 248 / 417 / 552 -> 250 / 449 / 619
// tok/s; 4 rows: 253 / 443 / 604; 16 rows, 210 registers: 219 / 390 / 510).
// F8: the kernel made for block-scaled FP8 experts alone (72-96 registers where one for any dtype
// takes 86-144), whose one-row gate/up items are 2 features x 2 steps a warp (32 KB an item): 80B
// FP8, alternated in one run, batch 2 / 4 / 8 382 / 582 / 763 tok/s with 1 x 2, 386 / 610 / 821
// with 2 x 2 (4 x 1: 377 / 600 / 822; 1 x 4: 374 / 571 / 741; the kernel for any dtype with 4 x 1:
// 370 / 591 / 811).
template <bool GU, int MAXR, bool F8 = false>
constexpr int small_fpw() {
  return MAXR == 1 ? (GU ? (F8 ? 2 : 1) : 8) : MAXR == 2 ? (GU ? 1 : 4) : (GU ? 2 : 4);
}
template <bool GU, int MAXR>
constexpr int small_steps() {
  return MAXR == 1 ? (GU ? 2 : 1) : MAXR == 2 ? 2 : 1;
}
constexpr int kSmallThreads = 128;

// Elements k .. k+EL-1 of an input row (fp32); VEC: 16-byte loads, else element-wise, 0 past K.
template <bool VEC, int EL>
__device__ __forceinline__ void load_x(const float* row, int64_t k, int64_t K, float* f) {
  if constexpr (VEC) {
#pragma unroll
    for (int q = 0; q < EL / 4; ++q) {
      const float4 v = load4_after_wait(row + k + 4 * q);
      f[4 * q] = v.x, f[4 * q + 1] = v.y, f[4 * q + 2] = v.z, f[4 * q + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int e = 0; e < EL; ++e) f[e] = k + e < K ? load_after_wait(row + k + e) : 0.0f;
  }
}

// A lane reads EL consecutive k a step: 8, or 16 for vectorised FP8 (16 bytes either way but
// F32's). SCALED: block-scaled FP8 (W = f8e4m3); a lane's EL elements (k a multiple of EL) lie in
// one 128-block of k, so each load is multiplied by one scale.
template <bool GU, typename W, bool VEC, int MAXR, bool SCALED, int FPW, int U>
__device__ __forceinline__ void small_tile(const ExpertsArgs& a, const ExpertEntry& ex, int j0, int rows, int f0,
                                           const int64_t* src, const int64_t* dst) {
  constexpr int NM = GU ? 2 : 1;
  constexpr int EL = VEC && sizeof(W) == 1 ? 16 : 8, STEP = 32 * EL;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t K = GU ? a.H : ex.inter, Nout = GU ? ex.inter : a.H;
  const int64_t nb = int64_t(f0) + warp * FPW;
  if (nb >= Nout) return;  // the whole warp
  const W* w[NM][FPW];
  const float* sr[NM][FPW];  // SCALED: the scales of each row's 128-row block
#pragma unroll
  for (int f = 0; f < FPW; ++f) {
    const int64_t n = nb + f < Nout ? nb + f : Nout - 1;  // past Nout: a valid row, not written
    w[0][f] = static_cast<const W*>(GU ? ex.gate : ex.down) + n * K;
    if constexpr (GU) w[NM - 1][f] = static_cast<const W*>(ex.up) + n * K;
    if constexpr (SCALED) {
      const int64_t at = (n / kScaleBlock) * cdiv(K, int64_t(kScaleBlock));
      sr[0][f] = (GU ? ex.s_gate : ex.s_down) + at;
      if constexpr (GU) sr[NM - 1][f] = ex.s_up + at;
    }
  }
  const float* in[MAXR];
#pragma unroll
  for (int r = 0; r < MAXR; ++r) {
    const int64_t s = r < rows ? (GU ? src[r] : int64_t(j0) + r) : -1;
    in[r] = s < 0 ? nullptr : (GU ? a.x + s * a.H : a.h + s * a.ldh);
  }
  float acc[NM][FPW][MAXR];
#pragma unroll
  for (int m = 0; m < NM; ++m)
#pragma unroll
    for (int f = 0; f < FPW; ++f)
#pragma unroll
      for (int r = 0; r < MAXR; ++r) acc[m][f][r] = 0.0f;
  constexpr int WORDS = VEC ? EL * int(sizeof(W)) / 4 : 0;
  if constexpr (WORDS == 4 && MAXR <= 2) {
    // Few rows (decode): the U x NM x FPW loads in flight stay raw 16-byte words until their step's
    // products (16 registers a lane, not 64 floats for FP8), so that more warps fit an SM and more
    // loads are in flight. A weight is unpacked once per row it meets; the sums are the same.
    for (int64_t k0 = int64_t(lane) * EL; k0 < K; k0 += U * STEP) {
      Words<WORDS> raw[U][NM][FPW];
      float sc[U][NM][FPW];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t k = k0 + u * STEP;
#pragma unroll
        for (int m = 0; m < NM; ++m)
#pragma unroll
          for (int f = 0; f < FPW; ++f) {
            if (k < K) {
              raw[u][m][f] = load_words<WORDS>(w[m][f] + k);
              if constexpr (SCALED) sc[u][m][f] = __ldg(sr[m][f] + k / kScaleBlock);
            }
          }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t k = k0 + u * STEP;
        if (k >= K) break;
#pragma unroll
        for (int r = 0; r < MAXR; ++r) {
          if (in[r] == nullptr) continue;
          float xv[EL];
          load_x<VEC, EL>(in[r], k, K, xv);
#pragma unroll
          for (int m = 0; m < NM; ++m)
#pragma unroll
            for (int f = 0; f < FPW; ++f) {
              float wv[EL];
              unpack_words<W, WORDS>(raw[u][m][f], wv);
              if constexpr (SCALED) {
#pragma unroll
                for (int e = 0; e < EL; ++e) wv[e] *= sc[u][m][f];
              }
#pragma unroll
              for (int e = 0; e < EL; ++e) acc[m][f][r] = fmaf(wv[e], xv[e], acc[m][f][r]);
            }
        }
      }
    }
  } else {
    for (int64_t k0 = int64_t(lane) * EL; k0 < K; k0 += U * STEP) {
      float wv[U][NM][FPW][EL];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t k = k0 + u * STEP;
#pragma unroll
        for (int m = 0; m < NM; ++m)
#pragma unroll
          for (int f = 0; f < FPW; ++f) {
            if (k < K) {
              load_el<W, VEC, EL>(w[m][f], k, K, wv[u][m][f]);
              if constexpr (SCALED) {
                const float sc = __ldg(sr[m][f] + k / kScaleBlock);
#pragma unroll
                for (int e = 0; e < EL; ++e) wv[u][m][f][e] *= sc;
              }
            } else {
#pragma unroll
              for (int e = 0; e < EL; ++e) wv[u][m][f][e] = 0.0f;
            }
          }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t k = k0 + u * STEP;
        if (k >= K) break;
#pragma unroll
        for (int r = 0; r < MAXR; ++r) {
          if (in[r] == nullptr) continue;
          float xv[EL];
          load_x<VEC, EL>(in[r], k, K, xv);
#pragma unroll
          for (int m = 0; m < NM; ++m)
#pragma unroll
            for (int f = 0; f < FPW; ++f)
#pragma unroll
              for (int e = 0; e < EL; ++e) acc[m][f][r] = fmaf(wv[u][m][f][e], xv[e], acc[m][f][r]);
        }
      }
    }
  }
#pragma unroll
  for (int f = 0; f < FPW; ++f) {
    const int64_t n = nb + f;
#pragma unroll
    for (int r = 0; r < MAXR; ++r) {
      if (r < rows) {
        const float v0 = warp_sum(acc[0][f][r]);
        const float v1 = GU ? warp_sum(acc[NM - 1][f][r]) : 0.0f;
        if (lane == 0 && n < Nout) {
          if constexpr (GU) {
            a.h[(int64_t(j0) + r) * a.ldh + n] = silu_(v0) * v1;
          } else {
            const int64_t d = dst[r];
            if (d >= 0) a.y[d * a.H + n] = v0;
          }
        }
      }
    }
  }
}

// F8: every expert block-scaled FP8 (the host checked), else each expert's dtype read from its entry.
template <bool GU, bool VEC, int MAXR, bool F8>
__global__ void __launch_bounds__(kSmallThreads) experts_small_kernel(ExpertsArgs a) {
  wait_for_prior_kernels();
  constexpr int FPW = small_fpw<GU, MAXR, F8>(), U = small_steps<GU, MAXR>(), FB = (kSmallThreads / 32) * FPW;
  __shared__ int64_t src[kSmallRows], dst[kSmallRows];
  const int64_t items = int64_t(*a.ntiles) * a.fblocks;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int4 tile = a.tiles[item / a.fblocks];
    const int f0 = int(item % a.fblocks) * FB;
    const ExpertEntry ex = a.ex[tile.x];
    const int64_t Nout = GU ? ex.inter : a.H;
    if (f0 >= Nout || ex.gate == nullptr) continue;  // the same for the whole block
    const int rows = tile.z - tile.y;
    const auto run = [&](const int64_t* src, const int64_t* dst) {
      if constexpr (F8) {
        small_tile<GU, f8e4m3, VEC, MAXR, true, FPW, U>(a, ex, tile.y, rows, f0, src, dst);
        return;
      }
      switch (DType(GU ? ex.dt_gu : ex.dt_down)) {
        case DType::F32: small_tile<GU, float, VEC, MAXR, false, FPW, U>(a, ex, tile.y, rows, f0, src, dst); break;
        case DType::BF16:
          small_tile<GU, __nv_bfloat16, VEC, MAXR, false, FPW, U>(a, ex, tile.y, rows, f0, src, dst);
          break;
        case DType::F16: small_tile<GU, __half, VEC, MAXR, false, FPW, U>(a, ex, tile.y, rows, f0, src, dst); break;
        case DType::F8_E4M3: small_tile<GU, f8e4m3, VEC, MAXR, false, FPW, U>(a, ex, tile.y, rows, f0, src, dst); break;
        case DType::F8_E4M3_B128:
          small_tile<GU, f8e4m3, VEC, MAXR, true, FPW, U>(a, ex, tile.y, rows, f0, src, dst);
          break;
        default: break;
      }
    };
    if constexpr (MAXR <= 2) {
      int64_t own_src[MAXR], own_dst[MAXR];
      tile_rows_own(a, tile.y, rows, own_src, own_dst);
      run(own_src, own_dst);
    } else {
      __syncthreads();  // the previous item's readers of src and dst are done
      tile_rows(a, tile.y, rows, MAXR, src, dst);
      __syncthreads();
      run(src, dst);
    }
  }
}

// Small tiles (up to 8 rows) of block-scaled FP8 experts on the FP8 tensor cores (bf16 products,
// beside the large FP8 tiles): mma.sync m16n8k32 e4m3 with 16 weight rows as A and the tile's rows
// as B's 8 columns, fp32 sums, each 128-block's sum times the weight block's scale and the row's.
// An item is output features of a tile: with GU 16 rows of gate and of up (h = silu(gate x) *
// up x of those features), the 4 warps splitting K in whole 128-blocks and adding their sums in a
// fixed order; else 64 rows of down, 16 a warp over all of K. The tile's input rows are read as the
// large tiles' pass quantized them (x rows by perm from xq, its h rows from hq: per row and
// 128-block, once a pass; each item quantizing its tile's rows again read as many bytes from L2 as
// its weights from memory, docs/perf.md). A lane's 16-byte load of a weight row feeds two MMAs as
// it came from memory: k is numbered in the order the loads bring it, and x's fragments (16 bytes a
// lane) follow the same order, so nothing is unpacked, converted or scaled per element.
constexpr int kF8SmallWarps = 4;
constexpr int kF8SmallRows = 16;  // output features a warp (the MMA's M)
// Output features an item: gate/up's 4 warps split K (H) over the same 16 features; down's each
// take 16 features over all of K (an expert's intermediate size, 4 blocks of 128 at the 80B shape),
// so that an item's tile lookups serve 32 KB of weights, not 8 (80B FP8, batch 32: with 16 features
// an item down streamed at half gate/up's rate a byte; 64: 949 -> 1,171 tok/s).
template <bool GU>
constexpr int f8_small_item_rows() {
  return GU ? kF8SmallRows : kF8SmallRows * kF8SmallWarps;
}
template <bool GU>
constexpr int f8_small_in_flight() {  // 128-blocks of k whose loads a warp issues together: 64 registers
  return GU ? 2 : 4;
}

// The quantized row of tile row r (-1 where r is past the tile or its perm entry is bad): GU an x
// row by perm (tile_row), else the tile's own h row. `reports`: this lane reports a bad entry.
template <bool GU>
__device__ __forceinline__ int64_t f8_small_source(const ExpertsArgs& a, int j0, int rows, int r, bool reports,
                                                   int64_t& dst) {
  dst = -1;
  if (r >= rows) return -1;
  int64_t src;
  tile_row(a, int64_t(j0) + r, reports, src, dst);
  return GU ? src : (dst >= 0 ? int64_t(j0) + r : -1);
}

template <bool GU>
__global__ void __launch_bounds__(kF8SmallWarps * 32) experts_fp8_small_kernel(ExpertsArgs a) {
  constexpr int NM = GU ? 2 : 1, NB = f8_small_in_flight<GU>();
  __shared__ float sums[GU ? kF8SmallWarps * NM * kF8SmallRows * 8 : 1];
  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) / 32, g = lane / 4, tq = lane % 4;
  wait_for_prior_kernels();
  const uint8_t* q_rows = GU ? a.xq : a.hq;
  const float* q_scales = GU ? a.xs : a.hs;
  const int64_t ld = GU ? a.H : a.ldh, scale_rows = GU ? a.M : a.Np;  // (scales [ld / 128, scale_rows])
  const int64_t items = int64_t(*a.ntiles) * a.fblocks;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {  // (block-uniform)
    const int4 tile = a.tiles[item / a.fblocks];
    const ExpertEntry ex = a.ex[tile.x];
    const int64_t K = GU ? a.H : ex.inter, Nout = GU ? ex.inter : a.H, KB = K / kScaleBlock;
    const int64_t item0 = (item % a.fblocks) * f8_small_item_rows<GU>();
    if (item0 >= Nout || ex.gate == nullptr) continue;
    const int rows = tile.z - tile.y;
    // This warp's 16 features and 128-blocks of k (a down warp past Nout has none, but stays for
    // the barriers).
    const int64_t n0 = GU ? item0 : item0 + warp * kF8SmallRows;
    const int64_t per = cdiv(KB, int64_t(kF8SmallWarps));
    const int64_t b0 = !GU ? 0 : std::min(KB, warp * per), b1 = !GU ? (n0 < Nout ? KB : 0) : std::min(KB, b0 + per);
    const uint8_t* wr[NM][2];
    const float* ws[NM];  // the scales of the item's 128-row block
#pragma unroll
    for (int m = 0; m < NM; ++m) {
      const uint8_t* base = static_cast<const uint8_t*>(GU ? (m == 0 ? ex.gate : ex.up) : ex.down);
      wr[m][0] = base + std::min(n0 + g, Nout - 1) * K;  // past Nout: a valid row, not written
      wr[m][1] = base + std::min(n0 + g + 8, Nout - 1) * K;
      ws[m] = (GU ? (m == 0 ? ex.s_gate : ex.s_up) : ex.s_down) + (std::min(n0, Nout - 1) / kScaleBlock) * KB;
    }
    uint4 w[NB][2][NM][2];  // [128-block][64-k half][matrix][row g, g + 8]
    const auto issue = [&](int64_t bb) {
#pragma unroll
      for (int q = 0; q < NB; ++q)
        if (bb + q < b1)
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int m = 0; m < NM; ++m) {
              const int64_t k = (bb + q) * kScaleBlock + h * 64 + tq * 16;
              w[q][h][m][0] = __ldg(reinterpret_cast<const uint4*>(wr[m][0] + k));
              w[q][h][m][1] = __ldg(reinterpret_cast<const uint4*>(wr[m][1] + k));
            }
    };
    issue(b0);
    // The lane's B column (tile row g) and its two accumulator columns (tile rows 2 tq, 2 tq + 1);
    // the first warp's lanes of tq 0 report a bad perm entry (each row once).
    int64_t dst_g, dst0, dst1;
    const int64_t src_g = f8_small_source<GU>(a, tile.y, rows, g, warp == 0 && tq == 0, dst_g);
    const int64_t src0 = f8_small_source<GU>(a, tile.y, rows, 2 * tq, false, dst0);
    const int64_t src1 = f8_small_source<GU>(a, tile.y, rows, 2 * tq + 1, false, dst1);
    const uint8_t* xrow = src_g >= 0 ? q_rows + src_g * ld : nullptr;
    float acc[NM][4] = {};  // rows g, g, g + 8, g + 8; tile rows 2 tq, 2 tq + 1
    for (int64_t bb = b0; bb < b1; bb += NB) {
      if (bb != b0) issue(bb);
#pragma unroll
      for (int q = 0; q < NB; ++q) {
        if (bb + q >= b1) break;
        float d[NM][4] = {};
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t k = (bb + q) * kScaleBlock + h * 64 + tq * 16;
          const uint4 xb = xrow ? load_u4_after_wait(xrow + k) : make_uint4(0, 0, 0, 0);
#pragma unroll
          for (int m = 0; m < NM; ++m) {
            const uint4& r = w[q][h][m][0];
            const uint4& r8 = w[q][h][m][1];
            mma_e4m3(d[m], r.x, r8.x, r.y, r8.y, xb.x, xb.y);
            mma_e4m3(d[m], r.z, r8.z, r.w, r8.w, xb.z, xb.w);
          }
        }
        const float* bs = q_scales + (bb + q) * scale_rows;
        const float x0 = src0 >= 0 ? load_after_wait(bs + src0) : 0.f;
        const float x1 = src1 >= 0 ? load_after_wait(bs + src1) : 0.f;
#pragma unroll
        for (int m = 0; m < NM; ++m) {
          const float sw = __ldg(ws[m] + bb + q);
          acc[m][0] = fmaf(d[m][0], sw * x0, acc[m][0]);
          acc[m][1] = fmaf(d[m][1], sw * x1, acc[m][1]);
          acc[m][2] = fmaf(d[m][2], sw * x0, acc[m][2]);
          acc[m][3] = fmaf(d[m][3], sw * x1, acc[m][3]);
        }
      }
    }
    if constexpr (!GU) {  // the warp's own features, whole sums: stored from the fragments
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t n = n0 + g + (q >= 2 ? 8 : 0), d = q & 1 ? dst1 : dst0;
        if (d >= 0 && n < Nout) a.y[d * a.H + n] = acc[0][q];
      }
    } else {  // the 4 warps' partial sums of the same features, added in warp order
      __syncthreads();  // the previous item's readers of the sums are done
#pragma unroll
      for (int m = 0; m < NM; ++m) {
        float* mine = sums + (warp * NM + m) * kF8SmallRows * 8;
        mine[g * 8 + 2 * tq] = acc[m][0], mine[g * 8 + 2 * tq + 1] = acc[m][1];
        mine[(g + 8) * 8 + 2 * tq] = acc[m][2], mine[(g + 8) * 8 + 2 * tq + 1] = acc[m][3];
      }
      __syncthreads();
      const int f = int(threadIdx.x) / 8, r = int(threadIdx.x) % 8;  // 128 threads: 16 features x 8 rows
      if (r < rows && n0 + f < Nout) {
        float v[NM];
#pragma unroll
        for (int m = 0; m < NM; ++m) {
          v[m] = 0.f;
#pragma unroll
          for (int q = 0; q < kF8SmallWarps; ++q) v[m] += sums[((q * NM + m) * kF8SmallRows + f) * 8 + r];
        }
        a.h[(int64_t(tile.y) + r) * a.ldh + n0 + f] = silu_(v[0]) * v[NM - 1];
      }
    }
  }
}

// Large tiles (<= 64 rows): a 64 x 64 output tile per block and item, K in steps of 32 through
// shared memory (weights widened to fp32 as they are stored), each thread a 4 x 4 block of outputs
// (of both gate and up with GU). The loads of a warp cover 4 rows x 8 consecutive k, so that the
// transposed stores into shared memory hit 32 distinct banks.
// SCALED: block-scaled FP8 (W = f8e4m3), each element times its block's scale as it is stored.
template <bool GU, typename W, bool SCALED = false>
__device__ __forceinline__ void gemm_tile(const ExpertsArgs& a, const ExpertEntry& ex, int j0, int rows, int n0,
                                          float (*As)[kTileRows + 4], float (*Bs)[kTileK][kTileCols + 4],
                                          const int64_t* src, const int64_t* dst) {
  constexpr int NM = GU ? 2 : 1;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tx = tid & 15, ty = tid >> 4;
  const int64_t K = GU ? a.H : ex.inter, Nout = GU ? ex.inter : a.H;
  const W* w[NM];
  const float* ws[NM];
  w[0] = static_cast<const W*>(GU ? ex.gate : ex.down);
  if constexpr (GU) w[NM - 1] = static_cast<const W*>(ex.up);
  ws[0] = GU ? ex.s_gate : ex.s_down;
  if constexpr (GU) ws[NM - 1] = ex.s_up;
  const int64_t lds = cdiv(K, int64_t(kScaleBlock));
  float acc[NM][4][4];
#pragma unroll
  for (int m = 0; m < NM; ++m)
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[m][i][j] = 0.0f;
  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
    __syncthreads();
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      const int kk = (lane & 7) + 8 * (q & 3);
      const int r = (lane >> 3) + 4 * warp + 32 * (q >> 2);
      const int64_t k = k0 + kk;
      float v = 0.0f;
      if (k < K && r < rows) {
        if constexpr (GU) {
          const int64_t s = src[r];
          if (s >= 0) v = a.x[s * a.H + k];
        } else {
          v = a.h[(int64_t(j0) + r) * a.ldh + k];
        }
      }
      As[kk][r] = v;
      const int64_t n = int64_t(n0) + r;
#pragma unroll
      for (int m = 0; m < NM; ++m) {
        float v = (k < K && n < Nout) ? to_float(w[m][n * K + k]) : 0.0f;
        if constexpr (SCALED)
          if (k < K && n < Nout) v *= __ldg(ws[m] + (n / kScaleBlock) * lds + k / kScaleBlock);
        Bs[m][kk][r] = v;
      }
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kTileK; ++kk) {
      const float4 av = *reinterpret_cast<const float4*>(&As[kk][ty * 4]);
      const float ar[4] = {av.x, av.y, av.z, av.w};
#pragma unroll
      for (int m = 0; m < NM; ++m) {
        const float4 bv = *reinterpret_cast<const float4*>(&Bs[m][kk][tx * 4]);
        const float br[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[m][i][j] = fmaf(ar[i], br[j], acc[m][i][j]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = ty * 4 + i;
    if (r >= rows) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = int64_t(n0) + tx * 4 + j;
      if (n >= Nout) continue;
      if constexpr (GU) {
        a.h[(int64_t(j0) + r) * a.ldh + n] = silu_(acc[0][i][j]) * acc[NM - 1][i][j];
      } else {
        const int64_t d = dst[r];
        if (d >= 0) a.y[d * a.H + n] = acc[0][i][j];
      }
    }
  }
}

template <bool GU>
__global__ void __launch_bounds__(kExpertThreads) experts_gemm_kernel(ExpertsArgs a) {
  wait_for_prior_kernels();
  constexpr int NM = GU ? 2 : 1;
  __shared__ __align__(16) float As[kTileK][kTileRows + 4];
  __shared__ __align__(16) float Bs[NM][kTileK][kTileCols + 4];
  __shared__ int64_t src[kTileRows], dst[kTileRows];
  const int64_t items = int64_t(*a.ntiles) * a.fblocks;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int4 tile = a.tiles[item / a.fblocks];
    const int n0 = int(item % a.fblocks) * kTileCols;
    const ExpertEntry ex = a.ex[tile.x];
    const int64_t Nout = GU ? ex.inter : a.H;
    if (n0 >= Nout || ex.gate == nullptr) continue;  // the same for the whole block
    const int rows = tile.z - tile.y;
    __syncthreads();
    tile_rows(a, tile.y, rows, kTileRows, src, dst);
    __syncthreads();
    switch (DType(GU ? ex.dt_gu : ex.dt_down)) {
      case DType::F32: gemm_tile<GU, float>(a, ex, tile.y, rows, n0, As, Bs, src, dst); break;
      case DType::BF16: gemm_tile<GU, __nv_bfloat16>(a, ex, tile.y, rows, n0, As, Bs, src, dst); break;
      case DType::F16: gemm_tile<GU, __half>(a, ex, tile.y, rows, n0, As, Bs, src, dst); break;
      case DType::F8_E4M3: gemm_tile<GU, f8e4m3>(a, ex, tile.y, rows, n0, As, Bs, src, dst); break;
      case DType::F8_E4M3_B128: gemm_tile<GU, f8e4m3, true>(a, ex, tile.y, rows, n0, As, Bs, src, dst); break;
      default: break;
    }
  }
}

// Large tiles on the tensor cores (BF16 weights, bf16_matmul): the same 64 x 64 output tile per
// item, K in steps of 64 staged in shared memory from bf16 copies of x (made once per call) and of
// h (which the gate/up pass writes in bf16 for these rows), the next step's global loads held in
// registers while this one is multiplied. 8 warps, each 16 rows x 32
// columns (of gate and up with GU); accumulators go through shared memory (over the staging
// buffers) for the epilogue.
// F8: block-scaled FP8 weights (K a multiple of 16), staged as their e4m3 values in bf16 (exact);
// the products of each 128-block of k sum apart and join the total times the block's scale, which
// is one number for the whole tile (its 64 columns lie in one 128-row block of the weight).
constexpr int kWmmaK = 64;                    // K per step
constexpr int kWmmaLd = kWmmaK + 8;           // bf16 row stride of the staging tiles
constexpr int kWmmaLdC = kTileCols + 4;       // float row stride of the accumulator tile
template <bool GU>
constexpr size_t wmma_smem_bytes() {
  constexpr int NM = GU ? 2 : 1;
  constexpr size_t ab = size_t(kTileRows + NM * kTileCols) * kWmmaLd * 2;
  constexpr size_t c = size_t(NM) * kTileRows * kWmmaLdC * 4;
  return ab > c ? ab : c;
}

template <bool GU, bool F8>
__device__ __forceinline__ void wmma_tile(const ExpertsArgs& a, const ExpertEntry& ex, int j0, int rows, int n0,
                                          unsigned char* smem, const int64_t* src, const int64_t* dst) {
  using namespace nvcuda;
  using W = std::conditional_t<F8, f8e4m3, __nv_bfloat16>;
  static_assert(kScaleBlock % kWmmaK == 0 && kScaleBlock % kTileCols == 0);
  constexpr int NM = GU ? 2 : 1;
  __nv_bfloat16* As = reinterpret_cast<__nv_bfloat16*>(smem);  // [64][kWmmaLd]
  __nv_bfloat16* Bs = As + kTileRows * kWmmaLd;                 // [NM][64][kWmmaLd]
  float* Cs = reinterpret_cast<float*>(smem);                   // [NM][64][kWmmaLdC], after the loop
  const int tid = threadIdx.x, warp = tid >> 5;
  const int64_t K = GU ? a.H : ex.inter, Nout = GU ? ex.inter : a.H;
  const W* w[NM];
  const float* ws[NM];  // F8: this tile's row of block scales
  w[0] = static_cast<const W*>(GU ? ex.gate : ex.down);
  if constexpr (GU) w[NM - 1] = static_cast<const W*>(ex.up);
  if constexpr (F8) {
    const int64_t at = (n0 / kScaleBlock) * cdiv(K, int64_t(kScaleBlock));
    ws[0] = (GU ? ex.s_gate : ex.s_down) + at;
    if constexpr (GU) ws[NM - 1] = ex.s_up + at;
  }
  // This thread's share of a step: 16 consecutive k (two chunks of 8) of one A row and of one
  // row of each weight.
  const int lr = tid >> 2, lk = (tid & 3) * 16;
  const __nv_bfloat16* arow = nullptr;
  if (lr < rows) {
    if constexpr (GU) {
      if (src[lr] >= 0) arow = a.xb + src[lr] * a.H;
    } else {
      arow = a.hb + (int64_t(j0) + lr) * a.ldh;
    }
  }
  const int64_t wn = int64_t(n0) + lr;
  uint4 ra[2];
  uint4 rb[NM][2];  // F8: the 16 elements in rb[m][0]
  auto load = [&](int64_t k0) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int64_t k = k0 + lk + 8 * c;
      const bool in = k < K;  // K % 8 == 0: a chunk of 8 is all in or all out
      ra[c] = in && arow ? *reinterpret_cast<const uint4*>(arow + k) : make_uint4(0, 0, 0, 0);
      if constexpr (!F8) {
#pragma unroll
        for (int m = 0; m < NM; ++m)
          rb[m][c] = in && wn < Nout ? __ldg(reinterpret_cast<const uint4*>(w[m] + wn * K + k)) : make_uint4(0, 0, 0, 0);
      }
    }
    if constexpr (F8) {
      const int64_t k = k0 + lk;  // K % 16 == 0: 16 elements all in or all out
#pragma unroll
      for (int m = 0; m < NM; ++m)
        rb[m][0] = k < K && wn < Nout ? __ldg(reinterpret_cast<const uint4*>(w[m] + wn * K + k)) : make_uint4(0, 0, 0, 0);
    }
  };
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[NM][2], part[NM][F8 ? 2 : 1];
#pragma unroll
  for (int m = 0; m < NM; ++m)
#pragma unroll
    for (int c = 0; c < 2; ++c) wmma::fill_fragment(acc[m][c], 0.0f);
  if constexpr (F8)
#pragma unroll
    for (int m = 0; m < NM; ++m)
#pragma unroll
      for (int c = 0; c < 2; ++c) wmma::fill_fragment(part[m][c], 0.0f);
  const int rw = (warp & 3) * 16, cw = (warp >> 2) * 32;
  load(0);
  for (int64_t k0 = 0; k0 < K; k0 += kWmmaK) {
    __syncthreads();  // the previous step's readers are done
#pragma unroll
    for (int c = 0; c < 2; ++c) *reinterpret_cast<uint4*>(As + lr * kWmmaLd + lk + 8 * c) = ra[c];
#pragma unroll
    for (int m = 0; m < NM; ++m) {
      if constexpr (F8) {  // 16 e4m3 -> 16 bf16 (exact)
        uint32_t o[8];
        const uint32_t* b = reinterpret_cast<const uint32_t*>(&rb[m][0]);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          float f[4];
          unpack_word<f8e4m3>(b[q], f);
          const __nv_bfloat162 lo = __floats2bfloat162_rn(f[0], f[1]), hi = __floats2bfloat162_rn(f[2], f[3]);
          o[2 * q] = *reinterpret_cast<const uint32_t*>(&lo);
          o[2 * q + 1] = *reinterpret_cast<const uint32_t*>(&hi);
        }
        *reinterpret_cast<uint4*>(Bs + (m * kTileCols + lr) * kWmmaLd + lk) = make_uint4(o[0], o[1], o[2], o[3]);
        *reinterpret_cast<uint4*>(Bs + (m * kTileCols + lr) * kWmmaLd + lk + 8) = make_uint4(o[4], o[5], o[6], o[7]);
      } else {
#pragma unroll
        for (int c = 0; c < 2; ++c)
          *reinterpret_cast<uint4*>(Bs + (m * kTileCols + lr) * kWmmaLd + lk + 8 * c) = rb[m][c];
      }
    }
    __syncthreads();
    if (k0 + kWmmaK < K) load(k0 + kWmmaK);  // in flight while the tensor cores work
#pragma unroll
    for (int kk = 0; kk < kWmmaK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, As + rw * kWmmaLd + kk, kWmmaLd);
#pragma unroll
      for (int m = 0; m < NM; ++m)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
          wmma::load_matrix_sync(fb, Bs + (m * kTileCols + cw + 16 * c) * kWmmaLd + kk, kWmmaLd);
          if constexpr (F8) wmma::mma_sync(part[m][c], fa, fb, part[m][c]);
          else wmma::mma_sync(acc[m][c], fa, fb, acc[m][c]);
        }
    }
    if constexpr (F8) {
      if ((k0 + kWmmaK) % kScaleBlock == 0 || k0 + kWmmaK >= K) {  // the end of a 128-block of k
#pragma unroll
        for (int m = 0; m < NM; ++m) {
          const float sc = __ldg(ws[m] + k0 / kScaleBlock);
#pragma unroll
          for (int c = 0; c < 2; ++c) {
#pragma unroll
            for (int i = 0; i < acc[m][c].num_elements; ++i) acc[m][c].x[i] = fmaf(sc, part[m][c].x[i], acc[m][c].x[i]);
            wmma::fill_fragment(part[m][c], 0.0f);
          }
        }
      }
    }
  }
  __syncthreads();  // the staging buffers become the accumulator tile
#pragma unroll
  for (int m = 0; m < NM; ++m)
#pragma unroll
    for (int c = 0; c < 2; ++c)
      wmma::store_matrix_sync(Cs + (m * kTileRows + rw) * kWmmaLdC + cw + 16 * c, acc[m][c], kWmmaLdC,
                              wmma::mem_row_major);
  __syncthreads();
  for (int e = tid; e < kTileRows * kTileCols; e += blockDim.x) {
    const int r = e / kTileCols, c = e % kTileCols;
    const int64_t n = int64_t(n0) + c;
    if (r >= rows || n >= Nout) continue;
    if constexpr (GU) {
      a.hb[(int64_t(j0) + r) * a.ldh + n] =
          __float2bfloat16_rn(silu_(Cs[r * kWmmaLdC + c]) * Cs[(kTileRows + r) * kWmmaLdC + c]);
    } else {
      const int64_t d = dst[r];
      if (d >= 0) a.y[d * a.H + n] = Cs[r * kWmmaLdC + c];
    }
  }
}

template <bool GU, bool F8>
__global__ void __launch_bounds__(kExpertThreads) experts_wmma_kernel(ExpertsArgs a) {
  wait_for_prior_kernels();
  __shared__ __align__(128) unsigned char smem[wmma_smem_bytes<GU>()];
  __shared__ int64_t src[kTileRows], dst[kTileRows];
  const int64_t items = int64_t(*a.ntiles) * a.fblocks;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int4 tile = a.tiles[item / a.fblocks];
    const int n0 = int(item % a.fblocks) * kTileCols;
    const ExpertEntry ex = a.ex[tile.x];
    const int64_t Nout = GU ? ex.inter : a.H;
    if (n0 >= Nout || ex.gate == nullptr) continue;  // the same for the whole block
    __syncthreads();
    tile_rows(a, tile.y, tile.z - tile.y, kTileRows, src, dst);
    __syncthreads();
    wmma_tile<GU, F8>(a, ex, tile.y, tile.z - tile.y, n0, smem, src, dst);
  }
}

// Large tiles of block-scaled FP8 experts on the FP8 tensor cores (W8A8, as the dense FP8 products
// and vLLM / SGLang compute Qwen's FP8 releases): x, and h after the gate/up pass, quantized per
// row and 128 consecutive k (scale amax / 448, nearest e4m3; quantize_rows_b128), times the e4m3
// weights with fp32 accumulation. Hopper runs FP8 only in its warpgroup products (wgmma; mma.sync
// on e4m3 is emulated through fp16 there).
// An item is up to 64 C rows of one expert's tile x 128 weight rows (GU: 64 of gate and the same 64
// of up, so that each lane holds the gate and up sums its h needs). The block is warp-specialized:
// kFp8ProducerWarps warps copy each 128-byte stage of k (one scale block) of the item's x (h) rows
// and weight rows into shared memory with cp.async, kFp8Stages stages ahead, and C consumer
// warpgroups take 64 rows each (m64n128k32 products from shared memory), so the weight tile a stage
// brings serves up to C x 64 rows: a prefill's tile streamed its weights from L2 once for each 64
// rows before, the bytes through L2 that bounded it (docs/perf.md). Full / empty mbarriers a stage
// stand between the two roles (cp.async.mbarrier.arrive for the copies, one arrival a consumer
// warp once its products are done); no barrier spans the block, so a consumer's scaling and
// epilogue overlap the others' products and the producers' next copies.
// Each 128-block of k sums apart in the tensor cores (their FP8 sums keep fewer bits than fp32)
// and joins the total times its scale s_b (the row's x scale times the weight block's): the
// accumulators hold total / s_b, multiplied by s_b / s_b+1 before the next block's products add
// to them and by the last s at the end, so one set of 64 sums a thread serves (DeepGEMM keeps a
// second set and adds each block's sums into it).
// Shared tiles are K-major with the 128-byte swizzle (cuda_wgmma_support.cuh), a stage's 128 bytes
// of k one swizzled row.
constexpr int kFp8Rows = 64;              // x (h) rows of a consumer warpgroup
constexpr int kFp8Cols = 128;             // weight rows of an item
constexpr int kFp8K = kScaleBlock;        // k (bytes) a stage of a row: one scale block, one swizzle row
constexpr int kFp8ProducerWarps = 4;      // (2 measured 5% slower at 8k tokens: their copy loops wait)
constexpr int kFp8ProducerThreads = 32 * kFp8ProducerWarps;
constexpr int kFp8Stages = 4;             // (5 measured no faster at 8k, and at 1k a block a SM)
constexpr int kFp8MaxConsumers = 3;       // 192 rows: nearly every expert of an 8k prefill (~160) in one item
constexpr float kFp8TinyScale = 1e-30f;   // a block scale below this counts as it (the ratios stay finite)

template <int C>
constexpr int fp8_threads() { return 128 * C + kFp8ProducerThreads; }
template <int C>
constexpr size_t fp8_stage_bytes() { return size_t(kFp8Rows * C + kFp8Cols) * kFp8K; }
// Stages (1024-byte aligned by hand: the dynamic shared memory's start is not), then the full and
// empty barriers, then the item's x row sources (GU).
template <int C>
constexpr size_t fp8_smem() { return 1024 + kFp8Stages * fp8_stage_bytes<C>() + 2 * kFp8Stages * 8 + kFp8Rows * C * 4; }

// d (+)= A B^T for A 64 x 32 and B 128 x 32 e4m3 in shared memory; `accumulate` false starts d.
__device__ __forceinline__ void wgmma_fp8(float (&d)[64], uint64_t da, uint64_t db, bool accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 " BALLAST_WGMMA_D64_LIST ", %64, %65, p, 1, 1;\n}\n"
      : BALLAST_WGMMA_D64
      : "l"(da), "l"(db), "r"(int(accumulate)));
#else
  __trap();  // the host takes these tiles only on sm_90 with sm_90a code (kWarpgroupMma)
#endif
}

// mbarriers in shared memory (the producer / consumer hand-off of the FP8 tiles' stages).
__device__ __forceinline__ void mbar_init(uint64_t* b, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(unsigned(__cvta_generic_to_shared(b))), "r"(count)
               : "memory");
}
// Waits until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* b, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}\n" ::"r"(unsigned(__cvta_generic_to_shared(b))),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* b) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(unsigned(__cvta_generic_to_shared(b))) : "memory");
}
// An arrival on b once this thread's cp.async copies issued so far have landed (counted in b's init).
__device__ __forceinline__ void cp_async_arrive(uint64_t* b) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(unsigned(__cvta_generic_to_shared(b)))
               : "memory");
}
// The producer warps alone (named barrier 1).
__device__ __forceinline__ void producers_sync() {
  asm volatile("bar.sync 1, %0;" ::"n"(kFp8ProducerThreads) : "memory");
}

// The scale of row sums of a 128-block: x's row scale times the weight block's, kept off zero.
__device__ __forceinline__ float fp8_block_scale(float xs, float ws) {
  const float s = xs * ws;
  return fabsf(s) < kFp8TinyScale ? kFp8TinyScale : s;
}

template <bool GU, int C>
__global__ void __launch_bounds__(fp8_threads<C>(), C == 1 ? 2 : 1) experts_fp8_kernel(ExpertsArgs a) {
  wait_for_prior_kernels();
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = unsigned(__cvta_generic_to_shared(smem_raw));
  unsigned char* smem = smem_raw + (((raw + 1023) & ~1023u) - raw);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kFp8Stages * fp8_stage_bytes<C>());
  uint64_t* empty = full + kFp8Stages;
  int32_t* srcs = reinterpret_cast<int32_t*>(empty + kFp8Stages);
  const int tid = threadIdx.x;
  if (tid == 0) {
    for (int s = 0; s < kFp8Stages; ++s) {
      mbar_init(full + s, kFp8ProducerThreads);
      mbar_init(empty + s, 4 * C);  // one arrival a consumer warp
    }
  }
  __syncthreads();
  const int64_t K = GU ? a.H : a.ldh, KB = K / kScaleBlock, nk = K / kFp8K;
  const int64_t items = int64_t(*a.ntiles) * a.fblocks;
  uint32_t it = 0;  // stages handed over so far (both roles count the same)
  const uint32_t tiles_base = unsigned(__cvta_generic_to_shared(smem));
  if (tid >= 128 * C) {
    // Producer warps: thread p copies the 16-byte chunk p % 8 of rows p / 8 + kStep i. Each item's
    // row addresses are worked out once, into registers: a stage is then one add and one copy a
    // row. (Worked out at every stage, ~20 instructions a copy, the producers' chain of
    // instructions took as long as the consumers' products and kept them waiting on full stages:
    // Nsight Compute, 16% of the samples at that wait.)
    const int p = tid - 128 * C, cr = p >> 3, cc = p & 7;
    constexpr int kStep = kFp8ProducerThreads / 8;
    constexpr int kXRows = kFp8Rows * C / kStep, kWRows = kFp8Cols / kStep;  // rows a thread copies
    // Row cr + kStep i of a stage: the same swizzle for every i (kStep is a multiple of 8).
    const uint32_t x_at = swizzled128(cr, cc), w_at = uint32_t(kFp8Rows * C * kFp8K) + swizzled128(cr, cc);
    static_assert(kStep % 8 == 0, "the swizzle repeats every 8 rows");
    for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
      const int4 tile = a.tiles[item / a.fblocks];
      const int64_t n0 = (item % a.fblocks) * (GU ? kFp8Cols / 2 : kFp8Cols);
      const ExpertEntry ex = a.ex[tile.x];
      const int64_t Nout = GU ? ex.inter : a.H;
      if (n0 >= Nout || ex.gate == nullptr) continue;  // (the consumers skip it alike)
      const int j0 = tile.y, rows = tile.z - tile.y;
      if constexpr (GU) {
        producers_sync();  // the previous item's copies are issued: its sources are read
        for (int r = p; r < rows; r += kFp8ProducerThreads) {
          int64_t src, dst;
          tile_row(a, int64_t(j0) + r, true, src, dst);
          srcs[r] = int32_t(src);
        }
        producers_sync();
      }
      // The rows' first chunks (k = 0) and whether each is read (else zeros: a bad perm entry's x
      // row, a weight row past N); x rows past the tile are not copied (never stored).
      const uint8_t* xrow[kXRows];
      const uint8_t* wrow[kWRows];
      uint32_t xread = 0, wread = 0;
      const int xrows = rows > cr ? (rows - cr + kStep - 1) / kStep : 0;
#pragma unroll
      for (int i = 0; i < kXRows; ++i) {
        const int r = cr + kStep * i;
        bool valid = i < xrows;
        if constexpr (GU) {
          valid = valid && srcs[r] >= 0;
          xrow[i] = a.xq + (valid ? int64_t(srcs[r]) * a.H : 0) + cc * 16;
        } else {
          xrow[i] = a.hq + (valid ? (int64_t(j0) + r) * a.ldh : 0) + cc * 16;
        }
        xread |= uint32_t(valid) << i;
      }
#pragma unroll
      for (int i = 0; i < kWRows; ++i) {
        const int c = cr + kStep * i;
        const void* w = GU ? (c < kFp8Cols / 2 ? ex.gate : ex.up) : ex.down;
        const int64_t n = n0 + (GU ? c % (kFp8Cols / 2) : c);
        const bool valid = n < Nout;
        wrow[i] = static_cast<const uint8_t*>(w) + (valid ? n * K : 0) + cc * 16;
        wread |= uint32_t(valid) << i;
      }
      for (int64_t kt = 0; kt < nk; ++kt, ++it) {
        const int s = int(it % kFp8Stages);
        mbar_wait(empty + s, ((it / kFp8Stages) & 1) ^ 1);  // (the first round passes at once)
        const uint32_t st = tiles_base + uint32_t(s * fp8_stage_bytes<C>());
        const int64_t k = kt * kFp8K;
#pragma unroll
        for (int i = 0; i < kXRows; ++i)
          if (i < xrows) cp_async16(st + x_at + i * kStep * kFp8K, xrow[i] + k, (xread >> i) & 1);
#pragma unroll
        for (int i = 0; i < kWRows; ++i) cp_async16(st + w_at + i * kStep * kFp8K, wrow[i] + k, (wread >> i) & 1);
        cp_async_arrive(full + s);
      }
    }
    cp_async_wait<0>();  // nothing in flight when the thread leaves
    return;
  }
  // Consumer warpgroup cw: rows 64 cw + wr + g and + 8 of each item.
  const int lane = tid & 31, g = lane >> 2, t = lane & 3, cw = tid >> 7;
  const int wr = 16 * ((tid >> 5) & 3);
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int4 tile = a.tiles[item / a.fblocks];
    const int64_t n0 = (item % a.fblocks) * (GU ? kFp8Cols / 2 : kFp8Cols);
    const ExpertEntry ex = a.ex[tile.x];
    const int64_t Nout = GU ? ex.inter : a.H;
    if (n0 >= Nout || ex.gate == nullptr) continue;
    const int j0 = tile.y, rows = tile.z - tile.y;
    const bool active = kFp8Rows * cw < rows;  // (a warpgroup with no rows of the item only hands stages back)
    // This thread's two rows: where their x (h) scales are (stride ld a 128-block) and their y rows.
    const float* xsr[2] = {nullptr, nullptr};
    int64_t dst[2] = {-1, -1};
    const int64_t ld = GU ? a.M : a.Np;
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int r = kFp8Rows * cw + wr + g + 8 * q;
      if (r >= rows) continue;
      int64_t src;
      tile_row(a, int64_t(j0) + r, false, src, dst[q]);
      if (GU && src >= 0) xsr[q] = a.xs + src;
      if (!GU) xsr[q] = a.hs + int64_t(j0) + r;
    }
    // Weight block scales: GU's first 64 columns are gate's, the rest up's.
    const float* wsg = (GU ? ex.s_gate : ex.s_down) + (n0 / kScaleBlock) * KB;
    const float* wsu = (GU ? ex.s_up : ex.s_down) + (n0 / kScaleBlock) * KB;
    // The scales of block b as loaded (the two rows' x scales, gate's and up's weight scale), and
    // s[q][m], the scale of its sums for row q and gate (m = 0) or up (m = 1). A block's are loaded
    // before the wait for the stage before it and multiplied only after that stage's products: used
    // at once, their loads' latency showed at every stage (Nsight Compute: ~9% of the samples; on
    // its own this measured even, the producers being the limit then).
    struct BlockScales {
      float x[2], g, u;
    };
    auto load_scales = [&](int64_t b) {
      BlockScales l;
      l.g = __ldg(wsg + b);
      l.u = __ldg(wsu + b);
#pragma unroll
      for (int q = 0; q < 2; ++q) l.x[q] = xsr[q] ? xsr[q][b * ld] : 1.0f;
      return l;
    };
    auto sum_scales = [](const BlockScales& l, float (&s)[2][2]) {
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        s[q][0] = fp8_block_scale(l.x[q], l.g);
        s[q][1] = fp8_block_scale(l.x[q], l.u);
      }
    };
    float acc[64], cur[2][2], next[2][2];
    sum_scales(load_scales(0), cur);
    for (int64_t kt = 0; kt < nk; ++kt, ++it) {
      const int s = int(it % kFp8Stages);
      const bool more = kt + 1 < nk;
      BlockScales ahead{};
      if (more) ahead = load_scales(kt + 1);  // in flight while this stage's products run
      mbar_wait(full + s, (it / kFp8Stages) & 1);
      if (active) {
        fence_async_shared();
        const uint32_t st = tiles_base + uint32_t(s * fp8_stage_bytes<C>());
        const uint64_t da = sw128_kmajor_desc(st + cw * kFp8Rows * kFp8K), db = sw128_kmajor_desc(st + kFp8Rows * C * kFp8K);
        wgmma_fence();
#pragma unroll
        for (int q = 0; q < kFp8K / 32; ++q) wgmma_fp8(acc, da + 2 * q, db + 2 * q, kt > 0 || q > 0);
        wgmma_commit();
        wgmma_wait_all();
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(empty + s);  // this warp's reads of the stage are done
      if (more) {
        sum_scales(ahead, next);
      } else {
#pragma unroll
        for (int q = 0; q < 2; ++q) next[q][0] = next[q][1] = 1.0f;
      }
      if (active) {
        // total / s_kt -> total / s_kt+1 (the last: the total). The ratios by the fast division
        // (2 ulp: nothing beside FP8's sums; IEEE division took ~40 instructions a stage).
#pragma unroll
        for (int i = 0; i < 16; ++i) {
          const int m = GU && i >= 8 ? 1 : 0;
          const float r0 = __fdividef(cur[0][m], next[0][m]), r1 = __fdividef(cur[1][m], next[1][m]);
          acc[4 * i + 0] *= r0;
          acc[4 * i + 1] *= r0;
          acc[4 * i + 2] *= r1;
          acc[4 * i + 3] *= r1;
        }
      }
#pragma unroll
      for (int q = 0; q < 2; ++q) cur[q][0] = next[q][0], cur[q][1] = next[q][1];
    }
    if (!active) continue;
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int r = kFp8Rows * cw + wr + g + 8 * q;
      if (r >= rows) continue;
      if constexpr (GU) {
        float* hr = a.h + (int64_t(j0) + r) * a.ldh + n0 + 2 * t;
#pragma unroll
        for (int i = 0; i < 8; ++i)
          if (n0 + 8 * i + 2 * t < Nout)
            *reinterpret_cast<float2*>(hr + 8 * i) =
                make_float2(silu_(acc[4 * i + 2 * q]) * acc[4 * (i + 8) + 2 * q],
                            silu_(acc[4 * i + 2 * q + 1]) * acc[4 * (i + 8) + 2 * q + 1]);
      } else {
        if (dst[q] < 0) continue;
        float* yr = a.y + dst[q] * a.H + n0 + 2 * t;
#pragma unroll
        for (int i = 0; i < 16; ++i)
          if (n0 + 8 * i + 2 * t < Nout)
            *reinterpret_cast<float2*>(yr + 8 * i) = make_float2(acc[4 * i + 2 * q], acc[4 * i + 2 * q + 1]);
      }
    }
  }
}

// ============================================================================================
// moe_combine
// ============================================================================================

// Choices in groups of 4: their rows, weights and y values are all loaded before any is added
// (the sums still in choice order, as the CPU's). A choice of weight 0 adds nothing: its y row may
// be loaded (no load waits on the weight's) but is not added, and its rows entry is no fault.
template <bool V4>
__global__ void combine_kernel(const float* y, int64_t M, const int32_t* rows,
                               const float* w, int64_t T, int64_t k, int64_t H, float* __restrict__ out,
                               Fault* fault) {
  wait_for_prior_kernels();
  using V = std::conditional_t<V4, float4, float>;
  constexpr int G = 4;
  const int64_t Hv = V4 ? H / 4 : H, total = T * Hv;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = idx / Hv, c = idx - t * Hv;
    V acc = reinterpret_cast<const V*>(out)[idx];
    for (int64_t j0 = 0; j0 < k; j0 += G) {
      int64_t r[G];
      float wj[G];
      V v[G];
#pragma unroll
      for (int q = 0; q < G; ++q) {
        const int64_t j = j0 + q;
        wj[q] = j < k ? w[t * k + j] : 0.0f;
        r[q] = j < k ? (rows ? rows[t * k + j] : t * k + j) : -1;
        if (r[q] >= M) {
          if (wj[q] != 0.0f) report(fault, cm::kCombineRow, t * k + j, r[q], M);
          r[q] = -1;
        }
        if (r[q] >= 0) v[q] = reinterpret_cast<const V*>(y)[r[q] * Hv + c];
      }
#pragma unroll
      for (int q = 0; q < G; ++q) {
        if (r[q] < 0 || wj[q] == 0.0f) continue;
        if constexpr (V4) {
          acc.x += wj[q] * v[q].x, acc.y += wj[q] * v[q].y, acc.z += wj[q] * v[q].z, acc.w += wj[q] * v[q].w;
        } else {
          acc += wj[q] * v[q];
        }
      }
    }
    reinterpret_cast<V*>(out)[idx] = acc;
  }
}

// ============================================================================================
// moe_routed
// ============================================================================================

// Few tokens (decode) in one pass: a cluster of blocks for each (token, choice, part of the
// intermediate size). Each block computes its share of h = silu(gate x) * up x, the cluster's blocks
// exchange their shares through distributed shared memory, and each block multiplies the part's h by
// its slice of down's rows; the last block to finish a slice of a token's output row (an arrival
// count) adds every choice's rows into out in top-k order. So grouping, the tile lists, the two
// expert passes and the combine are one kernel, no expert's rows wait for another's, and the sum is
// the same from run to run. A shared expert (moe_routed_add_norm's) is each token's first choice:
// one more cluster a token, its weight the sigmoid of its gate's logit, its rows the sum's first
// term; so the layer's two experts' passes are one launch with nothing beside it to join.
constexpr int kOnePassBlocks = 8;   // a cluster (the portable size)
constexpr int kOnePassWarps = 8;
constexpr int kOnePassThreads = 32 * kOnePassWarps;
constexpr int kOnePassLoads = 16;   // 16-byte weight loads a lane has in flight (8 for FP8: see the kernel)
constexpr int kOnePassMaxK = 32;    // choices a token
constexpr int kOnePassMaxTokens = 64;  // the arrival counts kept (kOnePassBlocks a token)

struct OnePassArgs {
  const float* x;          // [T, H]
  const int32_t* ids;      // [T, k]
  const float* weights;    // [T, k]
  const ExpertEntry* ex;   // [E], or [E + 1] with the shared expert at E
  float* part;             // [T * kk * parts, H]: each (choice, part)'s rows of down . h
  unsigned* arrivals;      // [T, kOnePassBlocks]: blocks done with each slice of a token's row (0 between launches)
  float* out;              // [T, H]
  int64_t H, I;            // every expert's
  int k, E, parts;
  Fault* fault;
  const float* shared_gate = nullptr;  // [T]: the shared expert's gate logits (null: none)
  int kk = 0;              // choices a token in the grid: k, + 1 with the shared expert (choice 0)
  // moe_routed_add_norm (res not null): the residual stream [T, H] gets out's sums added, out gets
  // (res + sums)(1 + w) and sums [T, ld] each slice's sum of the squares of res + sums.
  float* res = nullptr;
  const void* nw = nullptr;
  DType nwdt = DType::F32;
  float* sums = nullptr;
  int64_t ld = 0;
};

// Whether token t's choice j of the grid's kk adds anything: the same answer for every block that
// asks. With a shared expert, j = 0 is it and j > 0 the routed choice j - 1. A bad id is reported
// where `reports`.
__device__ __forceinline__ bool one_pass_choice(const OnePassArgs& a, int64_t t, int j, bool reports, int32_t& id,
                                                float& w) {
  if (a.shared_gate != nullptr) {
    if (j == 0) {
      id = a.E;
      w = sigmoidf_(load_after_wait(a.shared_gate + t));
      return w != 0.0f;
    }
    --j;
  }
  const int64_t c = t * a.k + j;
  id = load_after_wait(a.ids + c);
  w = load_after_wait(a.weights + c);
  if (w == 0.0f || id < 0) return false;
  if (id >= a.E) {
    if (reports) report(a.fault, cm::kOnePassId, c, id, a.E);
    return false;
  }
  if (a.ex[id].gate == nullptr) {
    if (reports) report(a.fault, cm::kOnePassNoWeights, c, id, 0);
    return false;
  }
  return true;
}

__device__ __forceinline__ void cluster_arrive() {
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory"); }

// W: f8e4m3 (block-scaled by 128 x 128) or __nv_bfloat16. DL: 16-byte loads a lane makes of a down
// row's part (its I / parts columns over 32 lanes; 1 where fewer lanes cover a row).
// Shared memory: x as float4s [H / (32 EL)][EL / 4][32] (a lane's EL floats of a k step, lane-major:
// no bank conflicts), h of the part [I / parts], this block's share [I / parts / 8], its rows of
// down . h [H / 8].
template <typename W, int DL>
__global__ void __cluster_dims__(kOnePassBlocks, 1, 1) __launch_bounds__(kOnePassThreads, 2)
    moe_routed_kernel(OnePassArgs a) {
  constexpr bool F8 = std::is_same_v<W, f8e4m3>;
  constexpr int EL = 16 / int(sizeof(W)), STEP = 32 * EL;
  // FP8's unpacking and block scales take the registers of half the loads (16 a lane spilled at
  // 128 registers).
  constexpr int LOADS = F8 ? kOnePassLoads / 2 : kOnePassLoads;
  constexpr int NB = 2, S = LOADS / (2 * NB);  // gate / up: NB rows of each, S steps of k, loaded together
  constexpr int RS = LOADS / DL;               // down: rows (or groups of rows) a batch
  extern __shared__ float4 smem[];
  __shared__ int last;
  __shared__ float wsum[kOnePassMaxK];
  const int rank = int(blockIdx.x);  // in the cluster (gridDim.x == kOnePassBlocks)
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t H = a.H, I = a.I, Ip = I / a.parts, Ib = Ip / kOnePassBlocks, RB = H / kOnePassBlocks;
  const int64_t c = blockIdx.y / a.parts, t = c / a.kk, n_first = rank * RB;
  const int p = int(blockIdx.y % a.parts);
  float4* xs = smem;
  float* hp = reinterpret_cast<float*>(smem + H / 4);
  float* hown = hp + Ip;
  float* ys = hown + Ib;
  wait_for_prior_kernels();
  // x's first float4s are asked for before the choice (they do not depend on it): their loads and
  // the lookup of the choice and its expert overlap.
  const float* xr = a.x + t * H;
  auto x_at = [&](int64_t q) -> float4& {
    const int64_t k = 4 * q, s = k / STEP, l = (k % STEP) / EL, f = (k % EL) / 4;
    return xs[(s * (EL / 4) + f) * 32 + l];
  };
  constexpr int XR = 4;  // float4s a thread (H <= 4,096; the rest after)
  float4 xv[XR];
#pragma unroll
  for (int r = 0; r < XR; ++r) {
    const int64_t q = threadIdx.x + int64_t(r) * kOnePassThreads;
    if (q < H / 4) xv[r] = load4_after_wait(xr + 4 * q);
  }
  int32_t id;
  float wc;
  const bool on = one_pass_choice(a, t, int(c % a.kk), rank == 0 && p == 0 && threadIdx.x == 0, id, wc);
  // Every choice's weight for the token (0: it adds nothing), which the last block's sums need:
  // looked up now beside this block's own choice, off the chain that ends the launch.
  for (int j = threadIdx.x; j < a.kk; j += kOnePassThreads) {
    int32_t idj;
    float wj;
    wsum[j] = one_pass_choice(a, t, j, false, idj, wj) ? wj : 0.0f;
  }
  if (on) {  // (the same for the whole cluster)
    const ExpertEntry ex = a.ex[id];
#pragma unroll
    for (int r = 0; r < XR; ++r) {
      const int64_t q = threadIdx.x + int64_t(r) * kOnePassThreads;
      if (q < H / 4) x_at(q) = xv[r];
    }
    for (int64_t q = threadIdx.x + XR * kOnePassThreads; q < H / 4; q += kOnePassThreads)
      x_at(q) = load4_after_wait(xr + 4 * q);
    __syncthreads();

    // This block's share of h: rows i_first .. + Ib of gate and up, NB of each a warp at a time.
    const int64_t ST = H / STEP, HB = cdiv(H, kScaleBlock), i_first = p * Ip + rank * Ib;
    const W* gate = static_cast<const W*>(ex.gate);
    const W* up = static_cast<const W*>(ex.up);
    for (int64_t i0 = int64_t(warp) * NB; i0 < Ib; i0 += kOnePassWarps * NB) {
      float acc[NB][2] = {};
      for (int64_t s0 = 0; s0 < ST; s0 += S) {
        Words<4> raw[NB][2][S];
        float sc[NB][2][S];
#pragma unroll
        for (int r = 0; r < NB; ++r)
#pragma unroll
          for (int m = 0; m < 2; ++m)
#pragma unroll
            for (int s = 0; s < S; ++s) {
              raw[r][m][s] = Words<4>{};
              sc[r][m][s] = 0.0f;
              if (i0 + r < Ib && s0 + s < ST) {
                const int64_t row = i_first + i0 + r, k = (s0 + s) * STEP + lane * EL;
                raw[r][m][s] = load_words<4>((m ? up : gate) + row * H + k);
                if constexpr (F8)
                  sc[r][m][s] = __ldg((m ? ex.s_up : ex.s_gate) + (row / kScaleBlock) * HB + k / kScaleBlock);
              }
            }
#pragma unroll
        for (int s = 0; s < S; ++s) {
          if (s0 + s >= ST) break;
          float xv[EL];
#pragma unroll
          for (int f = 0; f < EL / 4; ++f) {
            const float4 v = xs[((s0 + s) * (EL / 4) + f) * 32 + lane];
            xv[4 * f] = v.x, xv[4 * f + 1] = v.y, xv[4 * f + 2] = v.z, xv[4 * f + 3] = v.w;
          }
#pragma unroll
          for (int r = 0; r < NB; ++r)
#pragma unroll
            for (int m = 0; m < 2; ++m) {
              float wv[EL];
              unpack_words<W, 4>(raw[r][m][s], wv);
              float d = 0.0f;
#pragma unroll
              for (int e = 0; e < EL; ++e) d = fmaf(wv[e], xv[e], d);
              acc[r][m] = F8 ? fmaf(sc[r][m][s], d, acc[r][m]) : acc[r][m] + d;
            }
        }
      }
#pragma unroll
      for (int r = 0; r < NB; ++r) {
        const float g = warp_sum(acc[r][0]), u = warp_sum(acc[r][1]);
        if (lane == 0 && i0 + r < Ib) hown[i0 + r] = silu_(g) * u;
      }
    }

    // Down: rows n_first .. + RB, the part's columns. A row's Ip / EL chunks over LW lanes (DL
    // loads each), G rows a warp-load where a row has fewer than 32 chunks.
    const int LPR = int(Ip / EL), LW = LPR < 32 ? LPR : 32, G = 32 / LW, sub = lane / LW, lw = lane % LW;
    const int64_t RPB = int64_t(RS) * G, IB = cdiv(I, kScaleBlock), stride = int64_t(kOnePassWarps) * RPB;
    const W* down = static_cast<const W*>(ex.down);
    Words<4> raw[LOADS];
    float sc[LOADS];
    auto load_down = [&](int64_t n0) {
#pragma unroll
      for (int u = 0; u < LOADS; ++u) {
        const int64_t nl = n0 + (u / DL) * G + sub;
        raw[u] = Words<4>{};
        sc[u] = 0.0f;
        if (nl < RB) {
          const int64_t n = n_first + nl, col = p * Ip + (lw + (u % DL) * LW) * EL;
          raw[u] = load_words<4>(down + n * I + col);
          if constexpr (F8) sc[u] = __ldg(ex.s_down + (n / kScaleBlock) * IB + col / kScaleBlock);
        }
      }
    };
    int64_t n0 = int64_t(warp) * RPB;
    if (n0 < RB) load_down(n0);  // (down's first rows stream while the cluster waits for h)
    cluster_arrive();
    cluster_wait();  // every block's share of h written
    for (int64_t q = threadIdx.x; q < Ip; q += kOnePassThreads) {
      const int r = int(q / Ib);
      const float* theirs = cooperative_groups::this_cluster().map_shared_rank(hown, r);
      hp[q] = theirs[q - r * Ib];
    }
    cluster_arrive();  // done reading the others' shares (each waits for this before it exits)
    __syncthreads();
    float hv[DL][EL];
#pragma unroll
    for (int q = 0; q < DL; ++q)
#pragma unroll
      for (int e = 0; e < EL; ++e) hv[q][e] = hp[(lw + q * LW) * EL + e];
    while (n0 < RB) {
#pragma unroll
      for (int rs = 0; rs < RS; ++rs) {
        float d = 0.0f;
#pragma unroll
        for (int q = 0; q < DL; ++q) {
          float wv[EL];
          unpack_words<W, 4>(raw[rs * DL + q], wv);
          float e_sum = 0.0f;
#pragma unroll
          for (int e = 0; e < EL; ++e) e_sum = fmaf(wv[e], hv[q][e], e_sum);
          d = F8 ? fmaf(sc[rs * DL + q], e_sum, d) : d + e_sum;
        }
        for (int o = LW / 2; o > 0; o /= 2) d += __shfl_xor_sync(0xffffffffu, d, o);
        const int64_t nl = n0 + rs * G + sub;
        if (lw == 0 && nl < RB) ys[nl] = d;
      }
      n0 += stride;
      if (n0 < RB) load_down(n0);
    }
    __syncthreads();
    float* mine = a.part + (c * a.parts + p) * H + n_first;
    for (int64_t q = threadIdx.x; q < RB; q += kOnePassThreads) mine[q] = ys[q];
  }

  // The last block of the token's slice adds every choice's rows, in order, into out. The barrier
  // orders every thread's rows before thread 0's arrival, whose release publishes them and whose
  // acquire (in the last block) orders the others' before the loads after the next barrier (one
  // add, where a fence a thread on each side and a relaxed add took three round trips).
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned before;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;"
                 : "=r"(before) : "l"(a.arrivals + t * kOnePassBlocks + rank) : "memory");
    last = before + 1 == unsigned(a.kk * a.parts);
  }
  __syncthreads();
  if (last) {
    // The slice's (choice, part) rows, kPartBatch of a thread's loads in flight at once (one at a
    // time they were a chain of k x parts round trips ending every launch), summed in the same
    // order as ever (each choice's parts, then its weight times them into out): the same bits.
    constexpr int kPartBatch = 32;
    const int rows = a.kk * a.parts;
    const float* slice = a.part + t * rows * H + n_first;  // (choice j, part pp) at row j * parts + pp
    float v[kPartBatch];
    auto fetch = [&](int64_t q, int u0) {
#pragma unroll
      for (int i = 0; i < kPartBatch; ++i) v[i] = u0 + i < rows ? __ldcg(slice + (u0 + i) * H + q) : 0.0f;
    };
    float sq = 0.0f;  // moe_routed_add_norm: the squares of the thread's sums
    for (int64_t q = threadIdx.x; q < RB; q += kOnePassThreads) {
      fetch(q, 0);
      const int64_t at = t * H + n_first + q;
      float acc = a.shared_gate ? 0.0f : load_after_wait(a.out + at), y = 0.0f;  // (the shared expert's rows replace it)
      const float r = a.res ? load_after_wait(a.res + at) : 0.0f;  // (beside the rows' loads)
      int j = 0, pp = 0;
      for (int u0 = 0; u0 < rows; u0 += kPartBatch) {
        if (u0 > 0) fetch(q, u0);
#pragma unroll
        for (int i = 0; i < kPartBatch; ++i) {
          if (u0 + i >= rows) break;
          if (pp == 0) y = 0.0f;
          y += v[i];
          if (++pp == a.parts) {
            if (wsum[j] != 0.0f) acc += wsum[j] * y;
            pp = 0, ++j;
          }
        }
      }
      if (a.res) {
        const float v = r + acc;
        a.res[at] = v;
        a.out[at] = v * (1.0f + cuda::load_as_float(a.nw, a.nwdt, n_first + q));
        sq += v * v;
      } else {
        a.out[at] = acc;
      }
    }
    if (a.res) {  // the slice's sum of squares, its warps' in order (the same bits every run)
      __shared__ float warp_sq[kOnePassWarps];
      sq = warp_sum(sq);
      if (lane == 0) warp_sq[warp] = sq;
      __syncthreads();
      if (threadIdx.x == 0) {
        float b = 0.0f;
#pragma unroll
        for (int w = 0; w < kOnePassWarps; ++w) b += warp_sq[w];
        a.sums[t * a.ld + rank] = b;
      }
    }
    if (threadIdx.x == 0) a.arrivals[t * kOnePassBlocks + rank] = 0;  // for the next launch
  }
  if (on) cluster_wait();  // the others are done with this block's share: its shared memory may go
}

// ============================================================================================
// gather_routed
// ============================================================================================

constexpr int kRoutedMaxSources = 64;
struct RoutedArgs {
  const char* rows[kRoutedMaxSources];
  const int32_t* counts[kRoutedMaxSources];
  long long held[kRoutedMaxSources];
};

// blockIdx.y = source s. Every block reads the counts it needs (G + s integers), then the blocks
// of a source copy its span in 16-byte words (bytes where the row size or an address is odd).
template <bool V16>
__global__ void gather_routed_kernel(RoutedArgs a, int me, long long row_bytes, char* __restrict__ out,
                                     long long out_rows, int32_t* recv_counts, Fault* fault) {
  wait_for_prior_kernels();
  const int s = blockIdx.y;
  __shared__ long long span[3];  // skip, n, at
  if (threadIdx.x == 0) {
    // A source's span past its rows is the fault to name; where an earlier source's is, this
    // source's place in out follows from a bad count and is not reported (the blocks of different
    // sources report in no set order: only the first report is kept).
    auto span_of = [&](int q, long long& skip) {
      skip = 0;
      for (int d = 0; d < me; ++d) skip += a.counts[q][d];
      const long long n = a.counts[q][me];
      return n >= 0 && skip >= 0 && skip + n <= a.held[q];
    };
    long long skip = 0, at = 0, earlier_skip = 0;
    bool earlier_ok = true;
    for (int q = 0; q < s; ++q) {
      at += a.counts[q][me];
      earlier_ok = span_of(q, earlier_skip) && earlier_ok;
    }
    long long n = a.counts[s][me];
    if (!span_of(s, skip)) {
      if (blockIdx.x == 0) report(fault, cm::kRoutedSource, s, skip + n, a.held[s]);
      n = skip < 0 || skip > a.held[s] ? 0 : max(0ll, min(n, a.held[s] - skip));
    }
    if (at < 0 || at + n > out_rows) {
      if (blockIdx.x == 0 && earlier_ok) report(fault, cm::kRoutedOut, s, at + n, out_rows);
      n = at < 0 || at > out_rows ? 0 : min(n, out_rows - at);
    }
    if (blockIdx.x == 0) recv_counts[s] = int32_t(n);  // what moved
    span[0] = skip, span[1] = n, span[2] = at;
  }
  __syncthreads();
  using W = std::conditional_t<V16, int4, char>;
  const long long words = span[1] * row_bytes / (long long)sizeof(W);
  const W* src = reinterpret_cast<const W*>(a.rows[s] + span[0] * row_bytes);
  W* dst = reinterpret_cast<W*>(out + span[2] * row_bytes);
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < words; i += (long long)gridDim.x * blockDim.x)
    dst[i] = src[i];
}

}  // namespace

// ============================================================================================
// The ops
// ============================================================================================

void CudaOps::topk_softmax(const Tensor& logits, int k, bool normalize, const Tensor& routed, Tensor& ids,
                           Tensor& weights) {
  auto timed = time_op("topk_softmax");
  MoeState& st = moe_state(moe_state_, counters_);
  st.raise_pending();
  const auto [T, E] = check_topk_softmax(logits, k, routed, ids, weights);
  check(E <= kTopkMaxE && k <= kTopkMaxK, "topk_softmax: {} experts, k={}: this backend takes at most {} and {}", E, k,
        kTopkMaxE, kTopkMaxK);
  expect_device("topk_softmax", "logits", logits);
  expect_device("topk_softmax", "ids", ids);
  expect_device("topk_softmax", "weights", weights);
  if (routed.defined()) expect_device("topk_softmax", "routed", routed);
  if (T == 0) return;
  if (T <= kTopkRowBlockRowsMax && topk_rows_enabled()) {
    const int V = E <= kTopkMaxE / 2 ? 1 : 2, threads = int(cdiv(E, 32 * V)) * 32;
    launch(V == 1 ? topk_softmax_rows_kernel<1> : topk_softmax_rows_kernel<2>, unsigned(T), unsigned(threads), 0,
           stream_, cuda::f32(logits), routed.defined() ? cuda::i32(routed) : nullptr, int(E), k, normalize,
           cuda::i32_mut(ids), cuda::f32_mut(weights));
    check_launch("topk_softmax");
    st.after(stream_);
    return;
  }
  const unsigned grid = unsigned(blocks_for(T, kTopkWarps));
  auto launch_for = [&](auto per) {
    launch(topk_softmax_kernel<decltype(per)::value>, grid, kTopkWarps * 32, 0, stream_, cuda::f32(logits),
           routed.defined() ? cuda::i32(routed) : nullptr, T, int(E), k, normalize, cuda::i32_mut(ids),
           cuda::f32_mut(weights));
  };
  if (E <= 128)
    launch_for(std::integral_constant<int, 4>{});
  else if (E <= 256)
    launch_for(std::integral_constant<int, 8>{});
  else if (E <= 512)
    launch_for(std::integral_constant<int, 16>{});
  else
    launch_for(std::integral_constant<int, 32>{});
  check_launch("topk_softmax");
  st.after(stream_);
}

void CudaOps::dispatch(const DispatchTables& tables, const Tensor& ids, const Tensor& counts_by_rank, Tensor& slots) {
  auto timed = time_op("dispatch");
  MoeState& st = moe_state(moe_state_, counters_);
  st.raise_pending();
  const DispatchShape shape = check_dispatch(tables, ids, counts_by_rank, slots);
  const int64_t N = shape.N, E = shape.E;
  expect_device("dispatch", "ids", ids);
  expect_device("dispatch", "slots", slots);
  switch (tables.policy) {
    case eplb::Dispatch::static_: {
      expect_device("dispatch", "static_slot", tables.static_slot);
      if (N == 0) return;
      launch(dispatch_static_kernel, blocks_for(N, 256), 256, 0, stream_, cuda::i32(ids), N,
             cuda::i32(tables.static_slot), E, cuda::i32_mut(slots), st.fault);
      check_launch("dispatch");
      break;
    }
    case eplb::Dispatch::random: {
      expect_device("dispatch", "replica_count", tables.replica_count);
      expect_device("dispatch", "replicas", tables.replicas);
      expect_device("dispatch", "pass_seed", tables.pass_seed);
      const int64_t R = shape.R;
      if (N == 0) return;
      launch(dispatch_random_kernel, blocks_for(N, 256), 256, 0, stream_, cuda::i32(ids), N, cuda::i32(tables.replicas),
             cuda::i32(tables.replica_count), E, R, static_cast<const int64_t*>(tables.pass_seed.raw()), tables.layer,
             tables.rank, cuda::i32_mut(slots), st.fault);
      check_launch("dispatch");
      break;
    }
    case eplb::Dispatch::balanced: {
      expect_device("dispatch", "phy2log", tables.phy2log);
      expect_device("dispatch", "counts_by_rank", counts_by_rank);
      const int64_t P = shape.P;
      // This backend's limits: the balanced kernel is one block over every expert and slot.
      check(E >= 1 && E + P + tables.ranks < (int64_t(1) << 28), "dispatch: balanced over {} experts and {} slots", E,
            P);
      if (N == 0) return;
      const int Ei = int(E), Pi = int(P), G = tables.ranks;
      cm::balanced::Global g;
      const size_t gbytes = cm::balanced::global_layout(nullptr, Ei, Pi, G, nullptr);
      cm::balanced::global_layout(scratch_->bytes(gbytes), Ei, Pi, G, &g);
      const size_t smem = cm::balanced::shared_layout(nullptr, Ei, Pi, G, kBalancedThreads, nullptr);
      smem_.allow(&dispatch_balanced_kernel, smem, "dispatch");
      cm::balanced::Args a{cuda::i32(tables.phy2log), cuda::i32(counts_by_rank), cuda::i32(ids),
                              cuda::i32_mut(slots), N, Ei, Pi, G, tables.slots_per_rank, tables.rank};
      launch(dispatch_balanced_kernel, 1, kBalancedThreads, smem, stream_, a, g, st.fault);
      check_launch("dispatch");
      break;
    }
  }
  st.after(stream_);
}

void CudaOps::histogram(const Tensor& keys, Tensor& counts) {
  auto timed = time_op("histogram");
  MoeState& st = moe_state(moe_state_, counters_);
  st.raise_pending();
  check_histogram(keys, counts);
  expect_device("histogram", "keys", keys);
  expect_device("histogram", "counts", counts);
  const int64_t N = keys.numel(), bins = counts.numel();
  if (N == 0) return;
  const bool shared = bins <= kHistSharedBins;
  const int64_t per_block = shared ? std::max<int64_t>(4096, bins) : 4096;
  const unsigned grid = unsigned(std::min<int64_t>(cdiv(N, per_block), int64_t(device_.sms) * 4));
  launch(histogram_kernel, grid, 256, shared ? size_t(bins) * sizeof(int) : 0, stream_, cuda::i32(keys), N,
         cuda::i32_mut(counts), bins, shared, st.fault);
  check_launch("histogram");
  st.after(stream_);
}

void CudaOps::group_by(const Tensor& keys, const Tensor& valid, int div, int groups, Tensor& perm, Tensor& counts,
                       Tensor& offsets, Tensor& inverse) {
  auto timed = time_op("group_by");
  MoeState& st = moe_state(moe_state_, counters_);
  st.raise_pending();
  const int64_t N = check_group_by(keys, valid, div, groups, perm, counts, offsets, inverse);
  check(N < (int64_t(1) << 31) - 1 && groups < (1 << 30), "group_by: {} keys in {} groups", N, groups);
  expect_device("group_by", "keys", keys);
  expect_device("group_by", "perm", perm);
  expect_device("group_by", "counts", counts);
  expect_device("group_by", "offsets", offsets);
  if (inverse.defined()) expect_device("group_by", "inverse", inverse);
  if (valid.defined()) expect_device("group_by", "valid", valid);
  const int32_t* vp = valid.defined() ? cuda::i32(valid) : nullptr;
  const int64_t vn = valid.defined() ? valid.numel() : 0;
  if (N == 0) {
    launch(group_empty_kernel, blocks_for(int64_t(groups) + 1, 256), 256, 0, stream_, vp, vn, groups,
           cuda::i32_mut(counts), cuda::i32_mut(offsets), st.fault);
    check_launch("group_by");
    st.after(stream_);
    return;
  }
  if (N <= kGroupSmallKeys && groups < kGroupSmallBins) {
    launch(group_small_kernel, 1, kGroupSmallThreads, 0, stream_, cuda::i32(keys), int(N), vp, vn, div, groups,
           cuda::i32_mut(perm), cuda::i32_mut(counts), cuda::i32_mut(offsets),
           inverse.defined() ? cuda::i32_mut(inverse) : nullptr, st.fault);
    check_launch("group_by");
    st.after(stream_);
    return;
  }
  // Keys are groups 0 .. groups - 1 and `groups` for those left out: end_bit bits.
  int end_bit = 0;
  while ((uint64_t(1) << end_bit) <= uint64_t(groups)) ++end_bit;
  size_t temp = 0;
  check_cuda(cub::DeviceRadixSort::SortPairs(nullptr, temp, static_cast<const uint32_t*>(nullptr),
                                             static_cast<uint32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                             static_cast<int32_t*>(nullptr), int(N), 0, end_bit, stream_),
             "group_by: radix sort size");
  Carve measure;
  measure.take<uint32_t>(size_t(N));
  measure.take<uint32_t>(size_t(N));
  measure.take<int32_t>(size_t(N));
  measure.take<int32_t>(size_t(N));
  measure.take<char>(temp);
  Carve carve(scratch_->bytes(measure.size()));
  uint32_t* kin = carve.take<uint32_t>(size_t(N));
  uint32_t* kout = carve.take<uint32_t>(size_t(N));
  int32_t* vin = carve.take<int32_t>(size_t(N));
  int32_t* vout = carve.take<int32_t>(size_t(N));
  char* tmp = carve.take<char>(temp);
  const unsigned grid = unsigned(std::min<int64_t>(blocks_for(N, 256), int64_t(device_.sms) * 8));
  launch(group_keys_kernel, grid, 256, 0, stream_, cuda::i32(keys), N, vp, vn, div, groups, kin, vin, st.fault);
  check_launch("group_by");
  check_cuda(cub::DeviceRadixSort::SortPairs(tmp, temp, kin, kout, vin, vout, int(N), 0, end_bit, stream_),
             "group_by: radix sort");
  check_launch("group_by");
  launch(group_offsets_kernel, blocks_for(int64_t(groups) + 1, 256), 256, 0, stream_, kout, N, groups,
         cuda::i32_mut(counts), cuda::i32_mut(offsets));
  check_launch("group_by");
  launch(group_scatter_kernel, grid, 256, 0, stream_, kout, vout, N, groups, cuda::i32_mut(perm),
         inverse.defined() ? cuda::i32_mut(inverse) : nullptr);
  check_launch("group_by");
  st.after(stream_);
}

namespace {

// What every expert with weights shares, as moe_experts and moe_routed choose their kernels by it.
struct ExpertsSummary {
  bool any = false;         // some expert has weights
  bool bf16 = true;         // ... all of them BF16
  bool f8 = true;           // ... all block-scaled FP8 with an intermediate size of whole 16s
  bool same_inter = true;   // ... all of one intermediate size (imax)
  bool rows16 = true;       // ... all 16-byte aligned, rows of whole 16-byte loads (16 elements for FP8, else 8)
  int64_t imax = 0;
};

// Expert g's entry (zeros for no weights) added to entries and to what they share (s).
void add_expert_entry(const char* op, const SwigluWeights& w, size_t g, int64_t H, std::vector<ExpertEntry>& entries,
                      ExpertsSummary& s) {
  entries.push_back(ExpertEntry{});
  if (!w.gate.defined()) return;  // an empty group's (rows for it are the kernels' to report)
  const int64_t I = w.gate.dim(0);
  check(w.gate.device() == Device::CUDA && w.up.device() == Device::CUDA && w.down.device() == Device::CUDA,
        "{}: expert {}'s weights are not in CUDA memory", op, g);
  // One dtype of gate and up per expert entry (ExpertEntry): the kernels read both alike.
  check(w.up.dtype() == w.gate.dtype(),
        "{}: expert {} has gate {} up {} down {}: expected F32, BF16, F16, F8_E4M3 or F8_E4M3_B128, gate and up "
        "alike", op, g, dtype_name(w.gate.dtype()), dtype_name(w.up.dtype()), dtype_name(w.down.dtype()));
  auto scales = [&](const Tensor& t) -> const float* {
    if (t.dtype() != DType::F8_E4M3_B128) return nullptr;
    check(t.scales().device() == Device::CUDA, "{}: expert {}'s block scales are not in CUDA memory", op, g);
    return cuda::f32(t.scales());
  };
  entries.back() = ExpertEntry{w.gate.raw(),    w.up.raw(),    w.down.raw(), scales(w.gate),
                               scales(w.up),    scales(w.down), I,           int32_t(w.gate.dtype()),
                               int32_t(w.down.dtype())};
  s.same_inter = s.same_inter && (!s.any || I == s.imax);
  s.imax = std::max(s.imax, I);
  s.any = true;
  s.bf16 = s.bf16 && w.gate.dtype() == DType::BF16 && w.down.dtype() == DType::BF16;
  s.f8 = s.f8 && w.gate.dtype() == DType::F8_E4M3_B128 && w.down.dtype() == DType::F8_E4M3_B128 && I % 16 == 0;
  // (Vectorised FP8 steps over 16 elements: rows of a multiple of 16.)
  const int64_t step = dtype_size(w.gate.dtype()) == 1 || dtype_size(w.down.dtype()) == 1 ? 16 : 8;
  s.rows16 = s.rows16 && I % step == 0 && H % step == 0 && aligned16(w.gate.raw()) && aligned16(w.up.raw()) &&
             aligned16(w.down.raw());
}

// The experts as the kernels see them (entries[g]; zeros for an expert with no weights) for rows of
// H, shapes and dtypes checked by the op's checks; throws, naming `op`, where weights are not in
// CUDA memory or an expert's gate and up differ in dtype.
ExpertsSummary expert_entries(const char* op, std::span<const SwigluWeights> experts, int64_t H,
                              std::vector<ExpertEntry>& entries) {
  ExpertsSummary s;
  entries.clear();
  entries.reserve(experts.size() + 1);  // (+ moe_routed's shared expert)
  for (size_t g = 0; g < experts.size(); ++g) add_expert_entry(op, experts[g], g, H, entries, s);
  return s;
}

}  // namespace

void CudaOps::moe_experts(const Tensor& x, const Tensor& perm, const Tensor& offsets, int row_div,
                          std::span<const SwigluWeights> experts, Tensor& y) {
  auto timed = time_op("moe_experts");
  MoeState& st = moe_state(moe_state_, counters_);
  st.raise_pending();
  const auto [M, H, Ny] = check_moe_experts(x, perm, offsets, row_div, experts, y);
  expect_device("moe_experts", "x", x);
  expect_device("moe_experts", "y", y);
  expect_device("moe_experts", "perm", perm);
  expect_device("moe_experts", "offsets", offsets);
  const int groups = int(experts.size());
  const int64_t Np = perm.numel();
  check(Np < (int64_t(1) << 31) - kFp8Rows, "moe_experts: perm {} too long", perm);
  if (Np == 0 || groups == 0 || H == 0) return;

  std::vector<ExpertEntry>& entries = st.staging;
  const ExpertsSummary sum = expert_entries("moe_experts", experts, H, entries);
  if (!sum.any) return;  // no group can have rows (the tile pass would only report it)
  const int64_t imax = sum.imax;
  const bool bf16 = sum.bf16, f8 = sum.f8 && H % 16 == 0, same_inter = sum.same_inter;
  const bool vec = sum.rows16 && H % 8 == 0 && aligned16(x.raw());
  const ExpertEntry* table = st.experts(experts.data(), entries, stream_);

  // The tensor-core path wants 16-byte rows of bf16 (or block-scaled FP8) weights and of fp32 x and h.
  const bool tensor_cores = bf16_matmul_ && (bf16 || f8) && vec && imax % 8 == 0;
  // Block-scaled FP8 on the FP8 tensor cores (x and h quantized per row and 128-block) where x and h
  // rows are whole 128-blocks (h's rows all one expert size) and the tile's row scales fit.
  const bool fp8_tc = kWarpgroupMma && device_.hopper() && tensor_cores && f8 && same_inter && H % kScaleBlock == 0 && imax % kScaleBlock == 0 &&
                      aligned16(y.raw());

  const int small_max = tensor_cores ? kSmallMaxTc : kSmallMax;
  const int64_t tokens = cdiv(Np, int64_t(row_div));
  // Small tiles of block-scaled FP8 on the FP8 tensor cores (mma.sync) beside the large FP8 tiles
  // (more than small_max tokens; they read the x and h those quantize): tiles of up to 8 rows (the
  // MMA's 8 columns cost the same filled or not), so an expert's weights stream once for up to 8
  // rows. 80B FP8, batch 32: 811 -> 944 tok/s. With
  // 8 tokens or fewer (groups of one or two rows) the CUDA-core tiles measured faster (batch 1 / 8:
  // 233 / 520 tok/s with them, 195 / 484 with these and an FP8 tensor-core few-row product together).
  const bool fp8_small = fp8_tc && tokens > small_max;
  // Few x rows (decode: at most small_max tokens, each choosing distinct experts, so no group has
  // more rows than that): every group takes small tiles, whatever its size, and the large-tile
  // launches (and x's rounding for them) are left out. A group larger than that after all is still
  // right, only streamed more than once.
  const bool large_tiles = tokens > small_max;
  // Small tiles as tall as a group is likely to be (twice the mean rows a group, a power of two) and
  // no taller than the tokens are many: in decode most groups hold one row, and a taller tile wastes
  // registers and leaves the raw-words path (<= 2 rows); a hot group past that height takes more
  // tiles (its weights streamed again). 80B FP8, tiles of at most 1 / 2 / 8 rows: batch 8 567 /
  // 542 / 464 tok/s, batch 32 750 / 745 / 686, batch 128 852 / 946 / 1,089.
  if (tensor_cores && large_tiles)  // (decode's small tiles are the same kernels either way)
    timed.op = bf16 ? "moe_experts (bf16)"
               : fp8_tc ? "moe_experts (FP8 tensor cores)"
                        : "moe_experts (FP8 weights, bf16 tensor cores)";
  const int64_t likely = std::min(tokens, std::max<int64_t>(1, cdiv(2 * Np, int64_t(groups))));
  int small_rows = kSmallRows;
  while (!fp8_small && small_rows / 2 >= likely) small_rows /= 2;
  // Scratch, from the shapes: h [Np, imax], the tile lists, their two counts.
  const int64_t cap_small = cdiv(Np, int64_t(small_rows)) + std::min<int64_t>(groups, Np);
  // The FP8 tiles' consumer warpgroups (64 rows each): as many as a group's mean rows fill, so that a
  // prefill's experts (~160 rows each at 8k tokens of the 80B shape) stream their weights once, and
  // short groups leave no warpgroup idle.
  const int fp8_consumers =
      int(std::clamp<int64_t>(cdiv(cdiv(Np, int64_t(groups)), int64_t(kFp8Rows)), 1, kFp8MaxConsumers));
  const int large_rows = fp8_tc ? kFp8Rows * fp8_consumers : kTileRows;
  const int64_t cap_large = cdiv(Np, int64_t(large_rows)) + std::min<int64_t>(groups, Np / (small_max + 1) + 1);
  const int64_t ldh = std::max<int64_t>(imax, 1);
  // With the tensor cores, bf16 copies of x and of the large tiles' h.
  const bool bf16_tiles = tensor_cores && !fp8_tc;
  const size_t nxb = bf16_tiles ? size_t(M) * size_t(H) : 0, nhb = bf16_tiles ? size_t(Np) * size_t(ldh) : 0;
  // With the FP8 tensor cores, x and h quantized: e4m3 values and a scale per row and 128-block.
  const size_t nxq = fp8_tc && large_tiles ? size_t(M) * size_t(H) : 0, nhq = fp8_tc && large_tiles ? size_t(Np) * size_t(ldh) : 0;
  Carve measure;
  measure.take<float>(size_t(Np) * size_t(ldh));
  measure.take<int4>(size_t(cap_small));
  measure.take<int4>(size_t(cap_large));
  measure.take<int>(2);
  measure.take<__nv_bfloat16>(nxb);
  measure.take<__nv_bfloat16>(nhb);
  measure.take<uint8_t>(nxq);
  measure.take<float>(nxq / kScaleBlock);
  measure.take<uint8_t>(nhq);
  measure.take<float>(nhq / kScaleBlock);
  Carve carve(scratch_->bytes(measure.size()));
  float* h = carve.take<float>(size_t(Np) * size_t(ldh));
  int4* small = carve.take<int4>(size_t(cap_small));
  int4* large = carve.take<int4>(size_t(cap_large));
  int* ntiles = carve.take<int>(2);
  __nv_bfloat16* xb = carve.take<__nv_bfloat16>(nxb);
  __nv_bfloat16* hb = carve.take<__nv_bfloat16>(nhb);
  uint8_t* xq = carve.take<uint8_t>(nxq);
  float* xs = carve.take<float>(nxq / kScaleBlock);
  uint8_t* hq = carve.take<uint8_t>(nhq);
  float* hs = carve.take<float>(nhq / kScaleBlock);
  constexpr int64_t kRoundInTiles = 65536;  // elements of x the tile pass rounds itself
  const bool round = bf16_tiles && large_tiles;
  if (nxq > 0) quantize_rows_b128(cuda::f32(x), M, M, H, xq, xs, stream_);
  if (round && M * H > kRoundInTiles) round_to_16bit(cuda::f32(x), xb, M * H, stream_);
  launch(expert_tiles_kernel, 1, kTileThreads, 0, stream_, cuda::i32(offsets), groups,
         large_tiles ? small_max : int(Np), small_rows, large_rows, Np, table, small, cap_small, large, cap_large, ntiles,
         cuda::f32(x), xb, round && M * H <= kRoundInTiles ? M * H : 0, st.fault);
  check_launch("moe_experts");

  ExpertsArgs a{cuda::f32(x), M, H, cuda::i32(perm), Np, row_div, cuda::f32_mut(y), Ny, table, h, ldh,
                xb, hb, xq, xs, hq, hs, nullptr, nullptr, 0, st.fault};
  const int64_t resident_small = int64_t(device_.sms) * 16, resident_gemm = int64_t(device_.sms) * 4,
                resident_fp8_small = int64_t(device_.sms) * 8;
  auto launch_small_rows = [&](auto gu_tag, auto rows_tag, int64_t nout) {
    constexpr bool GU = decltype(gu_tag)::value;
    constexpr int MAXR = decltype(rows_tag)::value;
    ExpertsArgs s = a;
    s.tiles = small;
    s.ntiles = ntiles;
    // Block-scaled FP8 experts (all of them) take the kernel made for them alone: fewer registers
    // than one that can meet any dtype, so more warps an SM.
    const bool f8_kernel = vec && f8;
    const int fpw = f8_kernel ? small_fpw<GU, MAXR, true>() : small_fpw<GU, MAXR>();
    s.fblocks = int(cdiv(nout, (kSmallThreads / 32) * fpw));
    const unsigned grid = unsigned(std::max<int64_t>(1, std::min(cap_small * s.fblocks, resident_small)));
    if (f8_kernel) launch(experts_small_kernel<GU, true, MAXR, true>, grid, kSmallThreads, 0, stream_, s);
    else if (vec) launch(experts_small_kernel<GU, true, MAXR, false>, grid, kSmallThreads, 0, stream_, s);
    else launch(experts_small_kernel<GU, false, MAXR, false>, grid, kSmallThreads, 0, stream_, s);
    check_launch("moe_experts");
  };
  auto launch_small = [&](auto gu_tag, int64_t nout) {
    if (fp8_small) {
      constexpr bool GU = decltype(gu_tag)::value;
      ExpertsArgs s = a;
      s.tiles = small;
      s.ntiles = ntiles;
      s.fblocks = int(cdiv(nout, f8_small_item_rows<GU>()));
      const unsigned grid = unsigned(std::max<int64_t>(1, std::min(cap_small * s.fblocks, resident_fp8_small)));
      launch(experts_fp8_small_kernel<GU>, grid, kF8SmallWarps * 32, 0, stream_, s);
      check_launch("moe_experts");
      return;
    }
    switch (small_rows) {
      case 1: return launch_small_rows(gu_tag, std::integral_constant<int, 1>{}, nout);
      case 2: return launch_small_rows(gu_tag, std::integral_constant<int, 2>{}, nout);
      case 4: return launch_small_rows(gu_tag, std::integral_constant<int, 4>{}, nout);
      default: return launch_small_rows(gu_tag, std::integral_constant<int, kSmallRows>{}, nout);
    }
  };
  auto launch_gemm = [&](auto gu_tag, int64_t nout) {
    constexpr bool GU = decltype(gu_tag)::value;
    ExpertsArgs s = a;
    s.tiles = large;
    s.ntiles = ntiles + 1;
    s.fblocks = int(cdiv(nout, fp8_tc ? (GU ? kFp8Cols / 2 : kFp8Cols) : kTileCols));
    // Persistent grids: the FP8 tiles fill an SM with one block (two of one consumer warpgroup).
    const int64_t resident = fp8_tc ? int64_t(device_.sms) * (fp8_consumers == 1 ? 2 : 1) : resident_gemm;
    const unsigned grid = unsigned(std::max<int64_t>(1, std::min(cap_large * s.fblocks, resident)));
    if (fp8_tc) {
      auto launch_fp8 = [&](auto consumers) {
        constexpr int C = decltype(consumers)::value;
        auto* kernel = &experts_fp8_kernel<GU, C>;
        smem_.allow(kernel, fp8_smem<C>(), "moe_experts: shared memory of the FP8 tiles");
        launch(kernel, grid, fp8_threads<C>(), fp8_smem<C>(), stream_, s);
      };
      if (fp8_consumers == 1) launch_fp8(std::integral_constant<int, 1>{});
      else if (fp8_consumers == 2) launch_fp8(std::integral_constant<int, 2>{});
      else launch_fp8(std::integral_constant<int, kFp8MaxConsumers>{});
    } else if (tensor_cores && f8) launch(experts_wmma_kernel<GU, true>, grid, kExpertThreads, 0, stream_, s);
    else if (tensor_cores) launch(experts_wmma_kernel<GU, false>, grid, kExpertThreads, 0, stream_, s);
    else launch(experts_gemm_kernel<GU>, grid, kExpertThreads, 0, stream_, s);
    check_launch("moe_experts");
  };
  // gate and up into h (every listed row), then down from h into y.
  launch_small(std::true_type{}, imax);
  if (large_tiles) launch_gemm(std::true_type{}, imax);
  if (nhq > 0) {  // every row's h: the large tiles' down products and the small ones' read it
    quantize_rows_b128(h, Np, Np, ldh, hq, hs, stream_);
    check_launch("moe_experts: quantizing h to FP8");
  }
  launch_small(std::false_type{}, H);
  if (large_tiles) launch_gemm(std::false_type{}, H);
  st.after(stream_);
}

void CudaOps::moe_combine(const Tensor& y, const Tensor& rows, const Tensor& weights, Tensor& out) {
  auto timed = time_op("moe_combine");
  MoeState& st = moe_state(moe_state_, counters_);
  st.raise_pending();
  const auto [T, H, M, k] = check_moe_combine(y, rows, weights, out);
  expect_device("moe_combine", "y", y);
  expect_device("moe_combine", "out", out);
  expect_device("moe_combine", "weights", weights);
  const int32_t* r = nullptr;
  if (rows.defined()) {
    expect_device("moe_combine", "rows", rows);
    r = cuda::i32(rows);
  }
  if (T == 0 || H == 0) return;
  const bool v4 = H % 4 == 0 && aligned16(y.raw()) && aligned16(out.raw());
  const int64_t n = T * (v4 ? H / 4 : H);
  const unsigned grid = unsigned(std::min<int64_t>(blocks_for(n, 256), int64_t(device_.sms) * 16));
  if (v4)
    launch(combine_kernel<true>, grid, 256, 0, stream_, cuda::f32(y), M, r, cuda::f32(weights), T, k, H,
           cuda::f32_mut(out), st.fault);
  else
    launch(combine_kernel<false>, grid, 256, 0, stream_, cuda::f32(y), M, r, cuda::f32(weights), T, k, H,
           cuda::f32_mut(out), st.fault);
  check_launch("moe_combine");
  st.after(stream_);
}

namespace {

// How moe_routed runs these experts for T tokens of k choices, or ok = false where it does not.
struct OnePassPlan {
  bool ok = false;
  bool f8 = false;   // block-scaled FP8 (else bf16)
  int parts = 1;     // of the intermediate size, a cluster each
  int dl = 1;        // 16-byte loads a lane of a down row's part
  size_t smem = 0;   // dynamic shared memory a block
};

// Whether moe_routed is taken where it fits: yes unless the environment sets
// BALLAST_CUDA_ONE_PASS_MOE=0, a switch for measuring what it gives, like BALLAST_CUDA_SIDE_STREAM.
bool one_pass_enabled() {
  static const bool on = switched_on("BALLAST_CUDA_ONE_PASS_MOE");
  return on;
}

// Whether the one pass takes a shared expert as its first choice (BALLAST_CUDA_MOE_SHARED=0: the
// model computes it beside routing, as before; for A/B runs).
bool one_pass_shared_enabled() {
  static const bool on = switched_on("BALLAST_CUDA_MOE_SHARED");
  return on;
}

// The entries of experts (and of the shared expert, at E) as moe_routed reads them.
ExpertsSummary one_pass_entries(std::span<const SwigluWeights> experts, const SharedExpert* shared, int64_t H,
                                std::vector<ExpertEntry>& entries) {
  ExpertsSummary sum = expert_entries("moe_routed", experts, H, entries);
  if (shared) add_expert_entry("moe_routed", shared->w, experts.size(), H, entries, sum);
  return sum;
}

// k: the choices a token (with the shared expert's).
OnePassPlan plan_one_pass(const ExpertsSummary& sum, int64_t T, int64_t H, int64_t k, const CudaDeviceTraits& dev) {
  OnePassPlan plan;
  if (!one_pass_enabled() || !sum.any || !sum.same_inter || !sum.rows16 || !(sum.f8 || sum.bf16) ||
      dev.capability < 90)
    return plan;
  // Only as many choices as fill one wave of two blocks an SM: each block's loads are a chain of
  // round trips, so a second wave doubles the time (80B FP8 on an H100: 4 tokens of 10 choices, 320
  // blocks, 7% slower than the grouped ops; 1-3 tokens 3-7% faster, docs/perf.md).
  if (T < 1 || T > kOnePassMaxTokens || k < 1 || k > kOnePassMaxK ||
      T * k * kOnePassBlocks > 2 * int64_t(dev.sms))
    return plan;
  const int64_t I = sum.imax, EL = sum.f8 ? 16 : 8;
  if (H % (32 * EL) != 0 || H % kOnePassBlocks != 0) return plan;
  // The most parts (up to 4) that keep the grid within two blocks an SM, and at least one (80B FP8
  // on an H100, one token: 1 / 2 / 4 parts 448 / 480 / 481 tok/s; 2-3 tokens: 4 parts slower).
  for (int parts = 4; parts >= 1; parts /= 2) {
    const int64_t Ip = I / parts, lpr = Ip / EL, dl = lpr < 32 ? 1 : lpr / 32;
    if (I % (int64_t(parts) * kOnePassBlocks * EL) != 0 || (lpr & (lpr - 1)) != 0) continue;
    if (dl * EL > 32) continue;  // (the lane's h of a row in registers)
    if (T * k * parts * kOnePassBlocks > 2 * int64_t(dev.sms)) continue;
    plan.smem = size_t(H + Ip + Ip / kOnePassBlocks + H / kOnePassBlocks) * sizeof(float);
    if (plan.smem > dev.smem_optin) return plan;
    plan.ok = true;
    plan.f8 = sum.f8;
    plan.parts = parts;
    plan.dl = int(dl);
    return plan;
  }
  return plan;
}

}  // namespace

bool CudaOps::moe_routed_fits(const Tensor& x, const Tensor& ids, std::span<const SwigluWeights> experts,
                              const SharedExpert* shared) const {
  if (x.rank() != 2 || ids.rank() != 2) return false;  // (the op's checks say what is wrong)
  if (shared && (!one_pass_shared_enabled() || !shared->w.gate.defined())) return false;
  std::vector<ExpertEntry> entries;
  const ExpertsSummary sum = one_pass_entries(experts, shared, x.dim(1), entries);
  return plan_one_pass(sum, x.dim(0), x.dim(1), ids.dim(1) + (shared ? 1 : 0), device_).ok;
}

void CudaOps::moe_routed(const Tensor& x, const Tensor& ids, const Tensor& weights,
                         std::span<const SwigluWeights> experts, Tensor& out) {
  moe_routed_with(x, ids, weights, experts, nullptr, out, nullptr);
}

// One token: the residual add and the norm's first half where moe_routed stores its sums (its
// slices' last blocks), the second half in the products that read them (matmul_many_normed): no
// norm kernel between a layer's experts and the next layer's first products (session 40 split the
// post-mixer norm likewise: docs/perf.md). More tokens, or BALLAST_CUDA_MOE_NORM_SPLIT=0 (for A/B
// runs): moe_routed, then add_rms_norm.
PendingNorm CudaOps::moe_routed_add_norm(const Tensor& x, const Tensor& ids, const Tensor& weights,
                                         std::span<const SwigluWeights> experts, const SharedExpert* shared,
                                         Tensor& out, const AddNorm& then) {
  static_assert(kOnePassBlocks == 8, "CudaOps::norm_parts counts 8 sums a row for moe_routed_add_norm");
  static const bool split = switched_on("BALLAST_CUDA_MOE_NORM_SPLIT");
  if (!split || ids.rank() != 2 || ids.dim(0) != 1) {
    moe_routed_with(x, ids, weights, experts, shared, out, nullptr);
    return add_norm_finished(*this, then, out);
  }
  check_add_norm("moe_routed_add_norm", then, out, kOnePassBlocks);
  expect_device("moe_routed_add_norm", "x", then.x);
  expect_device("moe_routed_add_norm", "w", then.w);
  expect_device("moe_routed_add_norm", "sums", then.sums);
  moe_routed_with(x, ids, weights, experts, shared, out, &then);
  return {out, then.sums, kOnePassBlocks, then.eps};
}

void CudaOps::moe_routed_with(const Tensor& x, const Tensor& ids, const Tensor& weights,
                              std::span<const SwigluWeights> experts, const SharedExpert* shared, Tensor& out,
                              const AddNorm* then) {
  auto timed = time_op(shared ? (then ? "moe_routed with the shared expert (the residual add and norm's sums at its "
                                        "store)" : "moe_routed with the shared expert")
                              : then ? "moe_routed (the residual add and norm's sums at its store)" : "moe_routed");
  MoeState& st = moe_state(moe_state_, counters_);
  st.raise_pending();
  const auto [T, H, k] = check_moe_routed(x, ids, weights, experts, shared, out);
  expect_device("moe_routed", "x", x);
  expect_device("moe_routed", "ids", ids);
  expect_device("moe_routed", "weights", weights);
  expect_device("moe_routed", "out", out);
  if (shared) expect_device("moe_routed", "the shared expert's gate", shared->gate);
  check(!shared || one_pass_shared_enabled(), "moe_routed: the shared expert's one pass is switched off "
        "(BALLAST_CUDA_MOE_SHARED=0: moe_routed_fits with it is false)");
  std::vector<ExpertEntry>& entries = st.staging;
  const ExpertsSummary sum = one_pass_entries(experts, shared, H, entries);
  const int64_t kk = k + (shared ? 1 : 0);
  const OnePassPlan plan = plan_one_pass(sum, T, H, kk, device_);
  check(plan.ok, "moe_routed: {} tokens of {} choices over experts {} x {} ({}) take the grouped ops (moe_routed_fits "
        "is false)", T, kk, sum.imax, H, sum.f8 ? "F8_E4M3_B128" : sum.bf16 ? "BF16" : "mixed dtypes");
  const ExpertEntry* table = st.experts(experts.data(), entries, stream_);
  float* part = static_cast<float*>(scratch_->bytes(size_t(T * kk * plan.parts * H) * sizeof(float)));
  OnePassArgs a{cuda::f32(x), cuda::i32(ids), cuda::f32(weights), table, part,
                st.arrivals(size_t(kOnePassMaxTokens) * kOnePassBlocks, stream_), cuda::f32_mut(out), H, sum.imax,
                int(k), int(experts.size()), plan.parts, st.fault};
  a.shared_gate = shared ? cuda::f32(shared->gate) : nullptr;
  a.kk = int(kk);
  if (then) {
    a.res = cuda::f32_mut(then->x);
    a.nw = then->w.raw();
    a.nwdt = then->w.dtype();
    a.sums = cuda::f32_mut(then->sums);
    a.ld = then->sums.dim(1);
  }
  const dim3 grid(kOnePassBlocks, unsigned(T * kk * plan.parts));
  auto go = [&](auto kernel) {
    smem_.allow(kernel, plan.smem, "moe_routed: shared memory");
    launch(kernel, grid, kOnePassThreads, plan.smem, stream_, a);
  };
  if (plan.f8) {
    if (plan.dl == 1) go(&moe_routed_kernel<f8e4m3, 1>);
    else go(&moe_routed_kernel<f8e4m3, 2>);
  } else {
    if (plan.dl == 1) go(&moe_routed_kernel<__nv_bfloat16, 1>);
    else if (plan.dl == 2) go(&moe_routed_kernel<__nv_bfloat16, 2>);
    else go(&moe_routed_kernel<__nv_bfloat16, 4>);
  }
  check_launch("moe_routed");
  st.after(stream_);
}

void CudaOps::gather_routed(std::span<const RoutedRows> sources, int me, Tensor& out, Tensor& recv_counts) {
  auto timed = time_op("gather_routed");
  MoeState& st = moe_state(moe_state_, counters_);
  st.raise_pending();
  const int64_t row_bytes = check_gather_routed(sources, me, out, recv_counts);
  const int G = int(sources.size());
  check(G <= kRoutedMaxSources, "gather_routed: {} sources, this backend takes at most {}", G, kRoutedMaxSources);
  expect_device("gather_routed", "out", out);
  expect_device("gather_routed", "recv_counts", recv_counts);
  RoutedArgs a{};
  bool v16 = row_bytes % 16 == 0 && aligned16(out.raw());
  int64_t most = 0;  // the rows of the largest source: what a source's blocks may have to copy
  for (int s = 0; s < G; ++s) {
    const RoutedRows& src = sources[size_t(s)];
    expect_device("gather_routed", "rows", src.rows);
    expect_device("gather_routed", "counts", src.counts);
    a.rows[s] = static_cast<const char*>(src.rows.raw());
    a.counts[s] = cuda::i32(src.counts);
    a.held[s] = src.rows.dim(0);
    v16 = v16 && aligned16(src.rows.raw());
    most = std::max(most, std::min(src.rows.dim(0), out.dim(0)));
  }
  // Enough blocks a source to copy its largest span in one sweep, the whole grid a few waves.
  const int64_t words = most * row_bytes / (v16 ? 16 : 1);
  const unsigned per_source = unsigned(std::clamp<int64_t>(blocks_for(words, 256), 1, std::max(1, device_.sms * 4 / G)));
  const dim3 grid(per_source, unsigned(G));
  if (v16)
    launch(gather_routed_kernel<true>, grid, 256, 0, stream_, a, me, (long long)row_bytes,
           static_cast<char*>(out.raw()), (long long)out.dim(0), cuda::i32_mut(recv_counts), st.fault);
  else
    launch(gather_routed_kernel<false>, grid, 256, 0, stream_, a, me, (long long)row_bytes,
           static_cast<char*>(out.raw()), (long long)out.dim(0), cuda::i32_mut(recv_counts), st.fault);
  check_launch("gather_routed");
  st.after(stream_);
}

}  // namespace ballast::kernels

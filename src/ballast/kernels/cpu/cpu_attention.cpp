// CpuOps::attention: causal softmax attention over paged K/V caches, in fp32 (double for the
// softmax denominator), one (row, head) item at a time.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "ballast/core/error.h"
#include "ballast/kernels/cpu/cpu_ops.h"
#include "ballast/kernels/cpu/multiversion.h"
#include "ballast/kernels/cpu/op_support.h"
#include "ballast/kernels/op_checks.h"

namespace ballast::kernels {

using namespace cpu;

namespace {

// scores[s] = scale * q . k_s for the len cache rows of one head (block_size rows a block, row
// stride `row`), and their maximum. The dot runs in 16 lanes summed pairwise (vectorised without
// -ffast-math; one running sum is a chain of hd dependent adds).
BALLAST_MV float head_scores(const float* qv, const float* kc, const int32_t* table, int64_t bs, size_t row,
                             int64_t hd, int64_t len, float scale, float* scores) {
  constexpr int kLanes = 16;
  float mx = -INFINITY;
  for (int64_t s0 = 0; s0 < len; s0 += bs) {
    const float* kb = kc + (size_t(table[s0 / bs]) * size_t(bs)) * row;
    for (int64_t s = s0, se = std::min(len, s0 + bs); s < se; ++s) {
      const float* kv = kb + size_t(s - s0) * row;
      float acc[kLanes] = {};
      int64_t j = 0;
      for (; j + kLanes <= hd; j += kLanes)
        for (int l = 0; l < kLanes; ++l) acc[l] += qv[j + l] * kv[j + l];
      for (int w = kLanes / 2; w >= 1; w /= 2)
        for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
      float d = acc[0];
      for (; j < hd; ++j) d += qv[j] * kv[j];
      scores[s] = d * scale;
      mx = std::max(mx, scores[s]);
    }
  }
  return mx;
}

// o = sum_s p_s v_s / sum with p_s = exp(scores[s] - mx) (the denominator in double).
BALLAST_MV void head_values(float* scores, const float* vc, const int32_t* table, int64_t bs, size_t row, int64_t hd,
                            int64_t len, float mx, float* o) {
  double sum = 0;
  for (int64_t s = 0; s < len; ++s) sum += (scores[s] = std::exp(scores[s] - mx));
  const float inv = float(1.0 / sum);
  std::fill(o, o + hd, 0.0f);
  for (int64_t s0 = 0; s0 < len; s0 += bs) {
    const float* vb = vc + (size_t(table[s0 / bs]) * size_t(bs)) * row;
    for (int64_t s = s0, se = std::min(len, s0 + bs); s < se; ++s) {
      const float p = scores[s] * inv;
      const float* vv = vb + size_t(s - s0) * row;
      for (int64_t j = 0; j < hd; ++j) o[j] += p * vv[j];
    }
  }
}

}  // namespace

void CpuOps::attention(const Tensor& q, const Tensor& k_new, const Tensor& v_new, Tensor& k_cache, Tensor& v_cache,
                       const SeqLayout& layout, Tensor& out) {
  auto timed = time_op("attention");
  const AttentionShape shape = check_attention(q, k_new, v_new, k_cache, v_cache, layout, out);
  check(k_cache.dtype() == DType::F32, "attention: this backend keeps F32 caches, not {}", dtype_name(k_cache.dtype()));
  const int B = shape.B;
  if (B == 0) return;
  const int64_t T = shape.T, Hq = shape.Hq, hd = shape.hd, Hkv = shape.Hkv;
  const int64_t blocks = shape.blocks, bs = shape.block_size, W = shape.W;
  const int32_t* cu = i32(layout.cu_seqlens);
  const int32_t* kv_lens = i32(layout.kv_lens);
  const int32_t* tables = i32(layout.block_tables);
  const int32_t* table_rows = layout.table_rows.defined() ? i32(layout.table_rows) : nullptr;
  const int64_t rows = layout.block_tables.dim(0);
  const int32_t* slots = i32(layout.slot_mapping);
  auto table_of = [&](int b) { return tables + int64_t(table_rows ? table_rows[b] : b) * W; };

  // Everything the parallel part reads is checked here: a worker thread cannot throw.
  check(cu[0] == 0 && cu[B] == T, "attention: cu_seqlens runs from {} to {}, expected 0 to {}", cu[0], cu[B], T);
  int64_t max_kv = 0;
  for (int b = 0; b < B; ++b) {
    const int64_t n = cu[b + 1] - cu[b], kv = kv_lens[b];
    check(n >= 0 && kv >= n, "attention: sequence {} has {} new rows and {} cache rows", b, n, kv);
    check((kv + bs - 1) / bs <= W, "attention: sequence {} needs {} blocks of {} for {} rows; its table holds {}", b,
          (kv + bs - 1) / bs, bs, kv, W);
    check(!table_rows || (table_rows[b] >= 0 && table_rows[b] < rows), "attention: table_rows[{}] = {} not in [0, {})",
          b, table_rows ? table_rows[b] : 0, rows);
    const int32_t* table = table_of(b);
    for (int64_t j = 0; j < (kv + bs - 1) / bs; ++j)
      check(table[j] >= 0 && table[j] < blocks, "attention: block_tables[{}][{}] = {} not in [0, {})",
            table_rows ? table_rows[b] : b, j, table[j], blocks);
    max_kv = std::max(max_kv, kv);
  }
  for (int64_t t = 0; t < T; ++t)
    check(slots[t] >= 0 && slots[t] < blocks * bs, "attention: slot_mapping[{}] = {} not in [0, {})", t, slots[t],
          blocks * bs);

  // The new rows go to the cache first: a row attends to itself and to the rows before it.
  const size_t row = size_t(Hkv * hd);
  float* kc = f32_mut(k_cache);
  float* vc = f32_mut(v_cache);
  for (int64_t t = 0; t < T; ++t) {
    std::memcpy(kc + size_t(slots[t]) * row, f32(k_new) + size_t(t) * row, row * 4);
    std::memcpy(vc + size_t(slots[t]) * row, f32(v_new) + size_t(t) * row, row * 4);
  }

  const int64_t group = Hq / Hkv;
  const float scale = 1.0f / std::sqrt(float(hd));
  const int64_t items = T * Hq, grain = 4;
  // Scratch for the longest row the cache can hold, on every thread: sized by the shapes alone, it
  // grows once, never as sequences lengthen.
  const int64_t per_worker = std::max<int64_t>(blocks * bs, 1);
  float* scratch = attention_scratch_.floats(size_t(pool_.size() * per_worker));
  parallel_workers(&pool_, items, grain, [&](int worker, int64_t i0, int64_t i1) {
    float* scores = scratch + size_t(worker) * size_t(per_worker);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / Hq, h = i % Hq, kvh = h / group;
      const int b = int(std::upper_bound(cu, cu + B + 1, int32_t(t)) - cu) - 1;
      const int64_t len = kv_lens[b] - (cu[b + 1] - cu[b]) + (t - cu[b]) + 1;
      const int32_t* table = table_of(b);
      const float* qv = f32(q) + (t * Hq + h) * hd;
      const float mx = head_scores(qv, kc + size_t(kvh * hd), table, bs, row, hd, len, scale, scores);
      head_values(scores, vc + size_t(kvh * hd), table, bs, row, hd, len, mx, f32_mut(out) + (t * Hq + h) * hd);
    }
  });
}

}  // namespace ballast::kernels

#include "ballast/runtime/sampler.h"

#include <bit>
#include <cstring>

#include "ballast/core/error.h"

namespace ballast::runtime {

Sampler::Sampler(kernels::Backend& backend, int max_rows, int max_drafts)
    : be_(backend), max_rows_(max_rows), max_drafts_(max_drafts) {
  // Per row: seed (2 words), position, temperature, top-p, top-k, kept row; then drafts and their rows.
  const int64_t words = 7 * int64_t(max_rows) + 2 * int64_t(max_drafts);
  staging_.reserve(size_t(words));
  meta_ = be_.alloc({words}, DType::I32);
  staged_meta_ = be_.alloc({6 * int64_t(max_rows)}, DType::I32);
}

kernels::SamplingRows Sampler::stage(std::span<const Row> rows) {
  std::vector<Tensor> none;
  return upload(staged_meta_, rows, {}, none);
}

void Sampler::draw(const Tensor& logits, const kernels::SamplingRows& staged, kernels::Draw stream, Tensor& ids) {
  Tensor probs;
  be_.ops().sample(logits, staged, stream, ids, probs);
}

kernels::SamplingRows Sampler::upload(const Tensor& meta, std::span<const Row> rows,
                                      std::span<const std::span<const int32_t>> extra,
                                      std::vector<Tensor>& extra_views) {
  const int64_t R = int64_t(rows.size());
  int64_t words = 6 * R;
  for (auto e : extra) words += int64_t(e.size());
  check(R <= max_rows_ && words <= meta.numel(), "sampler: {} rows exceed the {} it was sized for", R, max_rows_);
  staging_.assign(size_t(words), 0);
  // The seeds first: I64 views need 8-byte alignment, and the buffer's start has it.
  for (int64_t i = 0; i < R; ++i) {
    const Row& r = rows[size_t(i)];
    std::memcpy(&staging_[size_t(2 * i)], &r.seed, 8);
    staging_[size_t(2 * R + i)] = r.position;
    staging_[size_t(3 * R + i)] = std::bit_cast<int32_t>(r.params->temperature);
    staging_[size_t(4 * R + i)] = std::bit_cast<int32_t>(r.params->top_p);
    staging_[size_t(5 * R + i)] = r.params->top_k;
  }
  int64_t at = 6 * R;
  for (auto e : extra) {
    std::copy(e.begin(), e.end(), staging_.begin() + at);
    extra_views.push_back(meta.rows(at, at + int64_t(e.size())));
    at += int64_t(e.size());
  }
  Tensor used = meta.rows(0, words);
  be_.upload(staging_.data(), used);
  auto words_at = [&](int64_t k) { return meta.rows(k * R, (k + 1) * R); };
  kernels::SamplingRows s;
  s.seed = Tensor::borrow(meta.raw(), {R}, DType::I64, meta.device());
  s.position = words_at(2);
  const Tensor t = words_at(3), p = words_at(4);
  s.temperature = Tensor::borrow(t.raw(), {R}, DType::F32, meta.device());
  s.top_p = Tensor::borrow(p.raw(), {R}, DType::F32, meta.device());
  s.top_k = words_at(5);
  return s;
}

void Sampler::sample(kernels::Workspace& ws, const Tensor& logits, std::span<const Row> rows, kernels::Draw stream,
                     Tensor& ids, Tensor kept, std::span<const int32_t> kept_rows) {
  const int64_t R = int64_t(rows.size()), V = logits.dim(1);
  std::vector<Tensor> views;
  const std::span<const int32_t> extra[] = {kept_rows};
  const kernels::SamplingRows s = upload(meta_, rows, extra, views);
  Tensor probs;
  if (kept.defined()) probs = ws.take({R, V});
  be_.ops().sample(logits, s, stream, ids, probs);
  if (kept.defined()) be_.ops().scatter_rows(probs, views[0], kept);
}

void Sampler::verify(kernels::Workspace& ws, const Tensor& logits, std::span<const Row> rows,
                     std::span<const int32_t> drafts, int S, const Tensor& kept, std::span<const int32_t> draft_rows,
                     Tensor& out) {
  const int64_t B = int64_t(drafts.size()) / S, V = logits.dim(1);
  check(int64_t(rows.size()) == B * (S + 1) && int64_t(drafts.size()) <= max_drafts_,
        "sampler: {} target rows for {} drafts of {} steps", rows.size(), drafts.size(), S);
  bool samples = false;
  for (const Row& r : rows) samples = samples || !r.params->greedy();
  std::vector<Tensor> views;
  const std::span<const int32_t> extra[] = {drafts, samples ? draft_rows : std::span<const int32_t>()};
  const kernels::SamplingRows s = upload(meta_, rows, extra, views);
  Tensor draft_probs;
  if (samples) {
    draft_probs = ws.take({B * S, V});
    be_.ops().gather_rows(kept, views[1], 1, draft_probs);
  }
  be_.ops().verify_drafts(logits, views[0].reshape({B, S}), draft_probs, s, out);
}

}  // namespace ballast::runtime

#pragma once
// The host side of drawing tokens: each logits row's sampling parameters, seed and position go to
// the device in one upload, and the sample or verify_drafts op writes the drawn ids into a device
// output (kernels/sampling.h has the math). Nothing comes back to the host here.
#include <span>
#include <vector>

#include "ballast/kernels/backend.h"
#include "ballast/kernels/ops.h"
#include "ballast/kernels/workspace.h"
#include "ballast/runtime/sampling_params.h"

namespace ballast::runtime {

class Sampler {
 public:
  struct Row {
    const SamplingParams* params;  // temperature, top-p, top-k
    uint64_t seed;                 // the sequence's own
    int32_t position;              // of the token drawn
  };

  // max_rows: logits rows per pass; max_drafts: drafts verified per pass.
  Sampler(kernels::Backend& backend, int max_rows, int max_drafts);

  // A pass's draws in two steps: stage() uploads the rows before the pass (a captured graph then
  // finds them in place), draw() issues the sample op over them, inside the pass.
  kernels::SamplingRows stage(std::span<const Row> rows);
  void draw(const Tensor& logits, const kernels::SamplingRows& staged, kernels::Draw stream, Tensor& ids);

  // ids[R] = a token drawn from each row of logits[R, V]. With `kept` defined, the distribution each
  // row was drawn from is also kept in its row kept_rows[i] of `kept` (drafts, for verification).
  void sample(kernels::Workspace& ws, const Tensor& logits, std::span<const Row> rows, kernels::Draw stream,
              Tensor& ids, Tensor kept = {}, std::span<const int32_t> kept_rows = {});

  // Verification of B sequences with S drafts each (kernels::Ops::verify_drafts): rows are the
  // target rows [B * (S + 1)], drafts [B * S], draft_rows where each draft's distribution is kept
  // in `kept` (read only where a row samples). out [B, S + 2].
  void verify(kernels::Workspace& ws, const Tensor& logits, std::span<const Row> rows,
              std::span<const int32_t> drafts, int S, const Tensor& kept, std::span<const int32_t> draft_rows,
              Tensor& out);

 private:
  // Uploads the rows (and `extra` words after them) into `meta`; returns the ops' view of them.
  kernels::SamplingRows upload(const Tensor& meta, std::span<const Row> rows,
                               std::span<const std::span<const int32_t>> extra, std::vector<Tensor>& extra_views);

  kernels::Backend& be_;
  int max_rows_, max_drafts_;
  std::vector<int32_t> staging_;
  Tensor staged_meta_;  // stage(): the trunk pass's draws
  Tensor meta_;         // sample() and verify(): uploaded right before their op
};

}  // namespace ballast::runtime

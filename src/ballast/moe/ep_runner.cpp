#include "ballast/moe/ep_runner.h"

#include <algorithm>

#include "ballast/core/error.h"

namespace ballast::moe {

ExpertParallelRunner::ExpertParallelRunner(kernels::Backend& backend, const DispatchTables& tables,
                                           const SlotStore& slots, Tensor counts, dist::DataPlane& data,
                                           int max_tokens, Tensor token_slots)
    : ops_(backend.ops()), tables_(tables), slots_(slots), counts_(std::move(counts)), data_(data),
      max_tokens_(max_tokens), token_slots_(std::move(token_slots)) {
  check(counts_.rank() == 2 && counts_.dim(0) >= slots.layers() && counts_.dim(1) == int64_t(slots.slots()) * data.size(),
        "expert-parallel runner: load buffer {} for {} layers x {} slots x {} ranks", counts_, slots.layers(),
        slots.slots(), data.size());
}

kernels::PendingNorm ExpertParallelRunner::run_add_norm(int layer, const Tensor& x, const Tensor& ids,
                                                        const Tensor& weights,
                                                        std::span<const kernels::SwigluWeights> experts,
                                                        const kernels::SharedExpert* shared, kernels::Workspace& ws,
                                                        Tensor& out, const kernels::AddNorm& then) {
  check(shared == nullptr, "expert-parallel runner: the shared expert is not fused across ranks");
  run(layer, x, ids, weights, experts, ws, out);
  return kernels::add_norm_finished(ops_, then, out);
}

void ExpertParallelRunner::run(int layer, const Tensor& x, const Tensor& ids, const Tensor& weights,
                               std::span<const kernels::SwigluWeights>, kernels::Workspace& ws, Tensor& out) {
  const kernels::DispatchTables t = tables_.layer(layer);
  const int G = t.ranks, K = t.slots_per_rank;
  const int64_t T = ids.dim(0), k = ids.dim(1), N = T * k, H = x.dim(1), E = t.replica_count.dim(0);
  check(T <= max_tokens_, "expert-parallel runner: a pass of {} rows, sized for at most {}", T, max_tokens_);
  const Tensor choices = ids.reshape({N});
  Tensor none;

  // 1. A physical slot for every routed choice; balanced dispatch first learns every rank's counts.
  Tensor by_rank;
  if (t.policy == eplb::Dispatch::balanced) {
    Tensor mine = ws.take({E}, DType::I32);
    by_rank = ws.take({int64_t(G) * E}, DType::I32);
    ops_.zero(mine);
    ops_.histogram(choices, mine);
    data_.all_gather(mine, by_rank);
    by_rank = by_rank.reshape({G, E});
  }
  Tensor slot = ws.take({N}, DType::I32);
  ops_.dispatch(t, choices, by_rank, slot);

  // 2. The domain's load: what was dispatched, per physical slot.
  Tensor load = counts_[layer];
  ops_.histogram(slot, load);
  if (token_slots_.defined()) {
    Tensor trace = token_slots_[layer].rows(0, N);
    ops_.copy(slot, trace);
  }

  // 3. Rows to the ranks holding their slots, grouped by rank (order kept within a rank).
  Tensor order = ws.take({N}, DType::I32), send_counts = ws.take({G}, DType::I32);
  Tensor rank_offsets = ws.take({G + 1}, DType::I32), position = ws.take({N}, DType::I32);
  ops_.group_by(slot, none, K, G, order, send_counts, rank_offsets, position);
  Tensor send_rows = ws.take({N, H}), send_slots = ws.take({N, 1}, DType::I32);
  ops_.gather_rows(x, order, int(k), send_rows);
  ops_.gather_rows(slot.reshape({N, 1}), order, 1, send_slots);
  // A rank receives at most k rows per token from every rank, and no more than it has slots: the
  // slots' buffer is that large (4 bytes a row). The rows' buffers (H wide: at 16k rows a pass,
  // 4 ranks and top-10 the worst case is 5.4 GB each at the 80B shape) and the experts' scratch
  // take what the plane says arrived at most: what did (threads, MPI, host staging, NCCL), or
  // in a graph pass of in-process ranks the rows the senders hold (G x this pass's rows).
  const int64_t capacity = int64_t(G) * max_tokens_ * std::min<int64_t>(k, K);
  Tensor recv_slots = ws.take({capacity, 1}, DType::I32);
  Tensor recv_counts = ws.take({G}, DType::I32), recv_counts_again = ws.take({G}, DType::I32);
  data_.all_to_all_v(send_slots, send_counts, recv_slots, recv_counts);
  const int64_t arrived = data_.received_rows_at_most();
  check(arrived <= capacity, "expert-parallel runner: {} rows received, more than the bound of {}", arrived, capacity);
  const int64_t M = arrived >= 0 ? arrived : capacity;
  Tensor recv_rows = ws.take({M, H});
  // The rows go where their slots went (the plane need not read the counts again).
  data_.all_to_all_v_along(dist::DataPlane::Routes::again, send_rows, send_counts, recv_rows, recv_counts_again);

  // 4. This rank's experts over every row it received, grouped by local slot.
  Tensor by_slot = ws.take({capacity}, DType::I32), slot_counts = ws.take({K}, DType::I32);
  Tensor slot_offsets = ws.take({K + 1}, DType::I32);
  ops_.group_by(recv_slots.reshape({capacity}), recv_counts, 1, K, by_slot, slot_counts, slot_offsets, none);
  Tensor results = ws.take({M, H});
  ops_.moe_experts(recv_rows, by_slot.rows(0, M), slot_offsets, 1, slots_.layer(layer), results);

  // 5. Results back to the ranks that sent the rows (same order), combined per token in top-k order.
  Tensor back = ws.take({N, H}), back_counts = ws.take({G}, DType::I32);
  data_.all_to_all_v_along(dist::DataPlane::Routes::back, results, recv_counts, back, back_counts);
  ops_.join_side();
  ops_.moe_combine(back, position, weights, out);
}

}  // namespace ballast::moe

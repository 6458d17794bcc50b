#include "ballast/moe/ep_runner.h"

#include <cstring>

#include "ballast/core/error.h"
#include "ballast/moe/local_experts.h"
#include "ballast/moe/slot_assignment.h"

namespace ballast::moe {

namespace {

// A dispatch message to one rank: [n: int32][slots: n x int32][rows: n x H float32].
dist::Bytes pack_rows(const std::vector<int32_t>& slots, const std::vector<const float*>& rows, int64_t H) {
  const size_t n = slots.size();
  dist::Bytes b(4 + 4 * n + 4 * n * size_t(H));
  const int32_t n32 = int32_t(n);
  std::memcpy(b.data(), &n32, 4);
  std::memcpy(b.data() + 4, slots.data(), 4 * n);
  for (size_t i = 0; i < n; ++i) std::memcpy(b.data() + 4 + 4 * n + 4 * i * size_t(H), rows[i], 4 * size_t(H));
  return b;
}

template <typename T>
T read_at(const dist::Bytes& b, size_t offset) {
  check(offset + sizeof(T) <= b.size(), "expert-parallel message truncated");
  T v;
  std::memcpy(&v, b.data() + offset, sizeof(T));
  return v;
}

}  // namespace

ExpertParallelRunner::ExpertParallelRunner(ExpertDomain& domain, const SlotStore& slots, dist::Communicator& comm)
    : domain_(domain), tables_(&domain), slots_(slots), comm_(comm) {
  check(domain.placement.ranks == comm.size(), "expert domain '{}' is placed over {} ranks, the world has {}",
        domain.name, domain.placement.ranks, comm.size());
}

void ExpertParallelRunner::run(kernels::Ops& ops, int layer, const Tensor& x, const Routing& routing,
                               std::span<const ExpertWeights>, Tensor& out) {
  const int G = comm_.size(), me = comm_.rank();
  const eplb::Placement& pl = tables_->placement;
  const int table_layer = tables_ == &domain_ ? layer : 0;
  const int P = pl.physical, K = pl.slots_per_rank(), E = pl.logical;
  const int64_t H = x.dim(1);

  // 1. Choose a physical slot for every routed choice.
  SlotAssignmentInput in;
  in.policy = domain_.options.dispatch;
  in.row = pl.layer(table_layer);
  in.ranks = G;
  in.ranks_per_node = domain_.options.ranks_per_node;
  in.rank = me;
  in.experts = E;
  in.seed = uint64_t(domain_.passes) * 1000003u + uint64_t(layer);
  std::vector<int64_t> by_rank;
  if (in.policy == eplb::Dispatch::balanced) {
    const auto mine = routed_counts(routing, E);
    dist::Bytes b(mine.size() * 8);
    std::memcpy(b.data(), mine.data(), b.size());
    for (const auto& r : comm_.all_gather(b)) {
      const size_t off = by_rank.size();
      by_rank.resize(off + size_t(E));
      check(r.size() == size_t(E) * 8, "balanced dispatch: a rank sent {} bytes of counts", r.size());
      std::memcpy(by_rank.data() + off, r.data(), r.size());
    }
    in.counts_by_rank = by_rank;
  }
  const std::vector<int32_t> slot_of = assign_slots(in, routing);

  // 2. Record what was dispatched (physical slots), into the domain that owns these tables.
  tables_->recorder.record_topk(table_layer, slot_of, routing.k);
  for (int32_t s : slot_of) ++tables_->pass_slot_counts[size_t(table_layer) * P + size_t(s)];

  // 3. All-to-all dispatch of token rows to the ranks holding the slots.
  std::vector<std::vector<int32_t>> send_slots(static_cast<size_t>(G)), send_choice(static_cast<size_t>(G));
  std::vector<std::vector<const float*>> send_rows(static_cast<size_t>(G));
  for (size_t i = 0; i < slot_of.size(); ++i) {
    const int r = slot_of[i] / K;
    send_slots[size_t(r)].push_back(slot_of[i]);
    send_choice[size_t(r)].push_back(int32_t(i));
    send_rows[size_t(r)].push_back(x.f32() + (int64_t(i) / routing.k) * H);
  }
  std::vector<dist::Bytes> send(static_cast<size_t>(G));
  for (int r = 0; r < G; ++r) send[size_t(r)] = pack_rows(send_slots[size_t(r)], send_rows[size_t(r)], H);
  const std::vector<dist::Bytes> recv = comm_.all_to_all(send);

  // 4. Compute the experts this rank holds over every row it received.
  std::vector<int32_t> counts(static_cast<size_t>(G));
  int64_t total = 0;
  for (int s = 0; s < G; ++s) total += (counts[size_t(s)] = read_at<int32_t>(recv[size_t(s)], 0));
  Tensor xin = ops.alloc({total, H}), yin = ops.alloc({total, H});
  std::vector<ExpertBatch> by_slot(static_cast<size_t>(K));
  int64_t row = 0;
  for (int s = 0; s < G; ++s) {
    const auto& b = recv[size_t(s)];
    const size_t n = size_t(counts[size_t(s)]);
    check(b.size() == 4 + 4 * n + 4 * n * size_t(H), "expert-parallel message from rank {} has {} bytes", s, b.size());
    std::memcpy(xin.f32() + row * H, b.data() + 4 + 4 * n, 4 * n * size_t(H));
    for (size_t i = 0; i < n; ++i, ++row) {
      const int32_t slot = read_at<int32_t>(b, 4 + 4 * i);
      check(slot / K == me, "rank {} received a token for slot {}, which it does not hold", me, slot);
      by_slot[size_t(slot % K)].rows.push_back(int32_t(row));
      by_slot[size_t(slot % K)].scale.push_back(1.0f);
    }
  }
  for (int ls = 0; ls < K; ++ls) run_expert(ops, slots_.weights(layer, ls), xin, by_slot[size_t(ls)], yin);

  // 5. All-to-all combine: results go back to the ranks that sent the rows, in the same order.
  std::vector<dist::Bytes> reply(static_cast<size_t>(G));
  row = 0;
  for (int s = 0; s < G; ++s) {
    const size_t n = size_t(counts[size_t(s)]);
    reply[size_t(s)].resize(4 * n * size_t(H));
    std::memcpy(reply[size_t(s)].data(), yin.f32() + row * H, reply[size_t(s)].size());
    row += int64_t(n);
  }
  const std::vector<dist::Bytes> back = comm_.all_to_all(reply);
  for (int r = 0; r < G; ++r) {
    const auto& choices = send_choice[size_t(r)];
    check(back[size_t(r)].size() == 4 * choices.size() * size_t(H), "expert-parallel reply from rank {} has {} bytes",
          r, back[size_t(r)].size());
    if (choices.empty()) continue;
    std::vector<int32_t> rows(choices.size());
    std::vector<float> scale(choices.size());
    for (size_t i = 0; i < choices.size(); ++i) {
      rows[i] = choices[i] / routing.k;
      scale[i] = routing.weights[size_t(choices[i])];
    }
    Tensor y = Tensor::borrow(const_cast<std::byte*>(back[size_t(r)].data()), {int64_t(choices.size()), H}, DType::F32);
    ops.scatter_add_rows(y, rows, scale, out);
  }
}

}  // namespace ballast::moe

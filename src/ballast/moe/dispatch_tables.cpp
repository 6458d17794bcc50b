#include "ballast/moe/dispatch_tables.h"

#include "ballast/core/error.h"

namespace ballast::moe {

DispatchTables::DispatchTables(kernels::Backend& backend, const eplb::Placement& pl, eplb::Dispatch policy, int rank,
                               int ranks_per_node)
    : be_(backend),
      policy_(policy),
      rank_(rank),
      ranks_(pl.ranks),
      ranks_per_node_(ranks_per_node),
      layers_(pl.layers),
      experts_(pl.logical),
      physical_(pl.physical),
      max_replicas_(pl.physical - pl.logical + 1) {  // every redundant slot on one expert
  const int64_t L = layers_, E = experts_, P = physical_;
  phy2log_ = be_.alloc({L, P}, DType::I32);
  static_slot_ = be_.alloc({L, E}, DType::I32);
  replicas_ = be_.alloc({L, E, max_replicas_}, DType::I32);
  replica_count_ = be_.alloc({L, E}, DType::I32);
  pass_seed_ = be_.alloc({1}, DType::I64);
  for (int l = 0; l < layers_; ++l) update_layer(l, pl);
  set_pass(0);
}

kernels::DispatchTables DispatchTables::layer(int l) const {
  kernels::DispatchTables t;
  t.policy = policy_;
  t.rank = rank_;
  t.ranks = ranks_;
  t.slots_per_rank = physical_ / ranks_;
  t.layer = l;
  t.phy2log = phy2log_[l];
  t.static_slot = static_slot_[l];
  t.replicas = replicas_[l];
  t.replica_count = replica_count_[l];
  t.pass_seed = pass_seed_;
  return t;
}

void DispatchTables::update_layer(int l, const eplb::Placement& pl) {
  check(pl.layers == layers_ && pl.logical == experts_ && pl.physical == physical_ && pl.ranks == ranks_,
        "dispatch tables: placement of {} x {} x {} over {} ranks, tables for {} x {} x {} over {}", pl.layers,
        pl.logical, pl.physical, pl.ranks, layers_, experts_, physical_, ranks_);
  const auto row = pl.layer(l);
  const auto table = eplb::static_table(row, ranks_, ranks_per_node_, experts_);
  const auto rep = eplb::replicas_of(row, experts_);
  std::vector<int32_t> mine(table.begin() + int64_t(rank_) * experts_, table.begin() + int64_t(rank_ + 1) * experts_);
  std::vector<int32_t> padded(size_t(experts_) * max_replicas_, -1), count(static_cast<size_t>(experts_));
  for (int e = 0; e < experts_; ++e) {
    count[size_t(e)] = int32_t(rep[size_t(e)].size());
    std::copy(rep[size_t(e)].begin(), rep[size_t(e)].end(), padded.begin() + int64_t(e) * max_replicas_);
  }
  Tensor p = phy2log_[l], s = static_slot_[l], r = replicas_[l], c = replica_count_[l];
  be_.upload(row.data(), p);
  be_.upload(mine.data(), s);
  be_.upload(padded.data(), r);
  be_.upload(count.data(), c);
}

void DispatchTables::set_pass(int64_t pass) { be_.upload(&pass, pass_seed_); }

}  // namespace ballast::moe

#include "ballast/moe/rebalancer.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "ballast/core/error.h"
#include "ballast/eplb/metrics.h"

namespace ballast::moe {

namespace {
double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

Rebalancer::Rebalancer(ExpertDomain& domain, SlotStore& slots, dist::Communicator& comm, Logger log)
    : d_(domain), slots_(slots), comm_(comm), log_(log) {
  if (d_.options.rebalance.enabled) d_.recorder.start();
}

void Rebalancer::after_pass() {
  close_pass();
  if (migrating()) migrate_chunk();
  else if (d_.options.rebalance.enabled && d_.options.rebalance.interval > 0 &&
           d_.passes % d_.options.rebalance.interval == 0)
    start_rebalance();
}

void Rebalancer::close_pass() {
  const eplb::Placement& pl = d_.placement;
  std::vector<int64_t> counts = d_.pass_slot_counts;
  std::fill(d_.pass_slot_counts.begin(), d_.pass_slot_counts.end(), 0);
  comm_.all_reduce_sum(counts);
  double sum = 0;
  int layers = 0;
  for (int l = 0; l < pl.layers; ++l) {
    std::vector<double> slot(static_cast<size_t>(pl.physical));
    for (int p = 0; p < pl.physical; ++p) slot[size_t(p)] = double(counts[size_t(l) * pl.physical + p]);
    const auto ranks = eplb::rank_loads_from_slots(slot, pl.ranks);
    if (*std::max_element(ranks.begin(), ranks.end()) == 0) continue;
    sum += eplb::balancedness(ranks);
    ++layers;
  }
  balancedness_.push_back(layers ? sum / layers : 1.0);
  d_.recorder.end_pass(pl);
  ++d_.passes;
}

void Rebalancer::start_rebalance() {
  const double t0 = now_seconds();
  eplb::LoadTrace load = d_.recorder.dump_window();
  if (load.passes == 0 || load.experts != d_.placement.logical) return;
  comm_.all_reduce_sum(std::span<double>(load.count));
  double total = 0;
  for (double c : load.count) total += c;
  if (total == 0) return;

  target_ = eplb::plan(load, plan_options(d_.options, d_.placement.ranks, d_.placement.physical - d_.placement.logical,
                                           &d_.placement));
  plan_ = eplb::plan_migration(d_.placement, target_, d_.options.ranks_per_node, int64_t(slots_.bytes_per_expert()));

  RebalanceEvent ev;
  ev.domain = d_.name;
  ev.pass = d_.passes;
  const eplb::LoadTrace summed = load.sum();
  ev.balancedness_before = eplb::evaluate_even(d_.placement, summed).mean;
  ev.balancedness_after = eplb::evaluate_even(target_, summed).mean;
  ev.experts_moved = plan_.experts_moved;
  ev.bytes_moved = plan_.bytes_moved;
  for (int l = 0; l < d_.placement.layers; ++l)
    if (!std::equal(target_.layer(l).begin(), target_.layer(l).end(), d_.placement.layer(l).begin()))
      layers_left_.push_back(l);
  ev.layers_changed = int(layers_left_.size());
  ev.plan_seconds = now_seconds() - t0;
  started_at_ = t0;
  events_.push_back(ev);
  if (layers_left_.empty()) {
    events_.back().done = true;
    events_.back().total_seconds = ev.plan_seconds;
    return;
  }
  migrate_chunk();
}

void Rebalancer::migrate_chunk() {
  const int me = comm_.rank(), K = d_.placement.slots_per_rank();
  const int chunk = d_.options.rebalance.layers_per_chunk > 0 ? d_.options.rebalance.layers_per_chunk
                                                              : int(layers_left_.size());
  const std::vector<int> layers(layers_left_.begin(),
                                layers_left_.begin() + std::min<size_t>(size_t(chunk), layers_left_.size()));
  auto in_chunk = [&](int l) { return std::find(layers.begin(), layers.end(), l) != layers.end(); };

  // Staging blobs for this rank's destination slots: the old weights stay in force (and readable
  // as sources) until every rank has all of the chunk's weights.
  const size_t bytes = slots_.bytes_per_expert();
  std::vector<std::pair<const eplb::Copy*, std::vector<std::byte>>> staged;
  std::vector<dist::Communicator::SendItem> sends;
  std::vector<dist::Communicator::RecvItem> recvs;
  bool failed = false;
  for (size_t i = 0; i < plan_.copies.size(); ++i) {
    const eplb::Copy& c = plan_.copies[i];
    if (!in_chunk(c.layer)) continue;
    if (c.dst_rank == me) staged.push_back({&c, std::vector<std::byte>(bytes)});
  }
  for (size_t i = 0, j = 0; i < plan_.copies.size(); ++i) {
    const eplb::Copy& c = plan_.copies[i];
    if (!in_chunk(c.layer)) continue;
    const int tag = int(i);
    if (c.src_rank == me && c.dst_rank != me)
      sends.push_back({c.dst_rank, tag, slots_.blob(c.layer, c.src_slot % K)});
    if (c.dst_rank == me) {
      auto& buf = staged[j++].second;
      if (c.src_rank == me) std::memcpy(buf.data(), slots_.blob(c.layer, c.src_slot % K).data(), bytes);
      else recvs.push_back({c.src_rank, tag, buf});
      if (fail_copy && fail_copy(c)) failed = true;
    }
  }
  try {
    comm_.exchange(sends, recvs);
  } catch (const Error& e) {
    log_.info("eplb: transfer failed on rank {}: {}", me, e.what());
    failed = true;
  }
  failed = comm_.all_reduce_or(failed);
  RebalanceEvent& ev = events_.back();
  if (failed) {
    if (me == 0) log_.info("eplb[{}]: migration failed; the placement in force stays", d_.name);
    layers_left_.clear();
    ev.failed = true;
    ev.done = true;
    ev.total_seconds = now_seconds() - started_at_;
    return;
  }
  for (auto& [c, buf] : staged) std::memcpy(slots_.blob(c->layer, c->dst_slot % K).data(), buf.data(), bytes);
  for (int l : layers) std::copy(target_.layer(l).begin(), target_.layer(l).end(), d_.placement.layer(l).begin());
  layers_left_.erase(layers_left_.begin(), layers_left_.begin() + long(layers.size()));
  if (layers_left_.empty()) {
    ev.done = true;
    ev.total_seconds = now_seconds() - started_at_;
    if (me == 0)
      log_.info("eplb[{}]: rebalanced after pass {} in {:.1f} ms: {} layers changed, {} experts ({:.2f} MB) moved, "
                "balancedness {:.3f} -> {:.3f} (in-sample)",
                d_.name, ev.pass, ev.total_seconds * 1e3, ev.layers_changed, ev.experts_moved, ev.bytes_moved / 1e6,
                ev.balancedness_before, ev.balancedness_after);
  }
}

}  // namespace ballast::moe

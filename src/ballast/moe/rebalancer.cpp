#include "ballast/moe/rebalancer.h"

#include <algorithm>

#include "ballast/core/clock.h"
#include "ballast/core/error.h"
#include "ballast/eplb/metrics.h"
#include "ballast/kernels/ops.h"

namespace ballast::moe {

Rebalancer::Rebalancer(ExpertDomain& domain, DispatchTables& tables, SlotStore& slots, kernels::Backend& backend,
                       dist::Communicator& control, dist::DataPlane& data, Logger log)
    : d_(domain), tables_(tables), slots_(slots), be_(backend), control_(control), data_(data), log_(log) {
  const int lpc = d_.options.rebalance.layers_per_chunk;
  chunk_layers_ = lpc > 0 ? std::min(lpc, slots_.layers()) : slots_.layers();
  if (d_.options.rebalance.enabled) {
    d_.recorder.start();
    const Tensor blob = slots_.blob(0, 0);
    staging_ = be_.alloc({int64_t(chunk_layers_) * slots_.slots() * blob.numel()}, blob.dtype());
  }
}

void Rebalancer::after_pass(std::span<const int32_t> load, std::vector<std::vector<int32_t>> tokens) {
  close_pass(load, std::move(tokens));
  if (migrating()) migrate_chunk();
  else if (d_.options.rebalance.enabled && d_.options.rebalance.interval > 0 &&
           d_.passes % d_.options.rebalance.interval == 0)
    start_rebalance();
}

void Rebalancer::close_pass(std::span<const int32_t> load, std::vector<std::vector<int32_t>> tokens) {
  const eplb::Placement& pl = d_.placement;
  check(load.size() == size_t(pl.layers) * pl.physical, "rebalancer: a load of {} counts for {} layers x {} slots",
        load.size(), pl.layers, pl.physical);
  double sum = 0;
  int layers = 0;
  std::vector<double> slot(static_cast<size_t>(pl.physical));
  for (int l = 0; l < pl.layers; ++l) {
    for (int p = 0; p < pl.physical; ++p) slot[size_t(p)] = double(load[size_t(l) * pl.physical + p]);
    const auto ranks = eplb::rank_loads_from_slots(slot, pl.ranks);
    if (*std::max_element(ranks.begin(), ranks.end()) == 0) continue;
    sum += eplb::balancedness(ranks);
    ++layers;
  }
  balancedness_.push_back(layers ? sum / layers : 1.0);
  d_.recorder.end_pass(pl, load, std::move(tokens));
  ++d_.passes;
  tables_.set_pass(d_.passes);
}

void Rebalancer::start_rebalance() {
  const double t0 = now_seconds();
  // The window holds every rank's load already (each pass's load is summed over ranks).
  const eplb::LoadTrace load = d_.recorder.dump_window();
  if (load.passes == 0 || load.experts != d_.placement.logical) return;
  double total = 0;
  for (double c : load.count) total += c;
  if (total == 0) return;

  std::vector<eplb::LayerTrend> trends;
  eplb::PlanOptions po =
      plan_options(d_.options, d_.placement.ranks, d_.placement.physical - d_.placement.logical, &d_.placement);
  po.trends = &trends;
  target_ = eplb::plan(load, po);
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
  for (const auto& t : trends) ev.layers_trending += t.extrapolated;
  ev.plan_seconds = seconds_since(t0);
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
  const int me = data_.rank(), K = d_.placement.slots_per_rank();
  const std::vector<int> layers(layers_left_.begin(),
                                layers_left_.begin() + std::min<size_t>(size_t(chunk_layers_), layers_left_.size()));
  auto in_chunk = [&](int l) { return std::find(layers.begin(), layers.end(), l) != layers.end(); };

  // Received weights wait in staging: the old ones stay in force (and readable as sources) until
  // every rank has all of the chunk's weights. Sends and receives go in the plan's order, which
  // every rank derives alike, so the data plane needs no tags.
  const int64_t blob = slots_.blob(0, 0).numel();
  std::vector<std::pair<const eplb::Copy*, Tensor>> staged;
  std::vector<dist::DataPlane::Transfer> transfers;
  auto& ops = be_.ops();
  for (const eplb::Copy& c : plan_.copies) {
    if (!in_chunk(c.layer)) continue;
    if (c.src_rank == me && c.dst_rank != me)
      transfers.push_back({dist::DataPlane::Transfer::send, c.dst_rank, slots_.blob(c.layer, c.src_slot % K)});
    if (c.dst_rank != me) continue;
    const int64_t j = int64_t(staged.size());
    Tensor buf = staging_.rows(j * blob, (j + 1) * blob);
    if (c.src_rank == me) ops.copy(slots_.blob(c.layer, c.src_slot % K), buf);
    else transfers.push_back({dist::DataPlane::Transfer::recv, c.src_rank, buf});
    staged.push_back({&c, buf});
  }
  bool failed = false;
  try {
    data_.send_recv(transfers);
  } catch (const Error& e) {
    log_.info("eplb: transfer failed on rank {}: {}", me, e.what());
    failed = true;
  }
  failed = control_.all_reduce_or(failed);
  RebalanceEvent& ev = events_.back();
  if (failed) {
    if (me == 0) log_.info("eplb[{}]: migration failed; the placement in force stays", d_.name);
    layers_left_.clear();
    ev.failed = true;
    ev.done = true;
    ev.total_seconds = seconds_since(started_at_);
    return;
  }
  for (auto& [c, buf] : staged) {
    Tensor dst = slots_.blob(c->layer, c->dst_slot % K);
    ops.copy(buf, dst);
  }
  for (int l : layers) {
    std::copy(target_.layer(l).begin(), target_.layer(l).end(), d_.placement.layer(l).begin());
    tables_.update_layer(l, d_.placement);
  }
  layers_left_.erase(layers_left_.begin(), layers_left_.begin() + long(layers.size()));
  if (layers_left_.empty()) {
    ev.done = true;
    ev.total_seconds = seconds_since(started_at_);
    if (me == 0)
      log_.info("eplb[{}]: rebalanced after pass {} in {:.1f} ms: {} layers changed, {} experts ({:.2f} MB) moved, "
                "balancedness {:.3f} -> {:.3f} (in-sample)",
                d_.name, ev.pass, ev.total_seconds * 1e3, ev.layers_changed, ev.experts_moved, ev.bytes_moved / 1e6,
                ev.balancedness_before, ev.balancedness_after);
  }
}

}  // namespace ballast::moe

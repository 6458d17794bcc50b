#include "ballast/moe/expert_parallel.h"

#include "ballast/core/error.h"

namespace ballast::moe {

namespace {
SlotStore slots_for(const std::string& name, const std::vector<std::span<const kernels::SwigluWeights>>& layers,
                    const eplb::Placement& pl, const ExpertParallelSetup& setup) {
  check(pl.layers == int(layers.size()) && !layers.empty(), "a placement of {} layers for {} MoE layers", pl.layers,
        layers.size());
  const kernels::SwigluWeights& e0 = layers[0][0];
  const int K = pl.slots_per_rank(), rank = setup.data.rank();
  SlotStore s(setup.backend, int(layers.size()), K, e0.intermediate(), e0.gate.dim(1), e0.gate.dtype());
  uint64_t done = 0;
  for (int l = 0; l < int(layers.size()); ++l)
    for (int k = 0; k < K; ++k) {
      s.fill(l, k, layers[size_t(l)][size_t(pl.layer(l)[rank * K + k])]);
      if (setup.fill_progress) setup.fill_progress(name, done += s.bytes_per_expert(), s.bytes());
    }
  return s;
}

const eplb::Placement& placed_over(const eplb::Placement& p, const std::string& name, int ranks) {
  check(p.ranks == ranks, "expert domain '{}' is placed over {} ranks, the world has {}", name, p.ranks, ranks);
  return p;
}
}  // namespace

ExpertParallelDomain::ExpertParallelDomain(std::string name,
                                           const std::vector<std::span<const kernels::SwigluWeights>>& layers,
                                           eplb::Placement initial, const DomainOptions& options, Tensor load_view,
                                           const ExpertParallelSetup& s)
    : domain(name, placed_over(initial, name, s.data.size()), options),
      tables(s.backend, domain.placement, options.dispatch, s.data.rank(), options.ranks_per_node),
      slots(slots_for(domain.name, layers, domain.placement, s)),
      load(std::move(load_view)),
      token_slots(options.recorder_mode == eplb::RecorderMode::per_token
                      ? s.backend.alloc({domain.placement.layers, int64_t(s.max_tokens) * s.top_k}, DType::I32)
                      : Tensor()),
      runner(s.backend, tables, slots, load, s.data, s.max_tokens, token_slots),
      rebalancer(domain, tables, slots, s.backend, s.control, s.data, s.log),
      backend_(s.backend),
      top_k_(s.top_k) {}

void ExpertParallelDomain::end_pass(std::span<const int32_t> load_host, int64_t rows) {
  std::vector<std::vector<int32_t>> tokens;
  if (token_slots.defined() && domain.recorder.recording()) {
    const int64_t width = token_slots.dim(1), n = rows * top_k_;
    check(n <= width, "expert domain '{}': {} routed choices for a trace of {}", domain.name, n, width);
    std::vector<int32_t> all(static_cast<size_t>(token_slots.numel()));
    backend_.download(token_slots, all.data());
    // Rows that only padded a graph went to no expert (slots -1): not tokens of the trace.
    for (int l = 0; l < domain.placement.layers; ++l) {
      auto& layer = tokens.emplace_back();
      for (int64_t t = 0; t < n; t += top_k_) {
        const auto first = all.begin() + l * width + t;
        if (*first >= 0) layer.insert(layer.end(), first, first + top_k_);
      }
    }
  }
  rebalancer.after_pass(load_host, std::move(tokens));
}

}  // namespace ballast::moe

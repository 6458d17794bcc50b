#include "ballast/eplb/placement.h"

#include "ballast/core/error.h"
#include "ballast/eplb/limits.h"
#include "ballast/eplb/load.h"

#include <nlohmann/json.hpp>

namespace ballast::eplb {

Placement::Placement(int layers, int logical, int physical, int ranks)
    : layers(layers), logical(logical), physical(physical), ranks(ranks) {
  check(layers >= 0 && logical > 0 && physical > 0 && ranks > 0,
        "placement: bad shape layers={} logical={} physical={} ranks={}", layers, logical, physical, ranks);
  check(layers <= kMaxLayers && logical <= kMaxExperts && physical <= kMaxSlots && ranks <= kMaxRanks,
        "placement: {} layers x {} experts x {} slots on {} ranks is beyond the limits of {} layers, {} experts, {} "
        "slots and {} ranks", layers, logical, physical, ranks, kMaxLayers, kMaxExperts, kMaxSlots, kMaxRanks);
  check(physical % ranks == 0, "placement: {} physical slots are not divisible by {} ranks", physical, ranks);
  check(physical >= logical, "placement: {} physical slots are fewer than {} logical experts", physical, logical);
  phy2log.assign(size_t(layers) * physical, -1);
}

std::vector<int32_t> Placement::replica_count(int l) const {
  std::vector<int32_t> cnt(logical, 0);
  for (int32_t e : layer(l))
    if (e >= 0 && e < logical) cnt[e]++;
  return cnt;
}

std::vector<std::vector<int32_t>> Placement::logical_to_physical(int l) const {
  std::vector<std::vector<int32_t>> out(logical);
  auto row = layer(l);
  for (int p = 0; p < physical; ++p)
    if (row[p] >= 0 && row[p] < logical) out[row[p]].push_back(p);
  return out;
}

void Placement::validate() const {
  check(ranks > 0, "placement: number of ranks must be positive, got {}", ranks);
  check(physical % ranks == 0, "placement: {} physical slots are not divisible by {} ranks", physical, ranks);
  check(physical >= logical, "placement: {} physical slots are fewer than {} logical experts", physical, logical);
  check(phy2log.size() == size_t(layers) * physical, "placement: table has {} entries, expected {} x {}",
        phy2log.size(), layers, physical);
  for (int l = 0; l < layers; ++l) {
    auto row = layer(l);
    for (int p = 0; p < physical; ++p)
      check(row[p] >= 0 && row[p] < logical, "placement: layer {} slot {} holds expert {}, outside [0, {})", l, p,
            row[p], logical);
    auto cnt = replica_count(l);
    for (int e = 0; e < logical; ++e)
      check(cnt[e] >= 1, "placement: layer {} has no replica of logical expert {}", l, e);
  }
}

Placement Placement::trivial(int layers, int logical, int physical, int ranks) {
  Placement p(layers, logical, physical, ranks);
  for (int l = 0; l < layers; ++l)
    for (int s = 0; s < physical; ++s) p.layer(l)[s] = s % logical;
  return p;
}

Placement placement_from_json_text(const std::string& text, int ranks, const std::string& origin) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const std::exception& e) {
    fail("{}: not valid JSON: {}", origin, e.what());
  }
  const nlohmann::json* m = &j;
  if (j.is_object()) {
    check(j.contains("physical_to_logical_map"), "{}: no field 'physical_to_logical_map'", origin);
    m = &j["physical_to_logical_map"];
    if (j.contains("num_ranks")) {
      const auto& n = j["num_ranks"];
      check(n.is_number_integer() && n.get<int64_t>() > 0 && n.get<int64_t>() <= kMaxRanks,
            "{}: num_ranks must be an integer in [1, {}], got {}", origin, kMaxRanks, n.dump());
      const int file_ranks = n.get<int>();
      check(ranks <= 0 || ranks == file_ranks, "{}: num_ranks is {} but {} ranks were asked for", origin, file_ranks,
            ranks);
      ranks = file_ranks;
    }
  }
  check(m->is_array() && !m->empty(), "{}: physical_to_logical_map must be a non-empty [L][P] array", origin);
  check(m->size() <= size_t(kMaxLayers), "{}: physical_to_logical_map has {} layers, more than the limit of {}",
        origin, m->size(), kMaxLayers);
  int L = int(m->size());
  check((*m)[0].is_array() && !(*m)[0].empty(), "{}: physical_to_logical_map[0] must be a non-empty array", origin);
  check((*m)[0].size() <= size_t(kMaxSlots), "{}: physical_to_logical_map[0] has {} slots, more than the limit of {}",
        origin, (*m)[0].size(), kMaxSlots);
  int P = int((*m)[0].size());
  int maxe = -1;
  for (int l = 0; l < L; ++l) {
    const auto& row = (*m)[l];
    check(row.is_array() && int(row.size()) == P, "{}: ragged physical_to_logical_map: row {} has {} entries, row 0 has {}",
          origin, l, row.is_array() ? row.size() : 0, P);
    for (int p = 0; p < P; ++p) {
      check(row[p].is_number_integer() && row[p].get<int64_t>() >= 0 && row[p].get<int64_t>() < kMaxExperts,
            "{}: physical_to_logical_map[{}][{}] is {}, not an expert in [0, {})", origin, l, p, row[p].dump(),
            kMaxExperts);
      maxe = std::max(maxe, row[p].get<int>());
    }
  }
  check(ranks > 0, "{}: the number of ranks must be given", origin);
  check(ranks <= kMaxRanks, "{}: {} ranks, more than the limit of {}", origin, ranks, kMaxRanks);
  int E = maxe + 1;
  check(E > 0, "{}: no logical experts", origin);
  check(P % ranks == 0, "{}: {} physical slots are not divisible by {} ranks", origin, P, ranks);
  Placement out(L, E, P, ranks);
  for (int l = 0; l < L; ++l)
    for (int p = 0; p < P; ++p) out.layer(l)[p] = (*m)[l][p].get<int32_t>();
  out.validate();
  return out;
}

std::string placement_to_json_text(const Placement& p) {
  nlohmann::json m = nlohmann::json::array();
  for (int l = 0; l < p.layers; ++l) {
    auto row = p.layer(l);
    m.push_back(std::vector<int32_t>(row.begin(), row.end()));
  }
  nlohmann::json j;
  j["physical_to_logical_map"] = std::move(m);
  j["num_ranks"] = p.ranks;
  return j.dump() + "\n";
}

Placement read_placement(const std::string& path, int ranks) {
  return placement_from_json_text(read_text_file(path), ranks, path);
}

void write_placement(const std::string& path, const Placement& p) { write_text_file(path, placement_to_json_text(p)); }

}  // namespace ballast::eplb

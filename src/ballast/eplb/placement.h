#pragma once
// Placement tables of one expert domain: for every MoE layer, which logical expert each physical
// slot holds. Slot p lives on rank p / (P / G). Derived tables (logical -> physical replicas,
// replica counts) are computed on demand; the single source of truth is physical_to_logical.
#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace ballast::eplb {

struct Placement {
  int layers = 0;    // L
  int logical = 0;   // E
  int physical = 0;  // P = E + R
  int ranks = 0;     // G, P % G == 0
  std::vector<int32_t> phy2log;  // [L][P]

  Placement() = default;
  Placement(int layers, int logical, int physical, int ranks);  // all slots -1 (to be filled)

  int slots_per_rank() const { return physical / ranks; }
  int rank_of(int slot) const { return slot / slots_per_rank(); }
  std::span<int32_t> layer(int l) { return {phy2log.data() + size_t(l) * physical, size_t(physical)}; }
  std::span<const int32_t> layer(int l) const {
    return {phy2log.data() + size_t(l) * physical, size_t(physical)};
  }

  // replica_count [E] of layer l (number of slots holding each logical expert).
  std::vector<int32_t> replica_count(int l) const;
  // logical_to_physical [E][c_e] of layer l, slots ascending.
  std::vector<std::vector<int32_t>> logical_to_physical(int l) const;
  // Throws ballast::Error unless P % G == 0, P >= E, every slot holds an expert in [0, E) and
  // every logical expert has at least one replica, in every layer.
  void validate() const;

  // SGLang's trivial placement: slot p holds logical expert p % E.
  static Placement trivial(int layers, int logical, int physical, int ranks);

  bool operator==(const Placement&) const = default;
};

// SGLang --init-expert-location JSON: {"physical_to_logical_map": [[...]]} (L x P). The number of
// ranks is given by the caller or, when `ranks` <= 0, by the file's "num_ranks" (ballast writes it);
// a file whose num_ranks differs from a given `ranks` is refused. Shapes beyond limits.h are refused.
Placement placement_from_json_text(const std::string& text, int ranks, const std::string& origin = "placement");
std::string placement_to_json_text(const Placement& p);  // {"physical_to_logical_map": ..., "num_ranks": G}
Placement read_placement(const std::string& path, int ranks);
void write_placement(const std::string& path, const Placement& p);

}  // namespace ballast::eplb

#pragma once
// Load statistics: tokens routed to each logical expert, either one matrix [L][E] (the sum over a
// window) or a trace of passes [T][L][E]. Counts are held as doubles (exact for integers < 2^53).
#include <cstdint>
#include <string>
#include <vector>

namespace ballast::eplb {

struct LoadTrace {
  int passes = 0;  // T (1 for a plain [L][E] matrix)
  int layers = 0;  // L
  int experts = 0; // E
  std::vector<double> count;  // [T][L][E]

  LoadTrace() = default;
  // All counts 0. Throws unless each size is >= 0 and T x L x E is within kMaxLoadCounts (limits.h).
  LoadTrace(int passes, int layers, int experts);
  double* at(int t, int l) { return count.data() + (size_t(t) * layers + l) * experts; }
  const double* at(int t, int l) const { return count.data() + (size_t(t) * layers + l) * experts; }

  // Sum over passes [begin, end): a single-pass trace [1][L][E].
  LoadTrace sum(int begin, int end) const;
  LoadTrace sum() const { return sum(0, passes); }
  // Passes [begin, end) grouped into `slices` consecutive slices, each summed: [S][L][E].
  LoadTrace slices(int begin, int end, int slices) const;
  // Passes [begin, end) as their own trace.
  LoadTrace range(int begin, int end) const;
  // Throws unless every count is finite, >= 0 and at most 2^53 (held exactly).
  void validate(const std::string& origin = "load") const;
};

// Parses {"logical_count": [L][E] or [T][L][E]} (also a bare array). Refuses ragged arrays,
// negative, non-finite (above 2^53) or non-numeric counts with a message naming the position, and
// shapes beyond limits.h.
LoadTrace load_from_json_text(const std::string& text, const std::string& origin = "load");
std::string load_to_json_text(const LoadTrace& t, bool as_matrix);  // as_matrix: [L][E] when T==1
// Traces of many passes are large: a minimal safetensors file with one I32 tensor
// "logical_count" [T, L, E] (integer counts) is the compact form. read_load picks the format by
// extension (.safetensors or anything else = JSON).
LoadTrace read_load(const std::string& path);
void write_load(const std::string& path, const LoadTrace& t);

std::string read_text_file(const std::string& path);
void write_text_file(const std::string& path, const std::string& text);

}  // namespace ballast::eplb

#pragma once
// The batch sizes (sequences a pass) that decode, verification and draft passes are graphs of,
// as SGLang's --cuda-graph-bs and --cuda-graph-max-bs choose them: a pass of n sequences runs in
// the graph of the smallest size >= n, its batch padded with rows that go to no expert
// (ForwardBatch::routed); a pass larger than every size runs eagerly. Finer sizes waste fewer
// padded rows, at a graph (a warm-up pass and a capture) more each.
#include <span>
#include <vector>

namespace ballast::runtime {

// `given` (empty: vLLM's default list, 1, 2, 4, then every 8 up to 256, then every 16) kept to
// sizes <= max_bs (0: no bound) and <= limit (the runner's sequences a pass), ascending, once each.
// Throws on a size below 1.
std::vector<int> graph_sizes(std::span<const int> given, int max_bs, int limit);
// The smallest of `sizes` (ascending) >= n, or 0 when n is above them all.
int graph_batch(std::span<const int> sizes, int n);

}  // namespace ballast::runtime

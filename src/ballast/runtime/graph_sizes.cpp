#include "ballast/runtime/graph_sizes.h"

#include <algorithm>

#include "ballast/core/error.h"

namespace ballast::runtime {

std::vector<int> graph_sizes(std::span<const int> given, int max_bs, int limit) {
  std::vector<int> sizes(given.begin(), given.end());
  for (int s : sizes) check(s >= 1, "--cuda-graph-bs: a batch size of {} (sizes are at least 1)", s);
  const int top = max_bs > 0 ? std::min(max_bs, limit) : limit;
  if (sizes.empty())
    for (int s = 1; s <= top; s = s < 8 ? (s == 4 ? 8 : 2 * s) : s + (s < 256 ? 8 : 16)) sizes.push_back(s);
  std::sort(sizes.begin(), sizes.end());
  sizes.erase(std::unique(sizes.begin(), sizes.end()), sizes.end());
  sizes.erase(std::upper_bound(sizes.begin(), sizes.end(), top), sizes.end());
  return sizes;
}

int graph_batch(std::span<const int> sizes, int n) {
  const auto it = std::lower_bound(sizes.begin(), sizes.end(), n);
  return it == sizes.end() ? 0 : *it;
}

}  // namespace ballast::runtime

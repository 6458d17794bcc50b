#include "ballast/runtime/graph_group.h"

#include <algorithm>
#include <cstring>

namespace ballast::runtime {

namespace {
constexpr int kBefore = 2, kAfter = 3;  // mark slots: the data plane's are 0 and 1

// Every rank's `mine` (a value of plain bytes), by rank.
template <typename T>
std::vector<T> gather_each(dist::Communicator& comm, const T& mine) {
  dist::Bytes bytes(sizeof mine);
  std::memcpy(bytes.data(), &mine, sizeof mine);
  std::vector<T> all;
  for (const dist::Bytes& b : comm.all_gather(bytes)) {
    T theirs{};
    std::memcpy(&theirs, b.data(), sizeof theirs);
    all.push_back(theirs);
  }
  return all;
}
}  // namespace

std::vector<const void*> GraphGroup::marks(int slot) { return gather_each(comm_, be_.mark(slot)); }

int64_t GraphGroup::agree(int64_t key) {
  std::vector<int64_t> all = gather_each(comm_, key);
  if (std::any_of(all.begin(), all.end(), [](int64_t k) { return k < 0; })) return -1;
  // Every rank sees the same combinations in the same order: the same numbers.
  return keys_.try_emplace(std::move(all), int64_t(keys_.size())).first->second;
}

void GraphGroup::warm_up(const std::function<void()>& run) {
  plane_.graph_pass(true);
  try {
    run();
  } catch (...) {
    plane_.graph_pass(false);
    throw;
  }
  plane_.graph_pass(false);
}

void GraphGroup::begin_capture() {
  plane_.graph_pass(true);
  if (comm_.rank() == 0) be_.begin_capture();
  const std::vector<const void*> m = marks(kBefore);
  // The other streams join the capture by waiting for work recorded in it.
  if (comm_.rank() != 0) be_.after(m[0]);
}

void GraphGroup::end_capture(int64_t key) {
  const std::vector<const void*> m = marks(kAfter);
  if (comm_.rank() == 0) {
    for (size_t r = 1; r < m.size(); ++r) be_.after(m[r]);  // every stream joined back
    be_.end_capture(key);
  }
  // No rank issues more work before the capture has ended (it would be captured, unjoined).
  comm_.barrier();
  plane_.graph_pass(false);
}

void GraphGroup::replay(int64_t key) {
  const std::vector<const void*> before = marks(kBefore);
  if (comm_.rank() == 0) {
    for (size_t r = 1; r < before.size(); ++r) be_.after(before[r]);  // each rank's inputs are in place
    check(be_.replay(key), "graph group: no graph under key {} to replay", key);
  }
  const std::vector<const void*> after = marks(kAfter);
  if (comm_.rank() != 0) be_.after(after[0]);  // its outputs are written
}

}  // namespace ballast::runtime

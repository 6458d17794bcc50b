#include "ballast/runtime/distributed.h"

#include <algorithm>
#include <cstring>

#include "ballast/core/error.h"

namespace ballast::runtime {

DistributedResult generate_distributed(dist::Communicator& comm, const std::vector<std::vector<int32_t>>& prompts,
                                       const RankGenerate& generate) {
  const size_t G = size_t(comm.size()), me = size_t(comm.rank());
  std::vector<std::vector<int32_t>> mine;
  for (size_t i = me; i < prompts.size(); i += G) mine.push_back(prompts[i]);
  GenerationResult res = generate(mine);

  // Gather: each rank sends [count, len_0, ids_0..., len_1, ...] of its outputs.
  std::vector<int32_t> flat{int32_t(res.outputs.size())};
  for (const auto& o : res.outputs) {
    flat.push_back(int32_t(o.size()));
    flat.insert(flat.end(), o.begin(), o.end());
  }
  dist::Bytes mine_bytes(flat.size() * 4);
  std::memcpy(mine_bytes.data(), flat.data(), mine_bytes.size());
  const auto all = comm.all_gather(mine_bytes);
  DistributedResult out;
  out.outputs.resize(prompts.size());
  for (size_t r = 0; r < G; ++r) {
    std::vector<int32_t> v(all[r].size() / 4);
    std::memcpy(v.data(), all[r].data(), v.size() * 4);
    size_t pos = 1;
    for (int32_t j = 0; j < v.at(0); ++j) {
      const int32_t len = v.at(pos++);
      check(pos + size_t(len) <= v.size(), "gathered outputs of rank {} are truncated", r);
      out.outputs[r + size_t(j) * G].assign(v.begin() + long(pos), v.begin() + long(pos) + len);
      pos += size_t(len);
    }
  }
  std::vector<int64_t> tokens{res.stats.prefill_tokens, res.stats.decode_tokens, res.stopped ? 1 : 0};
  comm.all_reduce_sum(tokens);
  out.stats.prefill_tokens = tokens[0];
  out.stats.decode_tokens = tokens[1];
  out.stopped = tokens[2] > 0;
  out.stats.passes = res.stats.passes;
  // Ranks step together, so every rank's wall time is the step's; take rank 0's view.
  out.stats.prefill_seconds = res.stats.prefill_seconds;
  out.stats.decode_seconds = res.stats.decode_seconds;
  return out;
}

}  // namespace ballast::runtime

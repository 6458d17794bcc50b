// CpuOps::token_logprobs: the log-softmax of raw logits rows, the logprob of each row's token and
// its K most likely tokens (what a server returns as logprobs / top_logprobs).
#include <cmath>
#include <utility>

#include "ballast/core/error.h"
#include "ballast/kernels/cpu/cpu_ops.h"
#include "ballast/kernels/cpu/op_support.h"
#include "ballast/kernels/op_checks.h"

namespace ballast::kernels {

using namespace cpu;

void CpuOps::token_logprobs(const Tensor& logits, const Tensor& ids, Tensor& logprob, Tensor& top_ids,
                            Tensor& top_logprobs) {
  auto timed = time_op("token_logprobs");
  const auto [R, V, K] = check_token_logprobs(logits, ids, logprob, top_ids, top_logprobs);
  const int32_t* id = i32(ids);
  for (int64_t r = 0; r < R; ++r)
    check(id[r] < V, "token_logprobs: ids[{}] = {} not below the vocabulary of {}", r, id[r], V);
  const float* lp = f32(logits);
  float* out = f32_mut(logprob);
  int32_t* tid = K > 0 ? i32_mut(top_ids) : nullptr;
  float* tlp = K > 0 ? f32_mut(top_logprobs) : nullptr;
  parallel(&pool_, R, 1, [&, V = V, K = K](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = lp + r * V;
      float mx = row[0];
      for (int64_t v = 1; v < V; ++v) mx = std::max(mx, row[v]);
      double sum = 0;
      for (int64_t v = 0; v < V; ++v) sum += std::exp(double(row[v]) - double(mx));
      const double norm = double(mx) + std::log(sum);
      out[r] = id[r] < 0 ? 0.0f : float(double(row[id[r]]) - norm);
      // The K best by (logit descending, id ascending): each pick is the best below the last one.
      std::pair<float, int64_t> last{INFINITY, -1};
      auto better = [](std::pair<float, int64_t> a, std::pair<float, int64_t> b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
      };
      for (int64_t k = 0; k < K; ++k) {
        std::pair<float, int64_t> best{-INFINITY, V};
        for (int64_t v = 0; v < V; ++v) {
          const std::pair<float, int64_t> c{row[v], v};
          if (better(last, c) && (best.second == V || better(c, best))) best = c;
        }
        last = best;
        tid[r * K + k] = int32_t(best.second);
        tlp[r * K + k] = float(double(best.first) - norm);
      }
    }
  });
}

}  // namespace ballast::kernels

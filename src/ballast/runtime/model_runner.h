#pragma once
// Runs passes of the model over the state cache (nano-vllm's model runner): builds a pass's
// ForwardBatch on the host from its entries, uploads it in one copy and runs the trunk or the
// MTP head. Results stay on the device: the hidden states in buffers that outlive the pass (the
// MTP head reads the trunk's, a chained draft step its own), the logits in the pass's workspace,
// valid until the next pass.
#include <functional>
#include <optional>
#include <set>
#include <span>
#include <vector>

#include "ballast/kernels/backend.h"
#include "ballast/kernels/workspace.h"
#include "ballast/model/model.h"
#include "ballast/runtime/graph_group.h"
#include "ballast/runtime/state_cache.h"

namespace ballast::runtime {

struct RunnerLimits {
  int max_tokens = 0;          // rows per pass
  int max_seqs = 0;            // sequences per pass
  int max_blocks_per_seq = 0;  // block table width
  int max_verify_rows = 1;     // rows of a verifying sequence (drafts + 1)
  // Decode passes (every sequence one row drawing a token) and verification passes (every sequence
  // max_verify_rows rows, all with logits) as graphs captured per batch-size bucket (graph_sizes,
  // graph_sizes.h), where the backend can capture; draft passes likewise. In a graph group
  // (in-process EP ranks on one GPU) as one graph of every rank's pass where every rank runs one of
  // these or nothing (a rank without sequences takes part with no rows: its experts serve the others').
  bool graphs = false;
  std::vector<int> graph_sizes;  // the buckets, ascending (graph_sizes.h)
};

class ModelRunner {
 public:
  enum class Logits { none, last, all };
  // One sequence's rows of a pass, already appended to its cache entry (the rows are its last
  // ones: trunk rows end at cache->length, MTP rows at cache->mtp_length).
  struct Entry {
    const CacheEntry* cache = nullptr;
    std::span<const int32_t> tokens;       // the rows' tokens
    Logits logits = Logits::none;
    bool verify = false;                   // trunk: per-row DeltaNet states into the snapshots
    std::span<const int32_t> hidden_rows;  // MTP: the row of the hidden source each row pairs with
    // The last `padding` rows only fill a graph's shape (a first draft step's entries all get
    // max_verify_rows rows): appended and rolled back by the caller, never the logits row.
    int padding = 0;
  };
  struct Result {
    Tensor hidden;  // trunk [T, H] every row after model.norm; MTP [R, H] the logit rows after mtp.norm
    Tensor logits;  // [R, V]; valid until the next pass
    std::vector<int> first_row;  // per entry, its first row in the pass (trunk rows / logits rows)
    std::vector<int> first_logit;  // per entry, its first logits row (-1: none)
  };

  // group: the ranks' graph group under in-process expert parallelism (graph_group.h), or null.
  ModelRunner(model::Model& model, kernels::Backend& backend, StateCache& cache, const RunnerLimits& limits,
              GraphGroup* group = nullptr);

  // A trunk pass; `draw` (if given) issues the ops that consume its logits (sampling), so that
  // they go into the same graph. `tokens`, if defined, I32 [n]: the first n rows' tokens, read on
  // the device (the previous pass's draws, under the overlap schedule); those entries' own tokens
  // are then placeholders. A decode or verification pass under graphs is padded to its bucket
  // with entries of the cache's padding sequence (their logits rows come after the entries'), run
  // eagerly the first time a bucket is seen, captured the second, and replayed from then on; a
  // graph is captured again after the buffers it reads have moved.
  Result forward(std::span<const Entry> entries, const std::function<void(const Result&)>& draw = {},
                 const Tensor& tokens = {});
  // The logits rows a trunk pass of `entries` has: theirs, or the bucket's under a graph. In a
  // graph group the ranks agree here on the pass's graph (collective), for the forward() of the
  // same entries that follows.
  int logit_rows(std::span<const Entry> entries);
  // Inputs of a draft step read on the device, without a download: tokens, if defined, I32 [n], the
  // first n rows' tokens (a chained step's, from the step before); verdicts, if defined, [entries,
  // max_verify_rows + 1] of the verification a first step follows, whose entries then have
  // max_verify_rows rows each: their tokens and logits rows come from what each sequence kept
  // (Ops::draft_inputs). The entries' own tokens and logits rows are then placeholders.
  Result mtp_forward(std::span<const Entry> entries, const Tensor& hidden_source, const Tensor& tokens = {},
                     const Tensor& verdicts = {});
  // Whether a first draft step should pad every entry to max_verify_rows rows: its passes are then
  // graphs of one shape whatever each sequence kept of its verification.
  bool pads_first_drafts() const {
    return lim_.graphs && be_.can_capture() && lim_.max_verify_rows <= cache_.block_size();
  }

  kernels::Backend& backend() { return be_; }
  // Kernels and copies in the graph of the last decode pass (0: it ran eagerly).
  int64_t last_graph_nodes() const { return last_graph_nodes_; }
  // A graph pass's kind, and how many passes of each kind replayed a graph so far (idle, draft_idle:
  // a rank's empty part of its group's graph of a trunk pass, of a draft pass).
  enum class GraphKind { decode, verify, draft_from_trunk, draft_chained, draft_first, idle, draft_idle, count };
  int64_t replays(GraphKind k) const { return replays_[size_t(k)]; }
  kernels::Workspace& workspace() { return ws_; }
  const RunnerLimits& limits() const { return lim_; }
  // Device memory of the passes' scratch (activations): its buffer(s) now.
  size_t workspace_bytes() const { return ws_.capacity(); }

 private:
  enum class Track { trunk, mtp };
  // graph: a graph pass (sections a replay reads are as wide as the limits: snapshot slots, routed rows).
  model::ForwardBatch prepare(std::span<const Entry> entries, Track track, Result& r, bool graph = false);
  // A graph pass's shape: its kind and sequences (one of graph_sizes; 0: not a graph pass, unless idle).
  struct GraphBucket {
    int seqs = 0;
    int rows = 1;  // per sequence
    GraphKind kind = GraphKind::decode;
    int64_t group_key = -1;  // in a graph group, the group's graph (every rank's buckets)
    bool graphed() const { return seqs > 0 || kind == GraphKind::idle || kind == GraphKind::draft_idle; }
    int64_t own_key() const { return int64_t(seqs) * int64_t(GraphKind::count) + int64_t(kind); }
    int64_t key() const { return group_key >= 0 ? group_key : own_key(); }
  };
  // Overwrites the first rows' token ids of a prepared pass with `tokens` (device I32; none if undefined).
  void write_tokens(const Tensor& tokens, const model::ForwardBatch& batch);
  GraphBucket graph_bucket(std::span<const Entry> entries) const;
  // The graph size of a pass of n sequences of `rows` rows each, within the limits (0: none).
  int bucket_seqs(int n, int rows) const;
  GraphBucket draft_graph_bucket(std::span<const Entry> entries, const Tensor& hidden_source) const;
  // A pass's graph: its own bucket g, in a graph group the one every rank runs (or none); a rank
  // without entries runs an empty part of kind `idle`.
  GraphBucket in_group(GraphBucket g, std::span<const Entry> entries, GraphKind idle);
  // The trunk pass's graph.
  GraphBucket plan(std::span<const Entry> entries) { return in_group(graph_bucket(entries), entries, GraphKind::idle); }
  // Runs `run` as the graph of g: eagerly the first time, captured the second, replayed after.
  // Returns the graph's nodes (0: it ran eagerly).
  int64_t run_graphed(const GraphBucket& g, const std::function<void()>& run);

  model::Model& model_;
  kernels::Backend& be_;
  StateCache& cache_;
  RunnerLimits lim_;
  GraphGroup* group_;
  SoloGraphs solo_;
  Graphs& graphs_;  // group_ or solo_
  std::optional<GraphBucket> planned_;  // logit_rows' plan, for the forward() that follows
  kernels::Workspace ws_;
  std::vector<int32_t> staging_;  // the pass's metadata on the host, uploaded in one copy
  Tensor meta_;                   // ... and on the device
  Tensor trunk_hidden_, mtp_hidden_;  // [max_tokens, H]
  // Graphs: buckets seen once (warmed up) and captured, valid while the buffers stay put.
  std::set<int64_t> warmed_, captured_;  // graph keys
  int64_t graph_epoch_ = -1, graph_workspace_ = -1;
  std::vector<int32_t> pad_tokens_;  // the padding entries' tokens (max_verify_rows zeros)
  std::vector<int32_t> pad_hidden_rows_{0};  // a padding MTP entry pairs with the source's row 0
  int64_t last_graph_nodes_ = 0;
  int64_t replays_[size_t(GraphKind::count)] = {};
};

}  // namespace ballast::runtime

#include "ballast/runtime/model_runner.h"

#include <algorithm>
#include <utility>

#include "ballast/core/error.h"
#include "ballast/runtime/graph_sizes.h"

namespace ballast::runtime {

ModelRunner::ModelRunner(model::Model& model, kernels::Backend& backend, StateCache& cache, const RunnerLimits& lim,
                         GraphGroup* group)
    : model_(model), be_(backend), cache_(cache), lim_(lim), group_(group), solo_(backend),
      graphs_(group ? static_cast<Graphs&>(*group) : solo_), ws_(backend) {
  check(lim.max_tokens > 0 && lim.max_seqs > 0 && lim.max_blocks_per_seq > 0 && lim.max_verify_rows > 0,
        "model runner: limits of {} rows, {} sequences, {} blocks per sequence", lim.max_tokens, lim.max_seqs,
        lim.max_blocks_per_seq);
  check(!group || (lim.graphs && backend.can_capture()), "model runner: a graph group without graphs");
  // Every section of the largest pass: ids, positions, slot mapping, hidden rows, logit rows,
  // routed rows (rows each), cu_seqlens, kv_lens, state slots, block table rows and snapshot slots
  // (per sequence), and the block tables' writes (two words each).
  const int64_t B = lim.max_seqs;
  const int64_t capacity = 6 * int64_t(lim.max_tokens) + 4 * B + 1 + B * lim.max_verify_rows +
                           2 * cache.max_table_writes();
  staging_.reserve(size_t(capacity));
  meta_ = be_.alloc({capacity}, DType::I32);
}

model::ForwardBatch ModelRunner::prepare(std::span<const Entry> entries, Track track, Result& r, bool graph) {
  const int B = int(entries.size());
  int T = 0, R = 0, W = 1, Ws = 0, max_q = 0, max_kv = 0, prefills = 0;
  bool pads = false;  // rows that only fill a graph's shape
  for (const Entry& e : entries) {
    const int n = int(e.tokens.size());
    check(e.cache && n > 0 && e.padding >= 0 && e.padding < n && (e.padding == 0 || e.logits != Logits::all),
          "model runner: an entry of {} rows ({} padding)", n, e.padding);
    const int64_t length = track == Track::trunk ? e.cache->length : e.cache->mtp_length;
    check(length >= n && cache_.blocks_for(std::max(e.cache->length, e.cache->mtp_length)) <= int64_t(e.cache->blocks.size()),
          "model runner: {} rows not appended to the cache ({} rows, {} blocks)", n, length, e.cache->blocks.size());
    check(track == Track::trunk || int(e.hidden_rows.size()) == n, "model runner: {} MTP rows with {} hidden rows", n,
          e.hidden_rows.size());
    r.first_row.push_back(T);
    r.first_logit.push_back(e.logits == Logits::none ? -1 : R);
    T += n;
    R += e.logits == Logits::all ? n : e.logits == Logits::last ? 1 : 0;
    W = std::max(W, int(e.cache->blocks.size()));
    if (e.verify) {
      check(int(e.cache->snapshots.size()) == n || e.cache->snapshots.empty(),
            "model runner: a verification of {} rows with {} snapshot slots", n, e.cache->snapshots.size());
      Ws = std::max(Ws, int(e.cache->snapshots.size()));
    }
    max_q = std::max(max_q, n);
    max_kv = std::max(max_kv, int(length));
    prefills += n > 1 && !e.verify;
    pads = pads || e.padding > 0 || e.cache == &cache_.padding();
  }
  // A graph's sections stay put: a verification pass's snapshot section is as wide as the limit
  // (the block tables are the cache's, on the device, whatever the pass).
  if (graph && !entries.empty() && entries[0].verify) Ws = lim_.max_verify_rows;
  check(T <= lim_.max_tokens && B <= lim_.max_seqs && W <= lim_.max_blocks_per_seq && Ws <= lim_.max_verify_rows,
        "model runner: a pass of {} rows over {} sequences ({} blocks, {} snapshots) exceeds its limits of {} rows, {} "
        "sequences, {} blocks, {} snapshots",
        T, B, W, Ws, lim_.max_tokens, lim_.max_seqs, lim_.max_blocks_per_seq, lim_.max_verify_rows);

  // Sections of the host staging, in upload order.
  const bool mtp = track == Track::mtp;
  struct Section {
    int64_t offset, size;
  };
  int64_t used = 0;
  auto section = [&](int64_t n) { return Section{std::exchange(used, used + n), n}; };
  // Which rows go to the experts: in every graph pass (a replay may pad where the capture did not).
  const bool routed_rows = graph || pads;
  const std::vector<StateCache::TableWrite> writes = cache_.take_table_writes();
  const int64_t P = int64_t(writes.size());
  const Section ids = section(T), pos = section(T), cu = section(B + 1), kv = section(B), table_rows = section(B),
                slot_map = section(T), state = section(B), snaps = section(Ws > 0 ? int64_t(B) * Ws : 0),
                logit_rows = section(R), hidden = section(mtp ? T : 0), routed = section(routed_rows ? T : 0),
                write_at = section(P), write_block = section(P);
  staging_.assign(size_t(used), -1);
  for (int64_t i = 0; i < P; ++i) {
    staging_[size_t(write_at.offset + i)] = writes[size_t(i)].at;
    staging_[size_t(write_block.offset + i)] = writes[size_t(i)].block;
  }
  const int bs = cache_.block_size();
  int row = 0, lrow = 0;
  for (int b = 0; b < B; ++b) {
    const Entry& e = entries[size_t(b)];
    const int n = int(e.tokens.size());
    const int64_t length = mtp ? e.cache->mtp_length : e.cache->length;
    const bool padding_entry = e.cache == &cache_.padding();
    staging_[size_t(cu.offset + b)] = row;
    staging_[size_t(kv.offset + b)] = int32_t(length);
    staging_[size_t(table_rows.offset + b)] = e.cache->table_row;
    staging_[size_t(state.offset + b)] = e.cache->slot;
    if (e.verify && Ws > 0)
      std::copy(e.cache->snapshots.begin(), e.cache->snapshots.end(), staging_.begin() + snaps.offset + int64_t(b) * Ws);
    for (int i = 0; i < n; ++i, ++row) {
      const int64_t cache_row = length - n + i;  // MTP row r holds the pair at position r + 1
      staging_[size_t(ids.offset + row)] = e.tokens[size_t(i)];
      staging_[size_t(pos.offset + row)] = int32_t(mtp ? cache_row + 1 : cache_row);
      staging_[size_t(slot_map.offset + row)] =
          e.cache->blocks[size_t(cache_row / bs)] * bs + int32_t(cache_row % bs);
      if (mtp) staging_[size_t(hidden.offset + row)] = e.hidden_rows[size_t(i)];
      if (routed_rows) staging_[size_t(routed.offset + row)] = !padding_entry && i < n - e.padding;
      if (e.logits == Logits::all || (e.logits == Logits::last && i == n - 1 - e.padding))
        staging_[size_t(logit_rows.offset + lrow++)] = row;
    }
  }
  staging_[size_t(cu.offset + B)] = row;
  Tensor meta = meta_.rows(0, used);
  be_.upload(staging_.data(), meta);

  auto view = [&](const Section& s) { return meta_.rows(s.offset, s.offset + s.size); };
  // The blocks appended since the last pass go into the tables before this pass reads them
  // (outside any graph: their count varies).
  if (P > 0) {
    Tensor tables = cache_.block_tables().reshape({cache_.block_tables().numel(), 1});
    be_.ops().scatter_rows(view(write_block).reshape({P, 1}), view(write_at), tables);
  }
  model::ForwardBatch batch;
  kernels::SeqLayout& l = batch.layout;
  l.num_seqs = B;
  l.num_tokens = T;
  l.max_query_len = max_q;
  l.prefill_seqs = prefills;
  l.max_kv_len = max_kv;
  l.block_size = bs;
  l.cu_seqlens = view(cu);
  l.kv_lens = view(kv);
  l.block_tables = cache_.block_tables();
  l.table_rows = view(table_rows);
  l.slot_mapping = view(slot_map);
  l.state_slots = view(state);
  if (Ws > 0) l.snapshot_slots = view(snaps).reshape({B, Ws});
  batch.token_ids = view(ids);
  batch.positions = view(pos);
  batch.logit_rows = view(logit_rows);
  if (mtp) batch.hidden_rows = view(hidden);
  if (routed_rows) batch.routed = view(routed);
  return batch;
}

ModelRunner::GraphBucket ModelRunner::graph_bucket(std::span<const Entry> entries) const {
  if (!lim_.graphs || entries.empty() || !be_.can_capture()) return {};
  // Every entry alike: one row drawing a token, or a verification of max_verify_rows rows.
  const bool verify = entries[0].verify;
  const int rows = verify ? lim_.max_verify_rows : 1;
  if (rows > cache_.block_size()) return {};  // the padding sequence holds one block
  for (const Entry& e : entries)
    if (e.verify != verify || int(e.tokens.size()) != rows || e.logits != (verify ? Logits::all : Logits::last))
      return {};
  const int seqs = bucket_seqs(int(entries.size()), rows);
  if (seqs == 0) return {};
  return {seqs, rows, verify ? GraphKind::verify : GraphKind::decode};
}

int ModelRunner::bucket_seqs(int n, int rows) const {
  const int seqs = graph_batch(lim_.graph_sizes, n);
  return seqs > 0 && seqs <= lim_.max_seqs && int64_t(seqs) * rows <= lim_.max_tokens ? seqs : 0;
}

ModelRunner::GraphBucket ModelRunner::in_group(GraphBucket g, std::span<const Entry> entries, GraphKind idle) {
  if (!group_) return g;
  // A rank with nothing to run takes part in the group's graph with no rows: its MoE layers still
  // receive, compute and return the others' rows. (A group exists only where graphs are on.)
  if (entries.empty()) g.kind = idle;
  g.group_key = group_->agree(g.graphed() ? g.own_key() : -1);
  return g.group_key >= 0 ? g : GraphBucket{};
}

ModelRunner::GraphBucket ModelRunner::draft_graph_bucket(std::span<const Entry> entries,
                                                         const Tensor& hidden_source) const {
  if (!lim_.graphs || entries.empty() || !be_.can_capture()) return {};
  // One row each, or (a first step, padded) max_verify_rows each, from one of the two hidden
  // buffers that outlive passes (a graph reads it in place).
  const int rows = int(entries[0].tokens.size());
  GraphKind kind;
  if (trunk_hidden_.defined() && hidden_source.raw() == trunk_hidden_.raw())
    kind = rows == 1 ? GraphKind::draft_from_trunk : GraphKind::draft_first;
  else if (mtp_hidden_.defined() && hidden_source.raw() == mtp_hidden_.raw()) kind = GraphKind::draft_chained;
  else return {};
  if (rows != 1 && (kind != GraphKind::draft_first || rows != lim_.max_verify_rows || rows > cache_.block_size()))
    return {};
  for (const Entry& e : entries)
    if (int(e.tokens.size()) != rows || e.logits != Logits::last) return {};
  const int seqs = bucket_seqs(int(entries.size()), rows);
  if (seqs == 0) return {};
  return {seqs, rows, kind};
}

int64_t ModelRunner::run_graphed(const GraphBucket& g, const std::function<void()>& run) {
  // Graphs read the buffers they were captured over: when any has moved (on any rank of a group),
  // capture again.
  const bool moved = be_.counters().memory_epoch != graph_epoch_ || ws_.generation() != graph_workspace_;
  if (graphs_.any(moved)) {
    be_.drop_graphs();
    captured_.clear();
    graph_epoch_ = be_.counters().memory_epoch;
    graph_workspace_ = ws_.generation();
  }
  const int64_t key = g.key();
  if (!captured_.count(key)) {
    if (!warmed_.count(key)) {  // the first time eagerly: every buffer it needs grows now
      warmed_.insert(key);
      graphs_.warm_up(run);
      return 0;
    }
    graphs_.begin_capture();
    run();
    graphs_.end_capture(key);
    captured_.insert(key);
  }
  graphs_.replay(key);
  ++replays_[size_t(g.kind)];
  return graphs_.graph_nodes(key);
}

int ModelRunner::logit_rows(std::span<const Entry> entries) {
  planned_ = plan(entries);
  if (planned_->seqs) return planned_->seqs * planned_->rows;
  int R = 0;
  for (const Entry& e : entries) R += e.logits == Logits::all ? int(e.tokens.size()) : e.logits == Logits::last;
  return R;
}

ModelRunner::Result ModelRunner::forward(std::span<const Entry> entries, const std::function<void(const Result&)>& draw,
                                         const Tensor& tokens) {
  const GraphBucket g = planned_ ? *planned_ : plan(entries);
  planned_.reset();
  const bool bucket = g.seqs > 0, graphed = g.graphed();
  std::vector<Entry> padded;
  if (bucket) {
    // Padding entries as the others are; a verifying one has no snapshot slots (its states move
    // in place, in the padding's own slot).
    pad_tokens_.assign(size_t(g.rows), 0);
    padded.assign(entries.begin(), entries.end());
    const bool verify = g.kind == GraphKind::verify;
    while (int(padded.size()) < g.seqs)
      padded.push_back({&cache_.padding(), pad_tokens_, verify ? Logits::all : Logits::last, verify});
  }
  const std::span<const Entry> pass = bucket ? std::span<const Entry>(padded) : entries;
  ws_.reset();
  Result r;
  const model::ForwardBatch batch = prepare(pass, Track::trunk, r, graphed);
  r.first_row.resize(entries.size());
  r.first_logit.resize(entries.size());
  const auto& c = model_.config();
  if (!trunk_hidden_.defined()) trunk_hidden_ = be_.alloc({lim_.max_tokens, c.hidden_size}, DType::F32);
  model::ForwardOutputs out{trunk_hidden_.rows(0, batch.num_tokens()),
                            ws_.take({batch.num_logit_rows(), c.vocab_size})};
  r.hidden = out.hidden;
  r.logits = out.logits;
  write_tokens(tokens, batch);
  auto run = [&] {
    model_.forward(batch, cache_.views(), ws_, out);
    if (draw) draw(r);
  };
  last_graph_nodes_ = 0;
  if (graphed) last_graph_nodes_ = run_graphed(g, run);
  else run();
  return r;
}

void ModelRunner::write_tokens(const Tensor& tokens, const model::ForwardBatch& batch) {
  check(!tokens.defined() || tokens.numel() <= batch.num_tokens(), "model runner: {} tokens for a pass of {} rows",
        tokens.defined() ? tokens.numel() : 0, batch.num_tokens());
  // Written before the graph, not in it: a captured op would read the address of the step it was
  // captured for in every later step.
  if (tokens.defined() && tokens.numel() > 0) {
    Tensor ids = batch.token_ids.rows(0, tokens.numel());
    be_.ops().copy(tokens, ids);
  }
}

ModelRunner::Result ModelRunner::mtp_forward(std::span<const Entry> entries, const Tensor& hidden_source,
                                             const Tensor& tokens, const Tensor& verdicts) {
  // Draft passes of one row per sequence (chained steps; a first step where every draft was
  // rejected) and first steps padded to max_verify_rows rows each run as graphs, padded to their
  // bucket as decode passes are.
  const GraphBucket g = in_group(draft_graph_bucket(entries, hidden_source), entries, GraphKind::draft_idle);
  std::vector<Entry> padded;
  if (g.seqs) {
    pad_tokens_.assign(size_t(g.rows), 0);
    pad_hidden_rows_.assign(size_t(g.rows), 0);
    padded.assign(entries.begin(), entries.end());
    while (int(padded.size()) < g.seqs)
      padded.push_back({&cache_.padding(), pad_tokens_, Logits::last, false, pad_hidden_rows_});
  }
  const std::span<const Entry> pass = g.seqs ? std::span<const Entry>(padded) : entries;
  ws_.reset();
  Result r;
  const model::ForwardBatch batch = prepare(pass, Track::mtp, r, g.graphed());
  r.first_row.resize(entries.size());
  r.first_logit.resize(entries.size());
  const auto& c = model_.config();
  if (!mtp_hidden_.defined()) mtp_hidden_ = be_.alloc({lim_.max_tokens, c.hidden_size}, DType::F32);
  model::ForwardOutputs out{mtp_hidden_.rows(0, batch.num_logit_rows()),
                            ws_.take({batch.num_logit_rows(), c.vocab_size})};
  r.hidden = out.hidden;
  r.logits = out.logits;
  write_tokens(tokens, batch);
  if (verdicts.defined() && !entries.empty()) {
    const int64_t B = int64_t(entries.size()), rows = lim_.max_verify_rows;
    for (const Entry& e : entries)
      check(int64_t(e.tokens.size()) == rows && e.logits == Logits::last,
            "model runner: a first draft step from verdicts has entries of {} rows, each with its logits", rows);
    check(verdicts.rank() == 2 && verdicts.dim(0) == B && verdicts.dim(1) == rows + 1,
          "model runner: verdicts {} for {} entries of {} rows", verdicts, B, rows);
    Tensor ids = batch.token_ids.rows(0, B * rows), last_rows = batch.logit_rows.rows(0, B);
    // The rows past what each sequence kept only pad: no expert for them.
    Tensor routed = batch.routed.defined() ? batch.routed.rows(0, B * rows) : Tensor();
    be_.ops().draft_inputs(verdicts, ids, last_rows, routed);
  }
  auto run = [&] { model_.mtp_forward(batch, hidden_source, cache_.views(), ws_, out); };
  if (g.graphed()) run_graphed(g, run);
  else run();
  return r;
}

}  // namespace ballast::runtime

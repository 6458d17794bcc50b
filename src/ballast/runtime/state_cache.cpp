#include "ballast/runtime/state_cache.h"

#include <algorithm>
#include <limits>

#include "ballast/core/error.h"
#include "ballast/kernels/ops.h"
#include "ballast/model/param_count.h"

namespace ballast::runtime {

int64_t StateCache::block_bytes(const model::ModelConfig& c, DType kv, int block_size, bool mtp) {
  const int64_t es = int64_t(dtype_size(kv));  // the MTP pool is one layer's, whatever the config says
  return block_size * (model::kv_bytes_per_token(c, es) + (mtp ? 2 * int64_t(c.num_kv_heads) * c.head_dim * es : 0));
}

int64_t StateCache::slot_bytes(const model::ModelConfig& c) { return model::deltanet_state_bytes(c); }

StateCache::StateCache(kernels::Backend& backend, const model::ModelConfig& c, const StateCacheOptions& o)
    : be_(backend), opt_(o) {
  check(o.block_size > 0 && o.blocks > 0 && o.slots > 0, "state cache: {} blocks of {} rows and {} state slots",
        o.blocks, o.block_size, o.slots);
  check(o.blocks <= std::numeric_limits<int32_t>::max() / o.block_size,
        "state cache: {} blocks of {} rows: more cache rows than 32-bit slot ids address (lower --max-total-tokens)",
        o.blocks, o.block_size);
  const int64_t kd = int64_t(c.linear_num_key_heads) * c.linear_key_head_dim;
  const int64_t conv_dim = 2 * kd + int64_t(c.linear_num_value_heads) * c.linear_value_head_dim;
  const DType kv_dtype = be_.kv_cache_dtype();
  auto kv = [&] {
    return model::LayerCache{be_.alloc({o.blocks, o.block_size, c.num_kv_heads, c.head_dim}, kv_dtype),
                             be_.alloc({o.blocks, o.block_size, c.num_kv_heads, c.head_dim}, kv_dtype),
                             {}, {}};
  };
  for (auto type : c.layer_types) {
    if (type == model::LayerType::FullAttention) {
      views_.layers.push_back(kv());
    } else {
      has_deltanet_ = true;
      views_.layers.push_back({{}, {},
                               be_.alloc({o.slots, conv_dim, c.linear_conv_kernel_dim - 1}, DType::F32),
                               be_.alloc({o.slots, c.linear_num_value_heads, c.linear_key_head_dim,
                                          c.linear_value_head_dim}, DType::F32)});
    }
  }
  if (o.mtp) views_.mtp_layers.push_back(kv());
  bytes_ = o.blocks * block_bytes(c, kv_dtype, o.block_size, o.mtp) + o.slots * slot_bytes(c);
  for (int64_t b = o.blocks - 1; b >= 0; --b) free_blocks_.push_back(int32_t(b));
  for (int s = o.slots - 1; s >= 0; --s) free_slots_.push_back(int32_t(s));
  const int entries = o.entries > 0 ? o.entries : o.slots;
  const int64_t width = o.table_width > 0 ? o.table_width : o.blocks;
  check(entries <= o.slots && int64_t(entries) * width <= std::numeric_limits<int32_t>::max(),
        "state cache: block tables of {} entries x {} blocks ({} state slots)", entries, width, o.slots);
  tables_ = be_.alloc({entries, width}, DType::I32);
  bytes_ += int64_t(tables_.nbytes());
  for (int r = entries - 1; r >= 0; --r) free_rows_.push_back(int32_t(r));
  // The padding sequence fills one block (a padded pass's entries may have up to block_size rows),
  // zeroed so that its attention reads finite rows before its own pass has written them.
  check(allocate(padding_) && append(padding_, {.rows = o.block_size, .mtp_rows = o.mtp ? o.block_size : 0}),
        "state cache: no room for the padding sequence");
  for (auto* layers : {&views_.layers, &views_.mtp_layers})
    for (auto& l : *layers)
      if (l.k.defined()) {
        Tensor k = l.k.rows(padding_.blocks[0], padding_.blocks[0] + 1), v = l.v.rows(padding_.blocks[0], padding_.blocks[0] + 1);
        be_.ops().zero(k);
        be_.ops().zero(v);
      }
}

bool StateCache::allocate(CacheEntry& e) {
  check(e.slot < 0, "state cache: the entry already holds slot {}", e.slot);
  if (free_slots_.empty() || free_rows_.empty()) return false;
  e.slot = free_slots_.back();
  free_slots_.pop_back();
  e.table_row = free_rows_.back();
  free_rows_.pop_back();
  auto& ops = be_.ops();
  for (auto& l : views_.layers)
    if (l.conv.defined()) {
      Tensor conv = l.conv[e.slot], ssm = l.ssm[e.slot];
      ops.zero(conv);
      ops.zero(ssm);
    }
  return true;
}

bool StateCache::append(CacheEntry& e, const Growth& g) {
  check(g.rows >= 0 && g.mtp_rows >= 0 && g.headroom >= 0, "state cache: cannot append {} rows", g.rows);
  check(e.slot >= 0 || g.rows == 0, "state cache: trunk rows appended to an entry without a slot");
  check(!g.verify || e.snapshots.empty(), "state cache: a verification is still open (roll it back first)");
  const int64_t rows = std::max(e.length + g.rows + g.headroom, e.mtp_length + g.mtp_rows);
  const int64_t more = std::max<int64_t>(0, blocks_for(rows) - int64_t(e.blocks.size()));
  const int snaps = g.verify && has_deltanet_ ? int(g.rows) : 0;
  if (more > free_blocks() || snaps > free_slots()) return false;
  check(more == 0 || e.table_row >= 0, "state cache: blocks appended to an entry without a table row");
  check(int64_t(e.blocks.size()) + more <= table_width(),
        "state cache: an entry of {} rows needs {} blocks; the block tables hold {}", rows, blocks_for(rows),
        table_width());
  for (int64_t i = 0; i < more; ++i) {
    writes_.push_back({int32_t(e.table_row * table_width() + int64_t(e.blocks.size())), free_blocks_.back()});
    e.blocks.push_back(free_blocks_.back());
    free_blocks_.pop_back();
  }
  for (int i = 0; i < snaps; ++i) {
    e.snapshots.push_back(free_slots_.back());
    free_slots_.pop_back();
  }
  e.length += g.rows;
  e.mtp_length += g.mtp_rows;
  return true;
}

void StateCache::rollback(CacheEntry& e, int64_t rows, int64_t mtp_rows) {
  check(rows >= 0 && rows <= e.length && mtp_rows >= 0 && mtp_rows <= e.mtp_length,
        "state cache: cannot drop {} of {} rows ({} of {} MTP rows)", rows, e.length, mtp_rows, e.mtp_length);
  check(rows == 0 || !has_deltanet_ || int64_t(e.snapshots.size()) >= rows,
        "state cache: {} rows dropped without the DeltaNet states to roll back to", rows);
  e.length -= rows;
  e.mtp_length -= mtp_rows;
  if (e.snapshots.empty()) return;
  // The state after the last kept verified row becomes the entry's own; none kept: the old one.
  const int64_t kept = int64_t(e.snapshots.size()) - rows;
  if (kept > 0) {
    free_slots_.push_back(e.slot);
    e.slot = e.snapshots[size_t(kept - 1)];
  }
  for (int64_t i = 0; i < int64_t(e.snapshots.size()); ++i)
    if (i != kept - 1) free_slots_.push_back(e.snapshots[size_t(i)]);
  e.snapshots.clear();
}

void StateCache::release(CacheEntry& e) {
  for (int32_t b : e.blocks) free_blocks_.push_back(b);
  if (e.slot >= 0) free_slots_.push_back(e.slot);
  if (e.table_row >= 0) {
    free_rows_.push_back(e.table_row);
    const int64_t first = e.table_row * table_width(), end = first + table_width();
    std::erase_if(writes_, [&](const TableWrite& w) { return w.at >= first && w.at < end; });
  }
  for (int32_t s : e.snapshots) free_slots_.push_back(s);
  e = CacheEntry{};
}

}  // namespace ballast::runtime

#pragma once
// The state cache of one rank (README, "Architecture"): paged KV blocks for the full-attention
// layers and the MTP layer (one block table per sequence, shared by all of them), and a pool of
// Gated DeltaNet state slots (conv and recurrent state of every linear-attention layer). A
// sequence's CacheEntry changes only through allocate, append, rollback and release.
//
// The block tables live on the device too (block_tables(): a row per live entry, as SGLang's
// req_to_token pool): append() records the blocks it adds as writes that the next pass makes
// before it runs (take_table_writes; ModelRunner), so that a pass uploads only the blocks that
// are new, never whole tables as wide as the context.
//
// Speculative verification appends its rows with `verify`: the DeltaNet state after each row goes
// to a fresh snapshot slot (the op writes them), and rollback() makes the snapshot of the last
// kept row the entry's own slot. Rolling back is choosing a slot: nothing is copied.
#include <cstdint>
#include <utility>
#include <vector>

#include "ballast/kernels/backend.h"
#include "ballast/model/batch.h"
#include "ballast/model/config.h"

namespace ballast::runtime {

struct CacheEntry {
  std::vector<int32_t> blocks;     // KV blocks in order; row r sits in blocks[r / block_size]
  int32_t slot = -1;               // DeltaNet state slot (-1: none yet)
  int32_t table_row = -1;          // its row of the block tables on the device (with the slot)
  std::vector<int32_t> snapshots;  // per verified row, the slot holding the state after it
  int64_t length = 0;              // trunk rows cached: the next row's position
  int64_t mtp_length = 0;          // MTP rows cached; MTP row r holds the pair at position r + 1
};

struct StateCacheOptions {
  int block_size = 16;
  int64_t blocks = 0;   // KV blocks in the pool
  int slots = 0;        // DeltaNet state slots in the pool (snapshots and one for padding included)
  bool mtp = false;     // a KV pool for the MTP layer too
  int entries = 0;      // entries allocated at once, the padding sequence's included (0: slots)
  int64_t table_width = 0;  // blocks an entry may hold (0: every block)
};

// What an append adds to an entry.
struct Growth {
  int64_t rows = 0;      // trunk rows
  int64_t mtp_rows = 0;  // MTP rows
  bool verify = false;   // the trunk rows are drafts under verification (one snapshot slot each)
  int64_t headroom = 0;  // blocks also for this many rows past the trunk's new length (MTP drafts)
};

class StateCache {
 public:
  StateCache(kernels::Backend& backend, const model::ModelConfig& cfg, const StateCacheOptions& options);

  // The bytes of one KV block (K and V of every full-attention layer, and of the MTP layer with
  // `mtp`, in the backend's cache dtype `kv`) and of one DeltaNet state slot (conv and recurrent
  // states of every linear-attention layer; model/param_count.h's counts), as the constructor
  // allocates them (a test holds the two equal): what a memory budget buys.
  static int64_t block_bytes(const model::ModelConfig& cfg, DType kv, int block_size, bool mtp);
  static int64_t slot_bytes(const model::ModelConfig& cfg);

  // Gives the entry a DeltaNet slot with zeroed states and a block table row. False (nothing
  // changed) if none is free.
  bool allocate(CacheEntry& e);
  // Adds rows (taking blocks and, for verification, snapshot slots). False, changing nothing,
  // when the pool has too few free blocks or slots.
  bool append(CacheEntry& e, const Growth& g);
  // Drops the last `rows` trunk rows and `mtp_rows` MTP rows. After a verify append it must be
  // called (rows may be 0): the state after the last kept row becomes the entry's own.
  void rollback(CacheEntry& e, int64_t rows, int64_t mtp_rows = 0);
  // Gives back everything the entry holds; the entry is empty again.
  void release(CacheEntry& e);

  int block_size() const { return opt_.block_size; }
  int64_t bytes() const { return bytes_; }  // of device memory, every pool and the block tables together
  // What sequences can have (the padding sequence's block and slot are not counted).
  int64_t total_blocks() const { return opt_.blocks - 1; }
  int total_slots() const { return opt_.slots - 1; }
  int64_t free_blocks() const { return int64_t(free_blocks_.size()); }
  int free_slots() const { return int(free_slots_.size()); }
  // Blocks an entry of `rows` rows holds.
  int64_t blocks_for(int64_t rows) const { return (rows + opt_.block_size - 1) / opt_.block_size; }

  const model::CacheViews& views() const { return views_; }
  // Every entry's block table on the device, [entries, table_width] I32: row CacheEntry::table_row
  // holds its blocks in order once the recorded writes are made.
  const Tensor& block_tables() const { return tables_; }
  int64_t table_width() const { return tables_.dim(1); }
  struct TableWrite {
    int32_t at;     // block_tables' element (row * table_width + index)
    int32_t block;  // the block it holds
  };
  // The writes recorded since the last call, to make before the next pass reads the tables: each
  // element at most once (a released entry's are dropped).
  std::vector<TableWrite> take_table_writes() { return std::exchange(writes_, {}); }
  // The most writes a call can return (every block once).
  int64_t max_table_writes() const { return opt_.blocks; }
  // A sequence of one row that belongs to nobody: the rows that pad a pass up to a captured
  // graph's batch size run against it (their results are thrown away).
  const CacheEntry& padding() const { return padding_; }

 private:
  kernels::Backend& be_;
  StateCacheOptions opt_;
  model::CacheViews views_;
  std::vector<int32_t> free_blocks_, free_slots_, free_rows_;  // stacks
  Tensor tables_;
  std::vector<TableWrite> writes_;
  bool has_deltanet_ = false;
  int64_t bytes_ = 0;
  CacheEntry padding_;
};

}  // namespace ballast::runtime

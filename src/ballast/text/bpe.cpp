#include "ballast/text/bpe.h"

#include <algorithm>
#include <bit>
#include <climits>
#include <queue>

namespace ballast::text {

const std::array<uint32_t, 256>& byte_to_codepoint() {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    std::array<bool, 256> direct{};
    for (int b = '!'; b <= '~'; ++b) direct[b] = true;
    for (int b = 0xA1; b <= 0xAC; ++b) direct[b] = true;
    for (int b = 0xAE; b <= 0xFF; ++b) direct[b] = true;
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) t[b] = direct[b] ? static_cast<uint32_t>(b) : next++;
    return t;
  }();
  return table;
}

int codepoint_to_byte(uint32_t cp) {
  static const std::array<int16_t, 512> inverse = [] {
    std::array<int16_t, 512> inv{};
    inv.fill(-1);
    const auto& t = byte_to_codepoint();
    for (int b = 0; b < 256; ++b) inv[t[b]] = static_cast<int16_t>(b);
    return inv;
  }();
  return cp < 512 ? inverse[cp] : -1;
}

void MergeTable::reserve(size_t n) {
  size_t cap = std::bit_ceil(std::max<size_t>(16, n * 2));
  slots_.assign(cap, Entry{kEmpty, 0, 0});
  mask_ = cap - 1;
  shift_ = 64 - std::countr_zero(cap);
  size_ = 0;
}

bool MergeTable::insert(int32_t left, int32_t right, int32_t rank, int32_t id) {
  if ((size_ + 1) * 2 > slots_.size()) {
    std::vector<Entry> old = std::move(slots_);
    reserve(std::max<size_t>(16, old.size()));
    for (const Entry& e : old)
      if (e.key != kEmpty) insert(static_cast<int32_t>(e.key >> 32), static_cast<int32_t>(e.key & 0xFFFFFFFFu), e.rank, e.id);
  }
  uint64_t key = pack(left, right);
  size_t i = hash(key);
  for (;;) {
    Entry& e = slots_[i];
    if (e.key == key) return false;
    if (e.key == kEmpty) {
      e = Entry{key, rank, id};
      ++size_;
      return true;
    }
    i = (i + 1) & mask_;
  }
}

namespace {
constexpr size_t kShortWord = 128;
}

void Bpe::encode_word(std::string_view word, std::vector<int32_t>& out) const {
  size_t n = word.size();
  if (n == 0) return;
  if (n == 1) {
    out.push_back(byte_ids_[static_cast<unsigned char>(word[0])]);
    return;
  }
  if (n > kShortWord) {
    encode_long(word, out);
    return;
  }
  // ids[i], and rank[i]/merged[i] of the pair (ids[i], ids[i+1]).
  int32_t ids[kShortWord], rank[kShortWord], merged[kShortWord];
  for (size_t i = 0; i < n; ++i) ids[i] = byte_ids_[static_cast<unsigned char>(word[i])];
  auto look = [&](size_t i) {
    const MergeTable::Entry* e = merges_.find(ids[i], ids[i + 1]);
    rank[i] = e ? e->rank : INT_MAX;
    merged[i] = e ? e->id : -1;
  };
  for (size_t i = 0; i + 1 < n; ++i) look(i);
  size_t len = n;
  while (len > 1) {
    size_t best = 0;
    int32_t best_rank = rank[0];
    for (size_t i = 1; i + 1 < len; ++i)
      if (rank[i] < best_rank) { best_rank = rank[i]; best = i; }
    if (best_rank == INT_MAX) break;
    ids[best] = merged[best];
    // Remove ids[best + 1] and the pair entry that started there.
    for (size_t i = best + 1; i + 1 < len; ++i) {
      ids[i] = ids[i + 1];
      rank[i] = rank[i + 1];
      merged[i] = merged[i + 1];
    }
    --len;
    if (best + 1 < len) look(best);
    if (best > 0) look(best - 1);
  }
  out.insert(out.end(), ids, ids + len);
}

void Bpe::encode_long(std::string_view word, std::vector<int32_t>& out) const {
  size_t n = word.size();
  struct Sym {
    int32_t id;
    int32_t prev, next;  // -1 at the ends
  };
  std::vector<Sym> sym(n);
  for (size_t i = 0; i < n; ++i)
    sym[i] = Sym{byte_ids_[static_cast<unsigned char>(word[i])], static_cast<int32_t>(i) - 1,
                 i + 1 < n ? static_cast<int32_t>(i + 1) : -1};
  struct Cand {
    int32_t rank, pos, right_pos, id;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto push = [&](int32_t pos) {
    if (pos < 0) return;
    int32_t r = sym[pos].next;
    if (r < 0) return;
    const MergeTable::Entry* e = merges_.find(sym[pos].id, sym[r].id);
    if (e) heap.push(Cand{e->rank, pos, r, e->id});
  };
  for (size_t i = 0; i + 1 < n; ++i) push(static_cast<int32_t>(i));
  while (!heap.empty()) {
    Cand c = heap.top();
    heap.pop();
    Sym& left = sym[c.pos];
    // Stale when either side was merged away or changed since the candidate was pushed.
    if (left.id < 0 || left.next != c.right_pos) continue;
    Sym& right = sym[c.right_pos];
    const MergeTable::Entry* e = merges_.find(left.id, right.id);
    if (!e || e->id != c.id || e->rank != c.rank) continue;
    left.id = c.id;
    left.next = right.next;
    if (right.next >= 0) sym[right.next].prev = c.pos;
    right.id = -1;
    push(left.prev);
    push(c.pos);
  }
  for (int32_t i = 0; i >= 0; i = sym[i].next) out.push_back(sym[i].id);
}

}  // namespace ballast::text

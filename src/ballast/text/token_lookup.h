#pragma once
// The tokenizer's hash tables, internal to text/: the vocabulary's index (token text -> id) and
// the per-thread caches of encoded pre-tokens (short ones in one cache line a set, longer ones
// in an open-addressed table), over one fast byte hash.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace ballast::text::detail {

inline uint64_t hash_bytes(std::string_view s) {
  // 64-bit multiply-mix over 8-byte chunks (wyhash-like); quality is ample for a cache.
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t n = s.size();
  uint64_t h = 0x9E3779B97F4A7C15ull ^ (n * 0xC2B2AE3D27D4EB4Full);
  auto mix = [](uint64_t a, uint64_t b) {
    __uint128_t r = static_cast<__uint128_t>(a ^ 0xA0761D6478BD642Full) * (b ^ 0xE7037ED1A0B428DBull);
    return static_cast<uint64_t>(r) ^ static_cast<uint64_t>(r >> 64);
  };
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    h = mix(h, w);
    p += 8;
    n -= 8;
  }
  uint64_t w = 0;
  std::memcpy(&w, p, n);
  h = mix(h, w ^ (static_cast<uint64_t>(n) << 56));
  // fmix64: the slot index takes the low bits.
  h ^= h >> 33;
  h *= 0xFF51AFD7ED558CCDull;
  h ^= h >> 33;
  return h;
}

// Per-thread cache: pre-token bytes -> ids, for one tokenizer (by serial) at a time. A compact
// open-addressed index (8-byte slots: a hash tag and an entry number) over an entry array.
struct WordCache {
  struct Entry {
    uint32_t key_off, val_off;
    uint16_t key_len, val_len;
  };
  struct Slot {
    uint32_t tag;    // high hash bits; 0 = empty
    uint32_t entry;  // index into entries
  };
  static constexpr size_t kSlots = 1 << 17;  // cleared when half full
  static constexpr size_t kMaxWord = 1024;
  uint64_t owner = 0;
  std::vector<Slot> slots;
  std::vector<Entry> entries;
  std::string keys;
  std::vector<int32_t> vals;

  void reset(uint64_t serial) {
    owner = serial;
    slots.assign(kSlots, Slot{0, 0});
    entries.clear();
    keys.clear();
    vals.clear();
  }
  static uint32_t tag_of(uint64_t h) { return static_cast<uint32_t>(h >> 32) | 1u; }
  // Returns the cached entry of word, or nullptr; slot_out receives the slot to fill on a miss.
  const Entry* find(std::string_view word, uint64_t h, size_t& slot_out) const {
    size_t i = h & (kSlots - 1);
    uint32_t tag = tag_of(h);
    for (;;) {
      const Slot& s = slots[i];
      if (s.tag == 0) {
        slot_out = i;
        return nullptr;
      }
      if (s.tag == tag) {
        const Entry& e = entries[s.entry];
        if (e.key_len == word.size() &&
            std::memcmp(keys.data() + e.key_off, word.data(), word.size()) == 0)
          return &e;
      }
      i = (i + 1) & (kSlots - 1);
    }
  }
  void insert(size_t slot, std::string_view word, uint64_t h, const int32_t* ids, size_t n) {
    slots[slot] = Slot{tag_of(h), static_cast<uint32_t>(entries.size())};
    entries.push_back(Entry{static_cast<uint32_t>(keys.size()), static_cast<uint32_t>(vals.size()),
                            static_cast<uint16_t>(word.size()), static_cast<uint16_t>(n)});
    keys.append(word);
    vals.insert(vals.end(), ids, ids + n);
  }
  bool full() const { return entries.size() * 2 >= kSlots || keys.size() > (64u << 20); }
};

// Token text -> id for the vocabulary: one open-addressed table of (hash tag, entry) over an
// array of entries (much faster to build and probe than std::unordered_map at 150k tokens).
class TokenIndex {
 public:
  void reserve(size_t n) {
    entries_.reserve(n);
    rebuild(std::bit_ceil(std::max<size_t>(16, n * 2)));
  }
  // False when text is already present.
  bool emplace(std::string text, int32_t id) {
    if ((entries_.size() + 1) * 2 > slots_.size()) rebuild(std::max<size_t>(16, slots_.size() * 2));
    uint64_t h = hash_bytes(text);
    size_t i = h & mask_;
    uint32_t tag = static_cast<uint32_t>(h >> 32);
    for (;; i = (i + 1) & mask_) {
      Slot& s = slots_[i];
      if (s.entry < 0) {
        s = Slot{tag, static_cast<int32_t>(entries_.size())};
        entries_.emplace_back(std::move(text), id);
        return true;
      }
      if (s.tag == tag && entries_[s.entry].first == text) return false;
    }
  }
  // The id of text, or -1.
  int32_t find(std::string_view text) const {
    if (slots_.empty()) return -1;
    uint64_t h = hash_bytes(text);
    uint32_t tag = static_cast<uint32_t>(h >> 32);
    for (size_t i = h & mask_;; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.entry < 0) return -1;
      if (s.tag == tag && entries_[s.entry].first == text) return entries_[s.entry].second;
    }
  }
  const std::vector<std::pair<std::string, int32_t>>& entries() const { return entries_; }
  size_t size() const { return entries_.size(); }

 private:
  struct Slot {
    uint32_t tag;
    int32_t entry;  // -1 = empty
  };
  void rebuild(size_t cap) {
    slots_.assign(cap, Slot{0, -1});
    mask_ = cap - 1;
    for (size_t e = 0; e < entries_.size(); ++e) {
      uint64_t h = hash_bytes(entries_[e].first);
      size_t i = h & mask_;
      while (slots_[i].entry >= 0) i = (i + 1) & mask_;
      slots_[i] = Slot{static_cast<uint32_t>(h >> 32), static_cast<int32_t>(e)};
    }
  }
  std::vector<Slot> slots_;
  size_t mask_ = 0;
  std::vector<std::pair<std::string, int32_t>> entries_;
};

// Per-thread cache for short pre-tokens (<= 16 bytes, <= 3 ids), the vast majority: 2-way
// set-associative, each set one 64-byte line holding keys and ids, so a lookup touches one
// cache line. A new word goes to way 0 and pushes the old way 0 to way 1.
struct ShortCache {
  struct Slot {
    uint64_t k0, k1;
    int32_t ids[3];
    uint8_t len, nids;  // len 0 = empty
    uint16_t pad;
  };
  struct alignas(64) Set {
    Slot way[2];
  };
  static_assert(sizeof(Set) == 64);
  static constexpr int kBits = 15;
  std::vector<Set> sets;
  void reset() { sets.assign(size_t{1} << kBits, Set{}); }
  static size_t index(uint64_t k0, uint64_t k1, size_t len) {
    uint64_t h = (k0 * 0x9E3779B97F4A7C15ull) ^ ((k1 + len) * 0xC2B2AE3D27D4EB4Full);
    h ^= h >> 29;
    h *= 0xBF58476D1CE4E5B9ull;
    return static_cast<size_t>(h >> (64 - kBits));
  }
};

}  // namespace ballast::text::detail

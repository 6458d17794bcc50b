#pragma once
// Byte-level BPE model: the vocabulary (token string -> id), merges by rank, and the merge loop
// that turns one pre-token (raw bytes) into ids. The 256 byte symbols are the GPT-2 byte-to-
// unicode characters, looked up once at load. Merge ranks live in an open-addressed hash table
// keyed by the pair of ids; short words merge by a linear scan over cached pair ranks, long ones
// through a binary heap over a linked list (both pick the lowest rank, leftmost first, as HF).
#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace ballast::text {

// GPT-2's byte <-> unicode code point mapping used by the ByteLevel pre-tokenizer/decoder.
const std::array<uint32_t, 256>& byte_to_codepoint();
// Inverse: code point -> byte, or -1 when the code point is not one of the 256.
int codepoint_to_byte(uint32_t cp);

class MergeTable {
 public:
  struct Entry {
    uint64_t key;
    int32_t rank;
    int32_t id;
  };
  void reserve(size_t n);
  // Returns false when the pair is already present (the first rank wins, as in HF).
  bool insert(int32_t left, int32_t right, int32_t rank, int32_t id);
  // The entry for (left, right), or nullptr.
  const Entry* find(int32_t left, int32_t right) const {
    uint64_t key = pack(left, right);
    size_t i = hash(key);
    for (;;) {
      const Entry& e = slots_[i];
      if (e.key == key) return &e;
      if (e.key == kEmpty) return nullptr;
      i = (i + 1) & mask_;
    }
  }
  size_t size() const { return size_; }

 private:
  static constexpr uint64_t kEmpty = ~0ull;
  static uint64_t pack(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }
  size_t hash(uint64_t key) const { return (key * 0x9E3779B97F4A7C15ull) >> shift_; }
  std::vector<Entry> slots_;
  size_t mask_ = 0;
  int shift_ = 64;
  size_t size_ = 0;
};

class Bpe {
 public:
  // byte_ids[b]: the vocabulary id of the single-byte symbol for byte b.
  Bpe() = default;
  Bpe(std::array<int32_t, 256> byte_ids, MergeTable merges)
      : byte_ids_(byte_ids), merges_(std::move(merges)) {}

  // Appends the ids of one pre-token (its raw UTF-8 bytes) to out.
  void encode_word(std::string_view word, std::vector<int32_t>& out) const;
  // The heap-based merge loop used for long words (public so tests can compare both paths).
  void encode_long(std::string_view word, std::vector<int32_t>& out) const;
  const MergeTable& merges() const { return merges_; }

 private:
  std::array<int32_t, 256> byte_ids_{};
  MergeTable merges_;
};

}  // namespace ballast::text

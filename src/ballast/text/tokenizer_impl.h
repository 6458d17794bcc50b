#pragma once
// What a Tokenizer holds and how it encodes (internal to text/): tokenizer_json.cpp builds it from
// tokenizer.json, tokenizer.cpp encodes and decodes with it.
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "ballast/core/error.h"
#include "ballast/text/bpe.h"
#include "ballast/text/nfc.h"
#include "ballast/text/token_lookup.h"
#include "ballast/text/tokenizer.h"
#include "ballast/text/utf8.h"

namespace ballast::text {

namespace detail {

// A thread's pre-tokenizer match state and caches, for one tokenizer (by serial) at a time.
struct ThreadState {
  uint64_t owner = 0;
  pcre2_match_data* md = nullptr;
  pcre2_match_context* mctx = nullptr;
  pcre2_jit_stack* jit_stack = nullptr;
  WordCache cache;
  ShortCache short_cache;
  std::string scratch;
  ~ThreadState() {
    if (md) pcre2_match_data_free(md);
    if (mctx) pcre2_match_context_free(mctx);
    if (jit_stack) pcre2_jit_stack_free(jit_stack);
  }
};

}  // namespace detail

struct Tokenizer::Impl {
  using ThreadState = detail::ThreadState;
  using TokenIndex = detail::TokenIndex;
  using WordCache = detail::WordCache;
  using ShortCache = detail::ShortCache;

  std::string origin;
  uint64_t serial = 0;
  Bpe bpe;
  bool nfc = false;
  bool ignore_merges = false;
  TokenIndex vocab;                                    // byte-level text -> id
  std::unordered_map<std::string, int32_t> raw_vocab;  // bytes -> id (ignore_merges only)
  std::vector<std::string> id_bytes;                   // id -> raw bytes
  std::vector<uint8_t> id_kind;                        // 0 unknown, 1 vocab, 2 added, 3 special
  std::vector<AddedToken> added;
  // Added-token matchers: [0] on raw text, [1] on normalized text; by first byte, longest first.
  struct Matcher {
    std::array<bool, 256> first{};
    std::array<std::vector<int>, 256> cands;  // indices into added
    bool empty = true;
  } match_raw, match_norm;
  std::unordered_map<std::string, int32_t> added_by_content;
  pcre2_code* re = nullptr;
  bool jit = false;
  std::vector<int32_t> eos;
  std::optional<int32_t> pad;
  std::string chat_template;

  ~Impl() {
    if (re) pcre2_code_free(re);
  }

  ThreadState& state() const {
    thread_local ThreadState ts;
    if (ts.owner != serial) {
      if (ts.md) pcre2_match_data_free(ts.md);
      ts.md = pcre2_match_data_create_from_pattern(re, nullptr);
      if (!ts.mctx) {
        ts.mctx = pcre2_match_context_create(nullptr);
        ts.jit_stack = pcre2_jit_stack_create(32 * 1024, 4 * 1024 * 1024, nullptr);
        pcre2_jit_stack_assign(ts.mctx, nullptr, ts.jit_stack);
      }
      ts.cache.reset(serial);
      ts.short_cache.reset();
      ts.owner = serial;
    }
    return ts;
  }

  // Finds the leftmost-longest added token in s at or after pos; returns (start, added index).
  std::pair<size_t, int> find_added(const Matcher& m, std::string_view s, size_t pos,
                                    bool parse_special) const {
    for (size_t i = pos; i < s.size(); ++i) {
      auto b = static_cast<unsigned char>(s[i]);
      if (!m.first[b]) continue;
      for (int k : m.cands[b]) {
        const AddedToken& t = added[k];
        if (t.special && !parse_special) continue;
        if (s.compare(i, t.content.size(), t.content) == 0) return {i, k};
      }
    }
    return {s.size(), -1};
  }

  void encode_word(std::string_view word, ThreadState& ts, std::vector<int32_t>& out) const {
    if (ignore_merges) {
      auto it = raw_vocab.find(std::string(word));
      if (it != raw_vocab.end()) {
        out.push_back(it->second);
        return;
      }
    }
    if (word.size() <= 16) {
      uint64_t k[2] = {0, 0};
      std::memcpy(k, word.data(), word.size());
      ShortCache::Set& set = ts.short_cache.sets[ShortCache::index(k[0], k[1], word.size())];
      for (const ShortCache::Slot& slot : set.way)
        if (slot.len == word.size() && slot.k0 == k[0] && slot.k1 == k[1]) {
          out.insert(out.end(), slot.ids, slot.ids + slot.nids);
          return;
        }
      size_t before = out.size();
      bpe.encode_word(word, out);
      size_t n = out.size() - before;
      if (n <= 3) {
        set.way[1] = set.way[0];
        ShortCache::Slot& slot = set.way[0];
        slot.k0 = k[0];
        slot.k1 = k[1];
        slot.len = static_cast<uint8_t>(word.size());
        slot.nids = static_cast<uint8_t>(n);
        std::memcpy(slot.ids, out.data() + before, n * sizeof(int32_t));
      }
      return;
    }
    if (word.size() > WordCache::kMaxWord) {
      bpe.encode_word(word, out);
      return;
    }
    uint64_t h = detail::hash_bytes(word);
    size_t slot;
    if (const WordCache::Entry* s = ts.cache.find(word, h, slot)) {
      const int32_t* v = ts.cache.vals.data() + s->val_off;
      out.insert(out.end(), v, v + s->val_len);
      return;
    }
    size_t before = out.size();
    bpe.encode_word(word, out);
    if (ts.cache.full()) {
      ts.cache.reset(serial);
      ts.cache.find(word, h, slot);
    }
    ts.cache.insert(slot, word, h, out.data() + before, out.size() - before);
  }

  // Pre-tokenizes (regex split, Isolated) and BPE-encodes one normalized piece.
  void encode_piece(std::string_view s, ThreadState& ts, std::vector<int32_t>& out) const {
    auto subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    size_t gap = 0, search = 0, n = s.size();
    while (search < n) {
      int rc = jit ? pcre2_jit_match(re, subject, n, search, 0, ts.md, ts.mctx)
                   : pcre2_match(re, subject, n, search, PCRE2_NO_UTF_CHECK, ts.md, ts.mctx);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(rc, msg, sizeof msg);
        fail("{}: pre-tokenizer regex failed at byte {}: {}", origin, search,
             reinterpret_cast<const char*>(msg));
      }
      PCRE2_SIZE* ov = pcre2_get_ovector_pointer(ts.md);
      size_t start = ov[0], end = ov[1];
      if (end == start) {  // an empty match splits nothing off: search on after one character
        search = start;
        next_codepoint(s, search);
        continue;
      }
      if (start > gap) encode_word(s.substr(gap, start - gap), ts, out);
      encode_word(s.substr(start, end - start), ts, out);
      gap = search = end;
    }
    if (gap < n) encode_word(s.substr(gap), ts, out);
  }

  void encode_normalized(std::string_view s, bool parse_special, ThreadState& ts,
                         std::vector<int32_t>& out) const {
    if (match_norm.empty) return encode_piece(s, ts, out);
    size_t pos = 0;
    while (pos < s.size()) {
      auto [start, k] = find_added(match_norm, s, pos, parse_special);
      if (start > pos) encode_piece(s.substr(pos, start - pos), ts, out);
      if (k < 0) break;
      out.push_back(added[k].id);
      pos = start + added[k].content.size();
    }
  }

  void encode_segment(std::string_view s, bool parse_special, ThreadState& ts,
                      std::vector<int32_t>& out) const {
    if (s.empty()) return;
    if (nfc && detail::nfc(s, ts.scratch, origin)) {
      std::string norm = std::move(ts.scratch);
      ts.scratch.clear();
      return encode_normalized(norm, parse_special, ts, out);
    }
    encode_normalized(s, parse_special, ts, out);
  }
};

}  // namespace ballast::text

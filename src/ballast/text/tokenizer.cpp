#include "ballast/text/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <unordered_map>

#include "ballast/core/error.h"
#include "ballast/text/bpe.h"
#include "ballast/text/utf8.h"

namespace ballast::text {

using json = nlohmann::json;

namespace {

// GPT-2's pre-tokenizer pattern, used by a ByteLevel pre-tokenizer with use_regex = true.
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

std::atomic<uint64_t> g_next_serial{1};

// Room for holes in the id space beyond the tokens a tokenizer.json defines.
constexpr int64_t kIdHoles = 1 << 16;

uint64_t hash_bytes(std::string_view s) {
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

std::string read_file(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  check(static_cast<bool>(f), "{}: cannot open", p.string());
  std::ostringstream ss;
  ss << f.rdbuf();
  return std::move(ss).str();
}

// Byte-level token text (GPT-2 characters) -> raw bytes; tokens with a character outside the
// 256 map are taken as their UTF-8 bytes, as HF's ByteLevel decoder does.
std::string byte_level_to_bytes(std::string_view token) {
  std::string out;
  out.reserve(token.size());
  size_t i = 0;
  while (i < token.size()) {
    uint32_t cp = next_codepoint(token, i);
    int b = codepoint_to_byte(cp);
    if (b < 0) return std::string(token);
    out += static_cast<char>(b);
  }
  return out;
}

std::string bytes_to_byte_level(std::string_view bytes) {
  std::string out;
  for (unsigned char b : bytes) append_codepoint(out, byte_to_codepoint()[b]);
  return out;
}

// NFC without rescanning everything: a code point that has canonical combining class 0 and
// NFC_Quick_Check=Yes (unchanged by NFC and never the second of a composition) is a
// normalisation boundary, so only the runs of other code points, together with the boundary
// character before each run (which they may compose with), go through utf8proc.
class NfcBoundaries {
 public:
  NfcBoundaries() : bits_(kLimit / 64, 0) {
    std::vector<uint8_t> second(kLimit, 0);
    for (uint32_t c = 0; c < kLimit; ++c) {
      utf8proc_int32_t d[8];
      int opts = UTF8PROC_DECOMPOSE;
      utf8proc_ssize_t n = utf8proc_decompose_char(static_cast<utf8proc_int32_t>(c), d, 8,
                                                   static_cast<utf8proc_option_t>(opts), nullptr);
      if (n >= 2 && nfc_of(c) == c && static_cast<uint32_t>(d[n - 1]) < kLimit) second[d[n - 1]] = 1;
    }
    for (uint32_t c = 0x1161; c <= 0x1175; ++c) second[c] = 1;  // Hangul V jamo
    for (uint32_t c = 0x11A8; c <= 0x11C2; ++c) second[c] = 1;  // Hangul T jamo
    for (uint32_t c = 0; c < kLimit; ++c) {
      if (c >= 0xD800 && c <= 0xDFFF) continue;
      bool inert = !second[c] && utf8proc_get_property(static_cast<utf8proc_int32_t>(c))->combining_class == 0 &&
                   nfc_of(c) == c;
      if (inert) bits_[c >> 6] |= 1ull << (c & 63);
    }
  }
  bool boundary(uint32_t c) const {
    if (c < kLimit) return (bits_[c >> 6] >> (c & 63)) & 1;
    return !(c >= 0x2F800 && c <= 0x2FA1F) && c < 0xE0000;  // CJK compatibility supplement
  }
  static const NfcBoundaries& get() {
    static const NfcBoundaries table;
    return table;
  }

 private:
  static constexpr uint32_t kLimit = 0x20000;
  static uint32_t nfc_of(uint32_t c) {
    utf8proc_int32_t in = static_cast<utf8proc_int32_t>(c), out[8];
    utf8proc_ssize_t n = utf8proc_decompose_char(in, out, 8, UTF8PROC_DECOMPOSE, nullptr);
    if (n == 1) return static_cast<uint32_t>(out[0]);
    if (n < 1 || n > 8) return ~0u;
    n = utf8proc_reencode(out, n, static_cast<utf8proc_option_t>(UTF8PROC_COMPOSE | UTF8PROC_STABLE));
    if (n < 0) return ~0u;
    // reencode wrote UTF-8 into out's storage; decode its single code point if any.
    const auto* u = reinterpret_cast<const utf8proc_uint8_t*>(out);
    utf8proc_int32_t cp;
    utf8proc_ssize_t k = utf8proc_iterate(u, n, &cp);
    return k == n ? static_cast<uint32_t>(cp) : ~0u;
  }
  std::vector<uint64_t> bits_;
};

// Returns true and writes NFC(s) to out when NFC changes s or may change it; false when s is
// certainly in NFC (out untouched).
bool nfc(std::string_view s, std::string& out, std::string_view origin) {
  const NfcBoundaries* table = nullptr;
  size_t i = 0, n = s.size(), done = 0;
  size_t last_boundary = 0;  // start of the last boundary character seen
  bool any = false;
  while (i < n) {
    auto b = static_cast<unsigned char>(s[i]);
    if (b < 0x80) { last_boundary = i++; continue; }
    size_t start = i;
    uint32_t c = next_codepoint(s, i);
    if (!table) table = &NfcBoundaries::get();
    if (table->boundary(c)) { last_boundary = start; continue; }
    // A run of non-boundary code points: extend to the next boundary character.
    size_t from = std::max(last_boundary, done);
    if (from > start) from = start;
    size_t end = i;
    while (end < n) {
      size_t k = end;
      uint32_t d = next_codepoint(s, k);
      if (d < 0x80 || table->boundary(d)) break;
      end = k;
    }
    if (!any) {
      out.clear();
      out.reserve(n + 16);
      any = true;
    }
    out.append(s.data() + done, from - done);
    utf8proc_uint8_t* dst = nullptr;
    utf8proc_ssize_t len = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data() + from),
                                        static_cast<utf8proc_ssize_t>(end - from), &dst,
                                        static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
    if (len < 0) fail("{}: NFC normalisation failed at byte {}: {}", origin, from, utf8proc_errmsg(len));
    out.append(reinterpret_cast<char*>(dst), static_cast<size_t>(len));
    std::free(dst);
    done = i = end;
    last_boundary = end;
  }
  if (any) out.append(s.data() + done, n - done);
  return any;
}

}  // namespace

struct Tokenizer::Impl {
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
    uint64_t h = hash_bytes(word);
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
    if (nfc && text::nfc(s, ts.scratch, origin)) {
      std::string norm = std::move(ts.scratch);
      ts.scratch.clear();
      return encode_normalized(norm, parse_special, ts, out);
    }
    encode_normalized(s, parse_special, ts, out);
  }
};

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

namespace {

const json& field(const json& j, const char* key, std::string_view where) {
  auto it = j.find(key);
  if (it == j.end()) fail("{}: missing field '{}'", where, key);
  return *it;
}

std::string str_field(const json& j, const char* key, std::string_view where) {
  const json& v = field(j, key, where);
  if (!v.is_string()) fail("{}: field '{}' must be a string", where, key);
  return v.get<std::string>();
}

bool bool_field(const json& j, const char* key, bool dflt) {
  auto it = j.find(key);
  return it == j.end() || it->is_null() ? dflt : it->get<bool>();
}

// A token given as "text" or {"content": "text"} in tokenizer_config.json.
std::optional<std::string> token_text(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return std::nullopt;
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object() && it->contains("content") && (*it)["content"].is_string())
    return (*it)["content"].get<std::string>();
  return std::nullopt;
}

void parse_normalizer(const json& n, Tokenizer::Impl& t, const std::string& where) {
  if (n.is_null()) return;
  std::string type = str_field(n, "type", where);
  if (type == "NFC") {
    t.nfc = true;
  } else if (type == "Sequence") {
    const json& list = field(n, "normalizers", where);
    for (size_t i = 0; i < list.size(); ++i)
      parse_normalizer(list[i], t, fmt::format("{}.normalizers[{}]", where, i));
  } else {
    fail("{}: normalizer type '{}' is not supported (only NFC)", where, type);
  }
}

void parse_pre_tokenizer(const json& p, std::string& pattern, const std::string& where) {
  if (p.is_null()) fail("{}: a pre_tokenizer is required (Split and/or ByteLevel)", where);
  std::string type = str_field(p, "type", where);
  if (type == "Sequence") {
    const json& list = field(p, "pretokenizers", where);
    if (!list.is_array()) fail("{}: 'pretokenizers' must be an array", where);
    for (size_t i = 0; i < list.size(); ++i)
      parse_pre_tokenizer(list[i], pattern, fmt::format("{}.pretokenizers[{}]", where, i));
  } else if (type == "Split") {
    if (!pattern.empty()) fail("{}: only one regex split is supported", where);
    const json& pat = field(p, "pattern", where);
    if (pat.contains("Regex")) {
      pattern = pat["Regex"].get<std::string>();
    } else if (pat.contains("String")) {
      // A literal string: quote it for PCRE2.
      pattern = "\\Q" + pat["String"].get<std::string>() + "\\E";
    } else {
      fail("{}.pattern: expected 'Regex' or 'String'", where);
    }
    std::string behavior = str_field(p, "behavior", where);
    if (behavior != "Isolated")
      fail("{}: Split behavior '{}' is not supported (only Isolated)", where, behavior);
    if (bool_field(p, "invert", false)) fail("{}: Split with invert=true is not supported", where);
  } else if (type == "ByteLevel") {
    if (bool_field(p, "add_prefix_space", false))
      fail("{}: ByteLevel add_prefix_space=true is not supported", where);
    if (bool_field(p, "use_regex", true)) {
      if (!pattern.empty()) fail("{}: ByteLevel use_regex after a Split is not supported", where);
      pattern = std::string(kGpt2Pattern);
    }
  } else {
    fail("{}: pre_tokenizer type '{}' is not supported (Split, ByteLevel, Sequence)", where, type);
  }
}

}  // namespace

Tokenizer Tokenizer::from_json(std::string_view tokenizer_json, std::string_view config_json,
                               std::string_view origin_sv) {
  auto t = std::make_unique<Impl>();
  t->origin = std::string(origin_sv);
  t->serial = g_next_serial.fetch_add(1);
  const std::string& origin = t->origin;
  json j;
  try {
    j = json::parse(tokenizer_json);
  } catch (const json::exception& e) {  // out_of_range too: a number beyond a double
    fail("{}: malformed JSON: {}", origin, e.what());
  }
  try {
    if (!j.is_object()) fail("{}: expected a JSON object at top level", origin);
    // Model: BPE with a vocabulary and merges.
    const json& model = field(j, "model", origin);
    std::string mwhere = origin + ": model";
    if (model.contains("type") && model["type"] != "BPE")
      fail("{}: type '{}' is not supported (only BPE)", mwhere, model["type"].dump());
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
      auto it = model.find(key);
      if (it != model.end() && !it->is_null() && !it->get<std::string>().empty())
        fail("{}: '{}' is not supported", mwhere, key);
    }
    if (bool_field(model, "byte_fallback", false))
      fail("{}: byte_fallback is not supported (byte-level BPE only)", mwhere);
    t->ignore_merges = bool_field(model, "ignore_merges", false);
    const json& vocab = field(model, "vocab", mwhere);
    if (!vocab.is_object()) fail("{}: 'vocab' must be an object of token -> id", mwhere);
    int32_t max_id = -1;
    // Ids index tables of (largest id + 1) entries: they must be dense, below the number of tokens
    // defined plus some room for holes, so that one stray id cannot ask for gigabytes.
    auto added_json = j.find("added_tokens");
    const size_t defined = vocab.size() + (added_json != j.end() && added_json->is_array() ? added_json->size() : 0);
    const int64_t id_limit = std::min<int64_t>(int64_t(defined) + kIdHoles, INT32_MAX);
    auto valid_id = [&](const json& v) {
      return v.is_number_integer() && !(v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX)) &&
             v.get<int64_t>() >= 0 && v.get<int64_t>() < id_limit;
    };
    t->vocab.reserve(vocab.size() + 64);
    for (auto it = vocab.begin(); it != vocab.end(); ++it) {
      if (!valid_id(it.value()))
        fail("{}: vocab['{}'] is {}, not an id in [0, {}) ({} tokens defined)", mwhere, it.key(), it.value().dump(),
             id_limit, defined);
      int32_t id = it.value().get<int32_t>();
      t->vocab.emplace(it.key(), id);
      max_id = std::max(max_id, id);
    }
    // Added tokens.
    if (auto it = j.find("added_tokens"); it != j.end() && !it->is_null()) {
      for (size_t i = 0; i < it->size(); ++i) {
        const json& a = (*it)[i];
        std::string where = fmt::format("{}: added_tokens[{}]", origin, i);
        AddedToken tok;
        const json& idj = field(a, "id", where);
        if (!valid_id(idj))
          fail("{}: 'id' is {}, not an id in [0, {}) ({} tokens defined)", where, idj.dump(), id_limit, defined);
        tok.id = idj.get<int32_t>();
        tok.content = str_field(a, "content", where);
        if (tok.content.empty()) fail("{}: empty 'content'", where);
        tok.special = bool_field(a, "special", false);
        tok.normalized = bool_field(a, "normalized", !tok.special);
        if (bool_field(a, "lstrip", false) || bool_field(a, "rstrip", false) ||
            bool_field(a, "single_word", false))
          fail("{} ('{}'): lstrip/rstrip/single_word are not supported", where, tok.content);
        max_id = std::max(max_id, tok.id);
        t->added_by_content[tok.content] = tok.id;
        t->added.push_back(std::move(tok));
      }
    }
    if (max_id < 0) fail("{}: empty vocabulary", mwhere);
    t->id_bytes.assign(static_cast<size_t>(max_id) + 1, std::string());
    t->id_kind.assign(static_cast<size_t>(max_id) + 1, 0);
    for (const auto& [text, id] : t->vocab.entries()) {
      t->id_bytes[id] = byte_level_to_bytes(text);
      t->id_kind[id] = 1;
      if (t->ignore_merges) t->raw_vocab.emplace(t->id_bytes[id], id);
    }
    for (size_t k = 0; k < t->added.size(); ++k) {
      const AddedToken& a = t->added[k];
      t->id_bytes[a.id] = byte_level_to_bytes(a.content);
      t->id_kind[a.id] = a.special ? 3 : 2;
      Impl::Matcher& m = a.normalized ? t->match_norm : t->match_raw;
      auto b = static_cast<unsigned char>(a.content[0]);
      m.first[b] = true;
      m.cands[b].push_back(static_cast<int>(k));
      m.empty = false;
    }
    for (Impl::Matcher* m : {&t->match_raw, &t->match_norm})
      for (auto& c : m->cands)
        std::stable_sort(c.begin(), c.end(), [&](int x, int y) {
          return t->added[x].content.size() > t->added[y].content.size();
        });
    // Byte symbols and merges.
    std::array<int32_t, 256> byte_ids{};
    for (int b = 0; b < 256; ++b) {
      std::string sym;
      append_codepoint(sym, byte_to_codepoint()[b]);
      int32_t id = t->vocab.find(sym);
      if (id < 0) fail("{}: vocab lacks the byte-level symbol '{}' for byte 0x{:02X}", mwhere, sym, b);
      byte_ids[b] = id;
    }
    const json& merges = field(model, "merges", mwhere);
    if (!merges.is_array()) fail("{}: 'merges' must be an array", mwhere);
    MergeTable table;
    table.reserve(merges.size());
    std::string ab;
    for (size_t r = 0; r < merges.size(); ++r) {
      const json& m = merges[r];
      std::string_view a, b;
      if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
        a = m[0].get_ref<const std::string&>();
        b = m[1].get_ref<const std::string&>();
      } else if (m.is_string()) {
        std::string_view s = m.get_ref<const std::string&>();
        size_t sp = s.find(' ');
        if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
          fail("{}: merges[{}] '{}' is not two tokens separated by one space", mwhere, r, s);
        a = s.substr(0, sp);
        b = s.substr(sp + 1);
      } else {
        fail("{}: merges[{}] must be [\"a\", \"b\"] or \"a b\"", mwhere, r);
      }
      ab.assign(a);
      ab.append(b);
      int32_t ia = t->vocab.find(a), ib = t->vocab.find(b), iab = t->vocab.find(ab);
      if (ia < 0 || ib < 0 || iab < 0)
        fail("{}: merges[{}] ('{}' '{}') uses a token missing from vocab", mwhere, r, a, b);
      table.insert(ia, ib, static_cast<int32_t>(r), iab);
    }
    t->bpe = Bpe(byte_ids, std::move(table));
    // Normalizer, pre-tokenizer, decoder.
    if (auto it = j.find("normalizer"); it != j.end())
      parse_normalizer(*it, *t, origin + ": normalizer");
    std::string pattern;
    parse_pre_tokenizer(j.contains("pre_tokenizer") ? j["pre_tokenizer"] : json(), pattern,
                        origin + ": pre_tokenizer");
    if (pattern.empty()) fail("{}: pre_tokenizer has no regex split", origin);
    if (auto it = j.find("decoder"); it != j.end() && !it->is_null()) {
      std::string type = str_field(*it, "type", origin + ": decoder");
      if (type != "ByteLevel")
        fail("{}: decoder type '{}' is not supported (only ByteLevel)", origin, type);
    }
    int err;
    PCRE2_SIZE err_off;
    t->re = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                          PCRE2_UTF | PCRE2_UCP, &err, &err_off, nullptr);
    if (!t->re) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      fail("{}: pre_tokenizer regex does not compile at offset {}: {}", origin, err_off,
           reinterpret_cast<const char*>(msg));
    }
    t->jit = pcre2_jit_compile(t->re, PCRE2_JIT_COMPLETE) == 0;
  } catch (const json::exception& e) {
    fail("{}: malformed tokenizer.json: {}", origin, e.what());
  }

  // tokenizer_config.json: eos, pad, chat template.
  if (!config_json.empty()) {
    std::string cwhere = origin + " (tokenizer_config.json)";
    json c;
    try {
      c = json::parse(config_json);
    } catch (const json::exception& e) {
      fail("{}: malformed JSON: {}", cwhere, e.what());
    }
    check(c.is_object(), "{}: expected a JSON object at top level", cwhere);
    auto resolve = [&](const char* key) -> std::optional<int32_t> {
      auto text = token_text(c, key);
      if (!text) return std::nullopt;
      auto it = t->added_by_content.find(*text);
      if (it != t->added_by_content.end()) return it->second;
      if (int32_t v = t->vocab.find(bytes_to_byte_level(*text)); v >= 0) return v;
      fail("{}: {} '{}' is not a token of the tokenizer (unknown special token)", cwhere, key,
           *text);
    };
    if (auto eos = resolve("eos_token")) t->eos.push_back(*eos);
    t->pad = resolve("pad_token");
    if (auto it = c.find("chat_template"); it != c.end() && !it->is_null()) {
      if (it->is_string()) {
        t->chat_template = it->get<std::string>();
      } else if (it->is_array()) {
        for (size_t i = 0; i < it->size(); ++i) {
          const json& e = (*it)[i];
          check(e.is_object() && e.contains("name") && e["name"].is_string() &&
                    (!e.contains("template") || e["template"].is_string()),
                "{}: chat_template[{}] must be an object with string fields \"name\" and \"template\"", cwhere, i);
          if (e["name"] == "default") t->chat_template = e.value("template", "");
        }
      } else {
        fail("{}: chat_template must be a string or a list of named templates", cwhere);
      }
    }
  }
  return Tokenizer(std::move(t));
}

Tokenizer Tokenizer::load(const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  fs::path tok_path = fs::is_directory(dir) ? dir / "tokenizer.json" : dir;
  fs::path base = tok_path.parent_path();
  check(fs::exists(tok_path), "{}: no tokenizer.json there", dir.string());
  std::string config;
  if (fs::path c = base / "tokenizer_config.json"; fs::exists(c)) config = read_file(c);
  Tokenizer tok = from_json(read_file(tok_path), config, tok_path.string());
  if (fs::path g = base / "generation_config.json"; fs::exists(g)) {
    json gj;
    try {
      gj = json::parse(read_file(g));
    } catch (const json::exception& e) {
      fail("{}: malformed JSON: {}", g.string(), e.what());
    }
    auto add = [&](const json& v) {
      if (!v.is_number_integer()) fail("{}: eos_token_id must be an integer or a list", g.string());
      // Read wide before the range check: 2^32 + 5 must not become 5.
      check(v.is_number_unsigned() ? v.get<uint64_t>() < uint64_t(tok.vocab_size())
                                   : v.get<int64_t>() >= 0 && v.get<int64_t>() < tok.vocab_size(),
            "{}: eos_token_id {} is out of range (vocabulary of {})", g.string(), v.dump(), tok.vocab_size());
      const auto id = v.get<int32_t>();
      auto& eos = tok.impl_->eos;
      if (std::find(eos.begin(), eos.end(), id) == eos.end()) eos.push_back(id);
    };
    if (auto it = gj.find("eos_token_id"); it != gj.end() && !it->is_null()) {
      if (it->is_array())
        for (const json& v : *it) add(v);
      else
        add(*it);
    }
  }
  return tok;
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool parse_special) const {
  check_utf8(text);
  const Impl& t = *impl_;
  ThreadState& ts = t.state();
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  size_t pos = 0;
  if (t.match_raw.empty) {
    t.encode_segment(text, parse_special, ts, out);
    return out;
  }
  while (pos < text.size()) {
    auto [start, k] = t.find_added(t.match_raw, text, pos, parse_special);
    if (start > pos) t.encode_segment(text.substr(pos, start - pos), parse_special, ts, out);
    if (k < 0) break;
    out.push_back(t.added[k].id);
    pos = start + t.added[k].content.size();
  }
  return out;
}

std::string_view Tokenizer::token_bytes(int32_t id) const {
  const Impl& t = *impl_;
  if (id < 0 || static_cast<size_t>(id) >= t.id_kind.size() || t.id_kind[id] == 0)
    fail("{}: token id {} is not in the vocabulary (size {})", t.origin, id, t.id_kind.size());
  return t.id_bytes[id];
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special) const {
  std::string bytes;
  bytes.reserve(ids.size() * 4);
  for (int32_t id : ids) {
    std::string_view b = token_bytes(id);
    if (skip_special && impl_->id_kind[id] == 3) continue;
    bytes.append(b);
  }
  if (valid_utf8_prefix(bytes) == bytes.size()) return bytes;
  std::string out;
  append_utf8_lossy(out, bytes, true);
  return out;
}

int32_t Tokenizer::vocab_size() const { return static_cast<int32_t>(impl_->id_kind.size()); }

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  std::string key(token);
  if (auto it = impl_->added_by_content.find(key); it != impl_->added_by_content.end())
    return it->second;
  if (int32_t id = impl_->vocab.find(key); id >= 0) return id;
  return std::nullopt;
}

int32_t Tokenizer::special_token_id(std::string_view content) const {
  auto it = impl_->added_by_content.find(std::string(content));
  if (it == impl_->added_by_content.end())
    fail("{}: unknown special token '{}' (not among its {} added tokens)", impl_->origin, content,
         impl_->added.size());
  return it->second;
}

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && static_cast<size_t>(id) < impl_->id_kind.size() && impl_->id_kind[id] == 3;
}

const std::vector<AddedToken>& Tokenizer::added_tokens() const { return impl_->added; }
const std::vector<int32_t>& Tokenizer::eos_token_ids() const { return impl_->eos; }
std::optional<int32_t> Tokenizer::pad_token_id() const { return impl_->pad; }
const std::string& Tokenizer::chat_template() const { return impl_->chat_template; }

std::string Tokenizer::render_chat(std::span<const ChatMessage> messages,
                                   const ChatOptions& options) const {
  return render_chatml(messages, options);
}

std::string normalize_nfc(std::string_view text) {
  check_utf8(text);
  std::string out;
  if (nfc(text, out, "normalize_nfc")) return out;
  return std::string(text);
}

size_t StreamDecoder::push(int32_t id, std::string& out) {
  std::string_view b = tok_->token_bytes(id);
  if (skip_special_ && tok_->is_special(id)) return 0;
  pending_.append(b);
  size_t before = out.size();
  size_t used = append_utf8_lossy(out, pending_, false);
  pending_.erase(0, used);
  return out.size() - before;
}

std::string StreamDecoder::push(int32_t id) {
  std::string out;
  push(id, out);
  return out;
}

std::string StreamDecoder::flush() {
  std::string out;
  append_utf8_lossy(out, pending_, true);
  pending_.clear();
  return out;
}

}  // namespace ballast::text

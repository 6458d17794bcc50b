// Tokenizer::from_json and Tokenizer::load: tokenizer.json (the vocabulary, merges, added tokens,
// normalizer and pre-tokenizer as Hugging Face's tokenizers writes them), tokenizer_config.json
// and generation_config.json into a Tokenizer::Impl, with an error naming what is wrong.
#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "ballast/text/tokenizer_impl.h"

namespace ballast::text {

using json = nlohmann::json;

namespace {

// GPT-2's pre-tokenizer pattern, used by a ByteLevel pre-tokenizer with use_regex = true.
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

std::atomic<uint64_t> g_next_serial{1};

// Room for holes in the id space beyond the tokens a tokenizer.json defines.
constexpr int64_t kIdHoles = 1 << 16;

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

}  // namespace ballast::text

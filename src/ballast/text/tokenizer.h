#pragma once
// A Hugging Face tokenizer.json of the byte-level BPE family (GPT-2, Qwen2/3, Qwen3-Next,
// Qwen3.5), encoded exactly as the `tokenizers` library does:
//   added tokens (special or not) are split out first, leftmost-longest, on the raw text;
//   each remaining piece is NFC-normalised, split by the pre-tokenizer regex (PCRE2, UTF+UCP,
//   JIT; the pattern exactly as tokenizer.json gives it), mapped to bytes and merged by BPE rank.
// Decoding maps ids back to bytes and turns them into UTF-8 lossily (U+FFFD for invalid bytes).
// tokenizer_config.json (optional, beside tokenizer.json) gives eos/pad tokens and the chat
// template; generation_config.json, when present, adds its eos_token_id list.
//
// Thread safety: a loaded Tokenizer is immutable; encode/decode may run concurrently. Each
// thread keeps its own pre-token cache.
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "ballast/text/chat.h"
#include "ballast/text/nfc.h"  // normalize_nfc

namespace ballast::text {

struct AddedToken {
  int32_t id = -1;
  std::string content;
  bool special = false;
  bool normalized = false;
};

class Tokenizer {
 public:
  // dir: a directory holding tokenizer.json (and optionally tokenizer_config.json,
  // generation_config.json), or the path of a tokenizer.json itself.
  static Tokenizer load(const std::filesystem::path& dir);
  // From the JSON texts; `config_json` may be empty. `origin` names the source in errors.
  static Tokenizer from_json(std::string_view tokenizer_json, std::string_view config_json = {},
                             std::string_view origin = "tokenizer.json");

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Text (valid UTF-8, else ballast::Error with the byte offset) -> ids. With parse_special
  // false, special added tokens in the text are encoded as plain text (HF split_special_tokens);
  // non-special added tokens (<think>, <tool_call>) are still matched.
  std::vector<int32_t> encode(std::string_view text, bool parse_special = true) const;
  // ids -> text; invalid UTF-8 byte sequences decode to U+FFFD. Unknown ids are an error.
  std::string decode(std::span<const int32_t> ids, bool skip_special = false) const;
  // The raw bytes of one token (no UTF-8 repair); empty for skipped specials.
  std::string_view token_bytes(int32_t id) const;

  // Number of ids (vocabulary plus added tokens; the largest id + 1).
  int32_t vocab_size() const;
  // The id of a token given by its text (vocab entry in byte-level form, or added token), if any.
  std::optional<int32_t> token_to_id(std::string_view token) const;
  // The id of an added/special token such as "<|im_end|>"; ballast::Error when unknown.
  int32_t special_token_id(std::string_view content) const;
  bool is_special(int32_t id) const;
  const std::vector<AddedToken>& added_tokens() const;

  // End-of-sequence ids: tokenizer_config's eos_token, then generation_config's eos_token_id.
  const std::vector<int32_t>& eos_token_ids() const;
  std::optional<int32_t> pad_token_id() const;
  // The Jinja chat template text from tokenizer_config.json (empty when absent).
  const std::string& chat_template() const;

  // Renders messages in the Qwen ChatML format (see chat.h).
  std::string render_chat(std::span<const ChatMessage> messages,
                          const ChatOptions& options = {}) const;

  struct Impl;

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Streaming detokenization: push one id at a time, get back only complete UTF-8 text. The
// concatenation of all push() results and flush() equals Tokenizer::decode of all the ids.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tokenizer, bool skip_special = false)
      : tok_(&tokenizer), skip_special_(skip_special) {}
  std::string push(int32_t id);
  // Appends the text now complete to out; returns the number of bytes appended.
  size_t push(int32_t id, std::string& out);
  // Emits what is still pending (an incomplete sequence becomes U+FFFD) and resets.
  std::string flush();
  // Bytes held back because they do not yet form a complete character.
  size_t pending() const { return pending_.size(); }
  void reset() { pending_.clear(); }

 private:
  const Tokenizer* tok_;
  bool skip_special_;
  std::string pending_;
};

}  // namespace ballast::text

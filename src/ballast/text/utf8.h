#pragma once
// UTF-8 helpers for the tokenizer: strict validation that names the byte offset at fault, and
// lossy decoding of byte strings (each maximal invalid subpart becomes one U+FFFD, as Rust's
// String::from_utf8_lossy does, which is what HF tokenizers' byte-level decoder uses).
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace ballast::text {

// Length of the longest valid UTF-8 prefix of s (== s.size() when all of s is valid).
size_t valid_utf8_prefix(std::string_view s);

// Throws ballast::Error naming `what` and the byte offset of the first invalid sequence.
void check_utf8(std::string_view s, std::string_view what = "input text");

// Appends the lossy UTF-8 decoding of bytes to out. When final is false, a trailing incomplete
// (but so far valid) sequence is not consumed; returns the number of bytes consumed.
size_t append_utf8_lossy(std::string& out, std::string_view bytes, bool final);

// Decodes one code point at s[i] (s must be valid UTF-8); advances i.
inline uint32_t next_codepoint(std::string_view s, size_t& i) {
  auto b = static_cast<unsigned char>(s[i]);
  if (b < 0x80) { ++i; return b; }
  if (b < 0xE0) {
    uint32_t c = ((b & 0x1Fu) << 6) | (static_cast<unsigned char>(s[i + 1]) & 0x3Fu);
    i += 2;
    return c;
  }
  if (b < 0xF0) {
    uint32_t c = ((b & 0x0Fu) << 12) | ((static_cast<unsigned char>(s[i + 1]) & 0x3Fu) << 6) |
                 (static_cast<unsigned char>(s[i + 2]) & 0x3Fu);
    i += 3;
    return c;
  }
  uint32_t c = ((b & 0x07u) << 18) | ((static_cast<unsigned char>(s[i + 1]) & 0x3Fu) << 12) |
               ((static_cast<unsigned char>(s[i + 2]) & 0x3Fu) << 6) |
               (static_cast<unsigned char>(s[i + 3]) & 0x3Fu);
  i += 4;
  return c;
}

void append_codepoint(std::string& out, uint32_t c);

}  // namespace ballast::text

#pragma once
// Unicode NFC (canonical composition), as the tokenizer's normaliser applies it, through utf8proc
// and only over the runs of text it may change.
#include <string>
#include <string_view>

namespace ballast::text {

// Unicode NFC of valid UTF-8 text (ballast::Error with the byte offset otherwise), as the
// tokenizer's normaliser applies it.
std::string normalize_nfc(std::string_view text);

namespace detail {
// Returns true and writes NFC(s) to out when NFC changes s or may change it; false when s is
// certainly in NFC (out untouched). `origin` names the text in errors.
bool nfc(std::string_view s, std::string& out, std::string_view origin);
}  // namespace detail

}  // namespace ballast::text

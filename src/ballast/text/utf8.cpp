#include "ballast/text/utf8.h"

#include <cstring>

#include "ballast/core/error.h"

namespace ballast::text {
namespace {

// Result of looking at the sequence starting at s[i]: its length when valid (>0); else the
// length of its maximal invalid subpart as a negative number; or 0 when the bytes run out while
// the sequence is still a valid prefix.
int classify(const unsigned char* p, size_t n) {
  unsigned char b = p[0];
  if (b < 0x80) return 1;
  int len;
  unsigned char lo = 0x80, hi = 0xBF;  // bounds for the second byte
  if (b >= 0xC2 && b <= 0xDF) {
    len = 2;
  } else if (b >= 0xE0 && b <= 0xEF) {
    len = 3;
    if (b == 0xE0) lo = 0xA0;
    if (b == 0xED) hi = 0x9F;  // no surrogates
  } else if (b >= 0xF0 && b <= 0xF4) {
    len = 4;
    if (b == 0xF0) lo = 0x90;
    if (b == 0xF4) hi = 0x8F;
  } else {
    return -1;
  }
  for (int k = 1; k < len; ++k) {
    if (static_cast<size_t>(k) >= n) return 0;
    unsigned char c = p[k];
    unsigned char l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
    if (c < l || c > h) return -k;
  }
  return len;
}

}  // namespace

size_t valid_utf8_prefix(std::string_view s) {
  auto p = reinterpret_cast<const unsigned char*>(s.data());
  size_t n = s.size(), i = 0;
  while (i < n) {
    // ASCII fast path, 8 bytes at a time.
    while (i + 8 <= n) {
      uint64_t w;
      std::memcpy(&w, p + i, 8);
      if (w & 0x8080808080808080ull) break;
      i += 8;
    }
    if (i >= n) break;
    if (p[i] < 0x80) { ++i; continue; }
    int r = classify(p + i, n - i);
    if (r <= 0) return i;
    i += static_cast<size_t>(r);
  }
  return n;
}

void check_utf8(std::string_view s, std::string_view what) {
  size_t k = valid_utf8_prefix(s);
  if (k == s.size()) return;
  auto p = reinterpret_cast<const unsigned char*>(s.data());
  int r = classify(p + k, s.size() - k);
  fail("{}: invalid UTF-8 at byte offset {} (byte 0x{:02X}{})", what, k, p[k],
       r == 0 ? ", truncated sequence at end of input" : "");
}

size_t append_utf8_lossy(std::string& out, std::string_view bytes, bool final) {
  auto p = reinterpret_cast<const unsigned char*>(bytes.data());
  size_t n = bytes.size(), i = 0;
  while (i < n) {
    size_t k = valid_utf8_prefix(bytes.substr(i));
    out.append(bytes.data() + i, k);
    i += k;
    if (i >= n) break;
    int r = classify(p + i, n - i);
    if (r == 0) {
      if (!final) return i;  // incomplete: wait for more bytes
      out += "\xEF\xBF\xBD";
      return n;
    }
    out += "\xEF\xBF\xBD";
    i += static_cast<size_t>(-r);
  }
  return n;
}

void append_codepoint(std::string& out, uint32_t c) {
  if (c < 0x80) {
    out += static_cast<char>(c);
  } else if (c < 0x800) {
    out += static_cast<char>(0xC0 | (c >> 6));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else if (c < 0x10000) {
    out += static_cast<char>(0xE0 | (c >> 12));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (c >> 18));
    out += static_cast<char>(0x80 | ((c >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((c >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (c & 0x3F));
  }
}

}  // namespace ballast::text

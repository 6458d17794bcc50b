#include "ballast/text/nfc.h"

#include <utf8proc.h>

#include <cstdint>
#include <vector>

#include "ballast/core/error.h"
#include "ballast/text/utf8.h"

namespace ballast::text {

namespace detail {
namespace {

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

}  // namespace

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

}  // namespace detail

std::string normalize_nfc(std::string_view text) {
  check_utf8(text);
  std::string out;
  if (detail::nfc(text, out, "normalize_nfc")) return out;
  return std::string(text);
}

}  // namespace ballast::text

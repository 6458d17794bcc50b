#include <gtest/gtest.h>

#include "ballast/core/error.h"
#include "ballast/text/utf8.h"

using namespace ballast::text;

TEST(Utf8, ValidPrefix) {
  EXPECT_EQ(valid_utf8_prefix("hello"), 5u);
  EXPECT_EQ(valid_utf8_prefix("h\xC3\xA9llo"), 6u);
  EXPECT_EQ(valid_utf8_prefix("ab\xE4\xB8"), 2u);            // truncated
  EXPECT_EQ(valid_utf8_prefix("ab\xC0\xAF"), 2u);            // overlong
  EXPECT_EQ(valid_utf8_prefix("ab\xED\xA0\x80"), 2u);        // surrogate
  EXPECT_EQ(valid_utf8_prefix("ab\xF4\x90\x80\x80"), 2u);    // > U+10FFFF
  EXPECT_EQ(valid_utf8_prefix("\xF0\x9F\x98\x80 ok"), 7u);  // emoji
}

TEST(Utf8, CheckNamesOffset) {
  try {
    check_utf8("abc\xFF" "def", "prompt");
    FAIL() << "no error";
  } catch (const ballast::Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("prompt"), std::string::npos) << m;
    EXPECT_NE(m.find("byte offset 3"), std::string::npos) << m;
    EXPECT_NE(m.find("0xFF"), std::string::npos) << m;
  }
}

TEST(Utf8, LossyMatchesRustFromUtf8Lossy) {
  auto lossy = [](std::string_view s) {
    std::string out;
    append_utf8_lossy(out, s, true);
    return out;
  };
  const std::string R = "\xEF\xBF\xBD";
  EXPECT_EQ(lossy("a\xFF" "b"), "a" + R + "b");
  EXPECT_EQ(lossy("a\xE4\xB8" "b"), "a" + R + "b");  // maximal subpart -> one U+FFFD
  EXPECT_EQ(lossy("\xE4\xB8"), R);
  EXPECT_EQ(lossy("\xC0\xAF"), R + R);               // C0 is never valid: two
  EXPECT_EQ(lossy("\xED\xA0\x80"), R + R + R);       // surrogate: ED then two continuation bytes
  EXPECT_EQ(lossy("\xF0\x9F\x98"), R);
  std::string out;
  EXPECT_EQ(append_utf8_lossy(out, "ab\xF0\x9F\x98", false), 2u);  // waits for the 4th byte
  EXPECT_EQ(out, "ab");
}

// The tokenizer normalises only the runs around code points that are not NFC boundaries; the
// result must equal utf8proc's NFC of the whole string.
#include <utf8proc.h>

#include <random>

#include "ballast/text/tokenizer.h"

TEST(Nfc, WindowedEqualsWholeString) {
  const std::vector<uint32_t> pool = {
      'a', 'e', 'A', ' ', '\n', 'K', 0x0301, 0x0308, 0x0327, 0x0323, 0x0302, 0x0336, 0x00E9,
      0x212B, 0x212A, 0x2126, 0x1100, 0x1161, 0x11A8, 0xAC00, 0x304B, 0x3099, 0x309A, 0x30CF,
      0x0B47, 0x0B3E, 0x0B57, 0x09C7, 0x09BE, 0x0627, 0x064E, 0x0651, 0x05E9, 0x05C1, 0x0915,
      0x093C, 0x0E01, 0x0E48, 0x4E2D, 0xF900, 0x1E9B, 0x0344, 0x0F73, 0x1F600, 0x200D, 0xFE0F,
      0x2F800, 0x1D15E, 0x0374, 0x037E, 0x0387, 0x1F71};
  std::mt19937 rng(3);
  for (int t = 0; t < 5000; ++t) {
    std::string s;
    int n = 1 + static_cast<int>(rng() % 12);
    for (int i = 0; i < n; ++i) ballast::text::append_codepoint(s, pool[rng() % pool.size()]);
    utf8proc_uint8_t* ref = utf8proc_NFC(reinterpret_cast<const utf8proc_uint8_t*>(s.c_str()));
    ASSERT_NE(ref, nullptr);
    std::string want(reinterpret_cast<char*>(ref));
    std::free(ref);
    ASSERT_EQ(ballast::text::normalize_nfc(s), want) << s;
  }
}

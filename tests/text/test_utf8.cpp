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

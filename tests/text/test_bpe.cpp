#include <gtest/gtest.h>

#include <random>

#include "ballast/text/bpe.h"

using namespace ballast::text;

namespace {
// Alphabet bytes 'a','b','c',' ' get ids 0..3 (others 100+b); merges build longer symbols.
Bpe toy() {
  std::array<int32_t, 256> byte_ids{};
  for (int b = 0; b < 256; ++b) byte_ids[b] = 100 + b;
  byte_ids['a'] = 0;
  byte_ids['b'] = 1;
  byte_ids['c'] = 2;
  byte_ids[' '] = 3;
  MergeTable m;
  m.reserve(8);
  int r = 0;
  m.insert(0, 1, r++, 10);    // ab
  m.insert(1, 0, r++, 11);    // ba
  m.insert(10, 10, r++, 12);  // abab
  m.insert(3, 0, r++, 13);    // " a"
  m.insert(0, 0, r++, 14);    // aa
  m.insert(14, 0, r++, 15);   // aaa
  m.insert(2, 2, r++, 16);    // cc
  m.insert(16, 16, r++, 17);  // cccc
  m.insert(3, 3, r++, 18);    // "  "
  m.insert(18, 18, r++, 19);  // "    "
  return Bpe(byte_ids, std::move(m));
}
std::vector<int32_t> enc(const Bpe& b, std::string_view w) {
  std::vector<int32_t> out;
  b.encode_word(w, out);
  return out;
}
}  // namespace

TEST(Bpe, LowestRankLeftmostFirst) {
  Bpe b = toy();
  EXPECT_EQ(enc(b, "ab"), (std::vector<int32_t>{10}));
  EXPECT_EQ(enc(b, "abab"), (std::vector<int32_t>{12}));
  EXPECT_EQ(enc(b, "aba"), (std::vector<int32_t>{10, 0}));  // ab (rank 0) before ba (rank 1)
  EXPECT_EQ(enc(b, "aaa"), (std::vector<int32_t>{15}));     // aa leftmost, then aaa
  EXPECT_EQ(enc(b, "aaaa"), (std::vector<int32_t>{14, 14}));
  EXPECT_EQ(enc(b, "x"), (std::vector<int32_t>{100 + 'x'}));
  EXPECT_TRUE(enc(b, "").empty());
}

TEST(Bpe, LongWordPathAgreesWithShortPath) {
  Bpe b = toy();
  std::mt19937 rng(7);
  const char alphabet[] = "abc x";
  for (int t = 0; t < 2000; ++t) {
    std::string w(1 + rng() % 120, ' ');
    for (char& c : w) c = alphabet[rng() % 5];
    std::vector<int32_t> heap;
    b.encode_long(w, heap);
    EXPECT_EQ(enc(b, w), heap) << w;
  }
}

TEST(Bpe, ByteLevelMap) {
  EXPECT_EQ(byte_to_codepoint()[' '], 0x120u);  // 'Ġ'
  EXPECT_EQ(byte_to_codepoint()['\n'], 0x10Au);  // 'Ċ'
  EXPECT_EQ(byte_to_codepoint()['A'], static_cast<uint32_t>('A'));
  for (int b = 0; b < 256; ++b) EXPECT_EQ(codepoint_to_byte(byte_to_codepoint()[b]), b);
  EXPECT_EQ(codepoint_to_byte(0x4E2D), -1);
}

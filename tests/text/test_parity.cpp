// Exact parity with Hugging Face `tokenizers` on the corpus of tools/make_tokenizer_corpus.py,
// whose ids were produced by that library (fixtures/qwen3_parity.json).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "ballast/text/utf8.h"
#include "text_test_util.h"

using namespace ballast::text;
using json = nlohmann::json;

namespace {

const json* fixture() {
  static json j = [] {
    std::filesystem::path p = ballast::text::testing::source_dir() / "tests/text/fixtures/qwen3_parity.json";
    if (const char* e = std::getenv("BALLAST_PARITY_FIXTURE")) p = e;
    if (!std::filesystem::exists(p)) return json();
    return json::parse(ballast::text::testing::read_text(p));
  }();
  return j.is_null() ? nullptr : &j;
}

std::string show(const std::vector<int32_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(v[i]);
  }
  return s + "]";
}

}  // namespace

TEST(Parity, HfTokenizersCorpusIdentical) {
  BALLAST_NEED_QWEN3();
  const json* fx = fixture();
  ASSERT_NE(fx, nullptr) << "tests/text/fixtures/qwen3_parity.json missing";
  const json& cases = (*fx)["cases"];
  EXPECT_GE(cases.size(), 500u);
  size_t same = 0, split_checked = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    const json& c = cases[i];
    std::string text = c["text"].get<std::string>();
    auto want = c["ids"].get<std::vector<int32_t>>();
    auto got = tok->encode(text);
    if (got == want) ++same;
    else ADD_FAILURE() << "case " << i << " " << json(text).dump() << "\n  hf:   " << show(want) << "\n  ours: " << show(got);
    if (c.contains("ids_split_special")) {
      ++split_checked;
      EXPECT_EQ(tok->encode(text, false), c["ids_split_special"].get<std::vector<int32_t>>())
          << "case " << i << " (special tokens as text) " << json(text).dump();
    }
  }
  EXPECT_EQ(same, cases.size());
  EXPECT_GT(split_checked, 0u);
  std::printf("[parity] %zu/%zu strings identical to HF tokenizers %s\n", same, cases.size(),
              (*fx).value("tokenizers_version", "?").c_str());
}

TEST(Parity, DecodeMatchesHfAndRoundTrips) {
  BALLAST_NEED_QWEN3();
  const json* fx = fixture();
  ASSERT_NE(fx, nullptr);
  size_t exact_roundtrip = 0, nfc_inputs = 0;
  const json& cases = (*fx)["cases"];
  for (size_t i = 0; i < cases.size(); ++i) {
    const json& c = cases[i];
    std::string text = c["text"].get<std::string>();
    auto ids = c["ids"].get<std::vector<int32_t>>();
    std::string hf = c["decoded"].get<std::string>();
    std::string ours = tok->decode(ids);
    EXPECT_EQ(ours, hf) << "case " << i;
    // decode(encode(x)) == NFC(x) (the normaliser's doing; HF gives the same), so == x for
    // every x already in NFC.
    std::string rt = tok->decode(tok->encode(text));
    EXPECT_EQ(rt, hf) << "case " << i;
    std::string n = normalize_nfc(text);
    EXPECT_EQ(rt, n) << "case " << i;
    if (n == text) {
      ++nfc_inputs;
      EXPECT_EQ(rt, text) << "case " << i;
    }
    if (rt == text) ++exact_roundtrip;
  }
  std::printf("[parity] decode(encode(x)) == x for %zu/%zu strings: all %zu in NFC; the others "
              "give NFC(x), as HF does\n", exact_roundtrip, cases.size(), nfc_inputs);
  EXPECT_EQ(exact_roundtrip, nfc_inputs);
}

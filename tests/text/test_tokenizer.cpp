#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <thread>

#include "ballast/core/error.h"
#include "ballast/text/bpe.h"
#include "ballast/text/utf8.h"
#include "text_test_util.h"

using namespace ballast::text;
using ballast::text::testing::qwen3;
using json = nlohmann::json;

namespace {

// A tiny byte-level tokenizer.json: the 256 byte symbols, a few merges, two added tokens.
json tiny_json() {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) {
    std::string s;
    append_codepoint(s, byte_to_codepoint()[b]);
    vocab[s] = b;
  }
  vocab["he"] = 256;
  vocab["ll"] = 257;
  vocab["hell"] = 258;
  vocab["hello"] = 259;
  vocab["\xC4\xA0w"] = 260;  // "Ġw"
  json merges = json::array({json::array({"h", "e"}), json::array({"l", "l"}),
                             json::array({"he", "ll"}), json::array({"hell", "o"}),
                             json::array({"\xC4\xA0", "w"})});
  json pre = {{"type", "Sequence"},
              {"pretokenizers",
               json::array({{{"type", "Split"},
                             {"pattern", {{"Regex", R"( ?\p{L}+| ?\p{N}|\s+|[^\s\p{L}\p{N}]+)"}}},
                             {"behavior", "Isolated"},
                             {"invert", false}},
                            {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}})}};
  json added = json::array({{{"id", 300}, {"content", "<|end|>"}, {"special", true}, {"normalized", false}},
                            {{"id", 301}, {"content", "<x>"}, {"special", false}, {"normalized", false}}});
  return {{"version", "1.0"},
          {"added_tokens", added},
          {"normalizer", {{"type", "NFC"}}},
          {"pre_tokenizer", pre},
          {"decoder", {{"type", "ByteLevel"}}},
          {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}}}};
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const ballast::Error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

TEST(Tokenizer, TinyEncodeDecode) {
  Tokenizer t = Tokenizer::from_json(tiny_json().dump(), R"({"eos_token": "<|end|>"})", "tiny.json");
  EXPECT_EQ(t.encode("hello"), (std::vector<int32_t>{259}));
  EXPECT_EQ(t.encode("hello world"), (std::vector<int32_t>{259, 260, 'o', 'r', 'l', 'd'}));
  EXPECT_EQ(t.encode("hello<|end|>"), (std::vector<int32_t>{259, 300}));
  EXPECT_EQ(t.encode("<x>hello", false), (std::vector<int32_t>{301, 259}));
  EXPECT_EQ(t.encode("<|end|>", false).size(), 7u);  // special text encoded as plain text
  EXPECT_EQ(t.decode(std::vector<int32_t>{259, 300}), "hello<|end|>");
  EXPECT_EQ(t.decode(std::vector<int32_t>{259, 300}, true), "hello");
  EXPECT_EQ(t.eos_token_ids(), (std::vector<int32_t>{300}));
  EXPECT_EQ(t.special_token_id("<|end|>"), 300);
  // NFC: e + combining acute -> é (two bytes C3 A9).
  EXPECT_EQ(t.encode("e\xCC\x81"), (std::vector<int32_t>{0xC3, 0xA9}));
}

TEST(Tokenizer, ClearErrors) {
  EXPECT_NE(error_of([] { Tokenizer::from_json("{\"model\": ", "", "bad.json"); }).find("bad.json: malformed JSON"),
            std::string::npos);
  json j = tiny_json();
  j["model"]["merges"][1] = json::array({"l", "zz"});
  std::string m = error_of([&] { Tokenizer::from_json(j.dump(), "", "t.json"); });
  EXPECT_NE(m.find("merges[1]"), std::string::npos) << m;
  j = tiny_json();
  j["model"].erase("vocab");
  m = error_of([&] { Tokenizer::from_json(j.dump(), "", "t.json"); });
  EXPECT_NE(m.find("missing field 'vocab'"), std::string::npos) << m;
  j = tiny_json();
  j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(unclosed";
  m = error_of([&] { Tokenizer::from_json(j.dump(), "", "t.json"); });
  EXPECT_NE(m.find("regex does not compile"), std::string::npos) << m;
  j = tiny_json();
  j["model"]["type"] = "WordPiece";
  m = error_of([&] { Tokenizer::from_json(j.dump(), "", "t.json"); });
  EXPECT_NE(m.find("only BPE"), std::string::npos) << m;

  Tokenizer t = Tokenizer::from_json(tiny_json().dump(), "", "tiny.json");
  m = error_of([&] { t.encode("ok \xE2\x82 bad"); });
  EXPECT_NE(m.find("invalid UTF-8 at byte offset 3"), std::string::npos) << m;
  m = error_of([&] { t.special_token_id("<|nope|>"); });
  EXPECT_NE(m.find("unknown special token '<|nope|>'"), std::string::npos) << m;
  m = error_of([&] { Tokenizer::from_json(tiny_json().dump(), R"({"eos_token": "<|nope|>"})", "tiny.json"); });
  EXPECT_NE(m.find("eos_token '<|nope|>'"), std::string::npos) << m;
  m = error_of([&] { t.decode(std::vector<int32_t>{5, 9999}); });
  EXPECT_NE(m.find("token id 9999"), std::string::npos) << m;
  EXPECT_NE(error_of([] { Tokenizer::load("/nonexistent/dir"); }).find("/nonexistent/dir"), std::string::npos);
}

TEST(Tokenizer, Qwen3Basics) {
  BALLAST_NEED_QWEN3();
  EXPECT_EQ(tok->vocab_size(), 151669);
  EXPECT_EQ(tok->encode("Hello world"), (std::vector<int32_t>{9707, 1879}));
  EXPECT_EQ(tok->special_token_id("<|im_end|>"), 151645);
  ASSERT_FALSE(tok->eos_token_ids().empty());
  EXPECT_EQ(tok->eos_token_ids()[0], 151645);
  EXPECT_EQ(tok->pad_token_id(), 151643);
  EXPECT_TRUE(tok->is_special(151644));
  EXPECT_FALSE(tok->is_special(151667));  // <think> is an added, non-special token
  EXPECT_NE(tok->chat_template().find("<|im_start|>"), std::string::npos);
  EXPECT_EQ(tok->token_to_id("<think>"), 151667);
}

TEST(StreamDecoder, NeverEmitsPartialCharacters) {
  BALLAST_NEED_QWEN3();
  std::string text = "Héllo 世界! 👨‍👩‍👧‍👦 emoji, ١٢٣ العربية, e\xCC\x81 <|im_end|> done";
  std::vector<int32_t> ids = tok->encode(text);
  StreamDecoder dec(*tok);
  std::string all;
  int held = 0;
  for (int32_t id : ids) {
    std::string piece = dec.push(id);
    EXPECT_EQ(valid_utf8_prefix(piece), piece.size());
    if (dec.pending() > 0) ++held;
    all += piece;
  }
  all += dec.flush();
  EXPECT_EQ(all, tok->decode(ids));
  EXPECT_GT(held, 0);  // some ids did end mid-character
}

TEST(StreamDecoder, RandomIdsMatchDecode) {
  BALLAST_NEED_QWEN3();
  std::mt19937 rng(1);
  for (int t = 0; t < 200; ++t) {
    std::vector<int32_t> ids(1 + rng() % 30);
    for (auto& id : ids) id = static_cast<int32_t>(rng() % 151643);
    StreamDecoder dec(*tok);
    std::string all;
    for (int32_t id : ids) {
      std::string piece = dec.push(id);
      ASSERT_EQ(valid_utf8_prefix(piece), piece.size());
      all += piece;
    }
    all += dec.flush();
    ASSERT_EQ(all, tok->decode(ids));
  }
}

TEST(Tokenizer, ConcurrentEncodeIsConsistent) {
  BALLAST_NEED_QWEN3();
  std::string text = "Concurrent encoders share one Tokenizer; each thread has its own cache. 并发。";
  auto want = tok->encode(text);
  std::vector<std::thread> threads;
  std::atomic<int> bad{0};
  for (int i = 0; i < 4; ++i)
    threads.emplace_back([&] {
      for (int k = 0; k < 200; ++k)
        if (tok->encode(text) != want) ++bad;
    });
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad.load(), 0);
}

// Hostile tokenizer files (issue 16): a stray id must not size the id tables, a chat_template of the
// wrong shape is an error naming it, not a raw JSON library message.
TEST(Tokenizer, HostileIdsAndConfigFieldsAreRefusedByName) {
  json j = tiny_json();
  j["model"]["vocab"]["zz"] = 100000000;  // 1e8: 3.2 GB of id tables before
  std::string m = error_of([&] { Tokenizer::from_json(j.dump(), "", "t.json"); });
  EXPECT_NE(m.find("vocab['zz'] is 100000000, not an id"), std::string::npos) << m;
  j = tiny_json();
  j["added_tokens"][0]["id"] = uint64_t(1) << 32;
  m = error_of([&] { Tokenizer::from_json(j.dump(), "", "t.json"); });
  EXPECT_NE(m.find("added_tokens[0]: 'id' is 4294967296"), std::string::npos) << m;
  for (const char* config : {R"({"chat_template": [1]})", R"({"chat_template": [{"name": 3}]})",
                             R"({"chat_template": 7})", R"([1, 2])"}) {
    m = error_of([&] { Tokenizer::from_json(tiny_json().dump(), config, "tiny.json"); });
    EXPECT_NE(m.find("tiny.json (tokenizer_config.json)"), std::string::npos) << config << ": " << m;
    EXPECT_EQ(m.find("json.exception"), std::string::npos) << m;
  }
  EXPECT_EQ(Tokenizer::from_json(tiny_json().dump(), R"({"chat_template": [{"name": "default", "template": "x"}]})")
                .chat_template(),
            "x");
}

// eos_token_id 2^32 + 5 in generation_config.json was taken as 5.
TEST(Tokenizer, EosTokenIdIsReadWide) {
  const auto dir = std::filesystem::temp_directory_path() / "ballast_tok_eos";
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "tokenizer.json") << tiny_json().dump();
  std::ofstream(dir / "generation_config.json") << R"({"eos_token_id": 4294967301})";
  std::string m = error_of([&] { Tokenizer::load(dir); });
  EXPECT_NE(m.find("eos_token_id 4294967301 is out of range"), std::string::npos) << m;
  std::ofstream(dir / "generation_config.json") << R"({"eos_token_id": [5, 300]})";
  EXPECT_EQ(Tokenizer::load(dir).eos_token_ids(), (std::vector<int32_t>{5, 300}));
}

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "ballast/text/chat.h"
#include "text_test_util.h"

using namespace ballast::text;
using json = nlohmann::json;

TEST(Chat, ChatMLBasics) {
  std::vector<ChatMessage> m = {{"system", "You are helpful.", {}}, {"user", "Hi", {}}};
  EXPECT_EQ(render_chatml(m),
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\n");
  EXPECT_EQ(render_chatml(m, {.add_generation_prompt = true, .enable_thinking = false}),
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\n<think>\n\n</think>\n\n");
  EXPECT_EQ(render_chatml({}, {.add_generation_prompt = false}), "");
}

// The Qwen3 template rendered by jinja2 (tools/make_tokenizer_corpus.py) for message lists
// with reasoning, tool responses and a mid-conversation system message.
TEST(Chat, MatchesQwen3TemplateFixture) {
  std::filesystem::path p = ballast::text::testing::source_dir() / "tests/text/fixtures/qwen3_parity.json";
  if (const char* e = std::getenv("BALLAST_PARITY_FIXTURE")) p = e;
  if (!std::filesystem::exists(p)) GTEST_SKIP() << "no fixture";
  json fx = json::parse(ballast::text::testing::read_text(p));
  if (!fx.contains("chat") || fx["chat"].empty()) GTEST_SKIP() << "fixture has no chat cases";
  for (const json& c : fx["chat"]) {
    std::vector<ChatMessage> msgs;
    for (const json& m : c["messages"]) {
      ChatMessage cm{m["role"].get<std::string>(), m["content"].get<std::string>(), {}};
      if (m.contains("reasoning_content")) cm.reasoning_content = m["reasoning_content"].get<std::string>();
      msgs.push_back(cm);
    }
    ChatOptions o{c["add_generation_prompt"].get<bool>(), c["enable_thinking"].get<bool>()};
    EXPECT_EQ(render_chatml(msgs, o), c["text"].get<std::string>()) << c["messages"].dump();
  }
}

TEST(Chat, TokenizesSpecialMarkers) {
  BALLAST_NEED_QWEN3();
  std::vector<ChatMessage> m = {{"user", "Hi", {}}};
  auto ids = tok->encode(tok->render_chat(m));
  ASSERT_GE(ids.size(), 3u);
  EXPECT_EQ(ids.front(), 151644);  // <|im_start|>
  EXPECT_EQ(tok->decode(ids), tok->render_chat(m));
}

#pragma once
// Chat prompts in the Qwen ChatML format. ballast has no Jinja engine (Debian packages none for
// C++ that runs Qwen's template), so render_chat() is a port of the Qwen3 template's logic for
// system/user/assistant/tool messages without tool definitions:
//   <|im_start|>{role}\n{content}<|im_end|>\n ... then <|im_start|>assistant\n
// including its handling of reasoning (<think>...</think>) in assistant turns after the last
// user query, and enable_thinking=false (an empty think block after the generation prompt).
// tests/text checks it against the template rendered by jinja2 for the shipped Qwen3 tokenizer.
#include <optional>
#include <span>
#include <string>

namespace ballast::text {

struct ChatMessage {
  std::string role;     // "system", "user", "assistant" or "tool"
  std::string content;
  std::optional<std::string> reasoning_content;  // assistant only
};

struct ChatOptions {
  bool add_generation_prompt = true;
  bool enable_thinking = true;
};

std::string render_chatml(std::span<const ChatMessage> messages, const ChatOptions& options = {});

}  // namespace ballast::text

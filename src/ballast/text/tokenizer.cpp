#include "ballast/text/tokenizer.h"

#include <algorithm>

#include "ballast/text/tokenizer_impl.h"

namespace ballast::text {

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool parse_special) const {
  check_utf8(text);
  const Impl& t = *impl_;
  detail::ThreadState& ts = t.state();
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  size_t pos = 0;
  if (t.match_raw.empty) {
    t.encode_segment(text, parse_special, ts, out);
    return out;
  }
  while (pos < text.size()) {
    auto [start, k] = t.find_added(t.match_raw, text, pos, parse_special);
    if (start > pos) t.encode_segment(text.substr(pos, start - pos), parse_special, ts, out);
    if (k < 0) break;
    out.push_back(t.added[k].id);
    pos = start + t.added[k].content.size();
  }
  return out;
}

std::string_view Tokenizer::token_bytes(int32_t id) const {
  const Impl& t = *impl_;
  if (id < 0 || static_cast<size_t>(id) >= t.id_kind.size() || t.id_kind[id] == 0)
    fail("{}: token id {} is not in the vocabulary (size {})", t.origin, id, t.id_kind.size());
  return t.id_bytes[id];
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special) const {
  std::string bytes;
  bytes.reserve(ids.size() * 4);
  for (int32_t id : ids) {
    std::string_view b = token_bytes(id);
    if (skip_special && impl_->id_kind[id] == 3) continue;
    bytes.append(b);
  }
  if (valid_utf8_prefix(bytes) == bytes.size()) return bytes;
  std::string out;
  append_utf8_lossy(out, bytes, true);
  return out;
}

int32_t Tokenizer::vocab_size() const { return static_cast<int32_t>(impl_->id_kind.size()); }

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  std::string key(token);
  if (auto it = impl_->added_by_content.find(key); it != impl_->added_by_content.end())
    return it->second;
  if (int32_t id = impl_->vocab.find(key); id >= 0) return id;
  return std::nullopt;
}

int32_t Tokenizer::special_token_id(std::string_view content) const {
  auto it = impl_->added_by_content.find(std::string(content));
  if (it == impl_->added_by_content.end())
    fail("{}: unknown special token '{}' (not among its {} added tokens)", impl_->origin, content,
         impl_->added.size());
  return it->second;
}

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && static_cast<size_t>(id) < impl_->id_kind.size() && impl_->id_kind[id] == 3;
}

const std::vector<AddedToken>& Tokenizer::added_tokens() const { return impl_->added; }
const std::vector<int32_t>& Tokenizer::eos_token_ids() const { return impl_->eos; }
std::optional<int32_t> Tokenizer::pad_token_id() const { return impl_->pad; }
const std::string& Tokenizer::chat_template() const { return impl_->chat_template; }

std::string Tokenizer::render_chat(std::span<const ChatMessage> messages,
                                   const ChatOptions& options) const {
  return render_chatml(messages, options);
}

size_t StreamDecoder::push(int32_t id, std::string& out) {
  std::string_view b = tok_->token_bytes(id);
  if (skip_special_ && tok_->is_special(id)) return 0;
  pending_.append(b);
  size_t before = out.size();
  size_t used = append_utf8_lossy(out, pending_, false);
  pending_.erase(0, used);
  return out.size() - before;
}

std::string StreamDecoder::push(int32_t id) {
  std::string out;
  push(id, out);
  return out;
}

std::string StreamDecoder::flush() {
  std::string out;
  append_utf8_lossy(out, pending_, true);
  pending_.clear();
  return out;
}

}  // namespace ballast::text

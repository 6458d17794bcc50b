#include "ballast/serve/output_text.h"

#include <algorithm>

namespace ballast::serve {

TextAssembler::TextAssembler(const text::Tokenizer& tokenizer, std::vector<std::string> stop,
                             std::vector<int32_t> hidden)
    : decoder_(tokenizer, /*skip_special=*/true), stop_(std::move(stop)), hidden_(std::move(hidden)) {
  std::erase(stop_, std::string());
  for (const auto& s : stop_) longest_stop_ = std::max(longest_stop_, s.size());
}

std::string TextAssembler::push(int32_t id) {
  if (stopped_) return {};
  ++tokens_;
  if (std::find(hidden_.begin(), hidden_.end(), id) != hidden_.end()) return {};
  const size_t before = text_.size();
  decoder_.push(id, text_);
  if (stop_.empty()) {
    std::string out = text_.substr(sent_);
    sent_ = text_.size();
    return out;
  }
  // A stop string completed by this token starts at most longest - 1 bytes before its text.
  const size_t from = before >= longest_stop_ ? before - longest_stop_ + 1 : 0;
  size_t first = std::string::npos;
  for (const auto& s : stop_)
    if (const size_t at = text_.find(s, from); at < first) {
      first = at;
      matched_ = s;
    }
  if (first != std::string::npos) {
    stopped_ = true;
    std::string out = text_.substr(sent_, first - std::min(first, sent_));
    sent_ = text_.size();
    return out;
  }
  // Hold back the longest end of the text that begins some stop string.
  size_t hold = 0;
  for (const auto& s : stop_)
    for (size_t n = std::min(s.size() - 1, text_.size() - sent_); n > hold; --n)
      if (text_.compare(text_.size() - n, n, s, 0, n) == 0) {
        hold = n;
        break;
      }
  std::string out = text_.substr(sent_, text_.size() - hold - sent_);
  sent_ = text_.size() - hold;
  return out;
}

std::string TextAssembler::finish() {
  if (stopped_) return {};
  text_ += decoder_.flush();
  std::string out = text_.substr(sent_);
  sent_ = text_.size();
  return out;
}

}  // namespace ballast::serve

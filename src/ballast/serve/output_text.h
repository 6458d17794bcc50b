#pragma once
// A request's generated tokens turned into text as they arrive (on the HTTP thread serving it):
// streaming detokenisation (only complete UTF-8 characters leave), special tokens and stop
// tokens left out, and stop strings found across token boundaries. Text that could still be the
// start of a stop string is held back until it cannot; the text returned never contains a stop
// string (OpenAI's, vLLM's and SGLang's behaviour).
#include <cstdint>
#include <string>
#include <vector>

#include "ballast/text/tokenizer.h"

namespace ballast::serve {

class TextAssembler {
 public:
  // stop: stop strings; hidden: token ids whose text is never shown (end of sequence, stop ids).
  TextAssembler(const text::Tokenizer& tokenizer, std::vector<std::string> stop, std::vector<int32_t> hidden);

  // One generated token: returns the text that became final (possibly none). Once a stop string
  // has matched, tokens are ignored.
  std::string push(int32_t id);
  // Generation ended: what was held back (nothing after a stop string).
  std::string finish();

  bool stopped() const { return stopped_; }
  const std::string& matched() const { return matched_; }  // the stop string that matched
  int64_t tokens() const { return tokens_; }  // tokens taken, up to the one completing a stop string

 private:
  text::StreamDecoder decoder_;
  std::vector<std::string> stop_;
  std::vector<int32_t> hidden_;
  size_t longest_stop_ = 0;
  std::string text_;   // all decoded text
  size_t sent_ = 0;    // bytes of text_ returned
  bool stopped_ = false;
  std::string matched_;
  int64_t tokens_ = 0;
};

}  // namespace ballast::serve

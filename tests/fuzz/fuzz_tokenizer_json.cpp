// tokenizer.json: vocabulary, merges, added tokens, pre-tokenizer and normalizer. A tokenizer that
// loads encodes and decodes a fixed text.
#include "ballast/core/error.h"
#include "ballast/text/tokenizer.h"
#include "fuzz_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const auto tok = ballast::text::Tokenizer::from_json(ballast::fuzz::as_text(data, size));
    const auto ids = tok.encode("Hello, world! 12345 <|im_start|>user\n\xc3\xa9t\xc3\xa9 \xe4\xbd\xa0\xe5\xa5\xbd");
    (void)tok.decode(ids);
  } catch (const ballast::Error&) {
  }
  return 0;
}

// HTTP request bodies of every endpoint that reads one, as the server parses them (shipped
// tokenizer and chat template): the first byte picks the endpoint, the rest is the body. Bad
// bodies must be an ApiError (a 4xx naming the field); anything else would be a 500.
#include "ballast/serve/json_fields.h"
#include "ballast/serve/openai_protocol.h"
#include "ballast/serve/sglang_protocol.h"
#include "fuzz_support.h"

namespace {

const ballast::serve::ModelContext& model() {
  static const ballast::text::Tokenizer tok = ballast::text::Tokenizer::load(BALLAST_DEFAULT_MODEL_DIR);
  static const ballast::serve::ModelContext m = [] {
    ballast::serve::ModelContext m;
    m.tokenizer = &tok;
    m.name = "default";
    m.context_length = 4096;
    m.vocab_size = 8192;
    return m;
  }();
  return m;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace serve = ballast::serve;
  if (size == 0) return 0;
  try {
    const nlohmann::json body = serve::parse_request_body(ballast::fuzz::as_text(data + 1, size - 1));
    switch (data[0] % 5) {
      case 0: (void)serve::openai::parse_completion(body, model()); break;
      case 1: (void)serve::openai::parse_chat(body, model()); break;
      case 2: (void)serve::sglang::parse_generate(body, model()); break;
      case 3: (void)serve::sglang::tokenize(body, model()); break;
      default: (void)serve::sglang::detokenize(body, model()); break;
    }
  } catch (const serve::ApiError&) {
  }
  return 0;
}

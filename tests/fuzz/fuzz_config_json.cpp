// config.json as the model loader reads it: every field, the layer pattern and the quantization.
#include "ballast/core/error.h"
#include "ballast/model/config.h"
#include "fuzz_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static ballast::fuzz::InputFile file("config.json");
  try {
    const auto c = ballast::model::load_model_config(file.write(ballast::fuzz::as_text(data, size)));
    if (c.num_full_attention_layers() + c.num_linear_attention_layers() != int(c.layer_types.size())) std::abort();
    (void)c.num_moe_layers();
  } catch (const ballast::Error&) {
  }
  return 0;
}

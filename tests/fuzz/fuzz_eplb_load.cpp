// EPLB load traces (`eplb plan|report|replay --load`): the first byte picks the form, JSON
// ({"logical_count": ...}) or the compact .safetensors one; the rest is the file.
#include "ballast/core/error.h"
#include "ballast/eplb/load.h"
#include "fuzz_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static ballast::fuzz::InputFile file("load.safetensors");
  if (size == 0) return 0;
  const std::string_view rest = ballast::fuzz::as_text(data + 1, size - 1);
  try {
    const ballast::eplb::LoadTrace t = data[0] & 1 ? ballast::eplb::read_load(file.write(rest).string())
                                                   : ballast::eplb::load_from_json_text(std::string(rest));
    t.validate();
  } catch (const ballast::Error&) {
  }
  return 0;
}

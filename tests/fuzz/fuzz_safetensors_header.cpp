// A .safetensors file: header length, JSON header, dtypes, shapes and offsets. Opened files are
// read through every tensor view, so a view past the mapping is an ASan report.
#include "ballast/core/error.h"
#include "ballast/io/safetensors.h"
#include "fuzz_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static ballast::fuzz::InputFile file("model.safetensors");
  try {
    const auto st = ballast::io::SafetensorsFile::open(file.write(ballast::fuzz::as_text(data, size)));
    uint8_t sum = 0;
    for (const auto& info : st->tensors()) {
      const ballast::Tensor t = st->get(info.name);
      const auto* bytes = static_cast<const uint8_t*>(t.raw());
      for (uint64_t i = 0; i < info.nbytes(); ++i) sum ^= bytes[i];
    }
    if (st->tensor_bytes() > st->data_size()) std::abort();
    (void)sum;
  } catch (const ballast::Error&) {
  }
  return 0;
}

// Placement files (`--init-expert-location`, `eplb plan --current`): the first byte gives the
// number of ranks the caller expects (0: the file's num_ranks); the rest is the JSON.
#include "ballast/core/error.h"
#include "ballast/eplb/placement.h"
#include "fuzz_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  try {
    const auto p = ballast::eplb::placement_from_json_text(std::string(ballast::fuzz::as_text(data + 1, size - 1)),
                                                           data[0] % 9);
    p.validate();
    for (int l = 0; l < p.layers; ++l) (void)p.logical_to_physical(l);
  } catch (const ballast::Error&) {
  }
  return 0;
}

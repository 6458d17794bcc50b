#include "ballast/cli/commands.h"

namespace ballast::cli {

std::vector<AddCommand> all_commands() {
  return {
      add_generate, add_serve, add_logits, add_inspect, add_bench, add_tokenize, add_eplb,
  };
}

}  // namespace ballast::cli

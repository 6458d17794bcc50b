// `ballast eplb ...` as its own small program (same code as the subcommand of `ballast`).
#include "ballast/cli/commands.h"
#include "ballast/core/error.h"

#include <cstdio>

int main(int argc, char** argv) {
  CLI::App app{"ballast (eplb only)"};
  app.require_subcommand(1);
  ballast::cli::Runner run;
  ballast::cli::add_eplb(app, run);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    return run ? run() : 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}

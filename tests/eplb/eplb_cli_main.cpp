// `ballast eplb ...` as its own small program (same code as the subcommand of `ballast`).
#include "ballast/cli/commands.h"
#include "ballast/cli/error_line.h"
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
    if (e.get_exit_code() == 0) return app.exit(e);
    std::fputs(ballast::cli::error_line(std::string(e.what()) + " (see --help)").c_str(), stderr);
    return ballast::cli::kExitUsage;
  }
  try {
    return run ? run() : 0;
  } catch (const std::exception& e) {
    std::fputs(ballast::cli::error_line(e.what()).c_str(), stderr);
    return ballast::cli::kExitError;
  }
}

// ballast: the command-line edge. Every error below this point is a ballast::Error (or a
// std::exception) and is printed here as one line; nothing else aborts.
#include <fmt/format.h>

#include <cstdio>
#include <exception>

#include "ballast/cli/commands.h"

int main(int argc, char** argv) {
  CLI::App app{"ballast: a mixture-of-experts inference engine with expert parallelism"};
  app.require_subcommand(1);
  ballast::cli::Runner run;
  for (auto add : ballast::cli::all_commands()) add(app, run);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    return run ? run() : 0;
  } catch (const std::exception& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 1;
  }
}

// ballast: the command-line edge. Every error below this point is a ballast::Error (or a
// std::exception) and is printed here as one line; nothing else aborts.
#include <fmt/format.h>

#include <cstdio>
#include <exception>
#include <new>
#include <optional>

#include "ballast/cli/commands.h"
#include "ballast/cli/error_line.h"
#include "ballast/dist/mpi_communicator.h"

int main(int argc, char** argv) {
  CLI::App app{"ballast: a mixture-of-experts inference engine with expert parallelism"};
  app.require_subcommand(1);
  ballast::cli::Runner run;
  for (auto add : ballast::cli::all_commands()) add(app, run);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help
    std::fputs(ballast::cli::error_line(std::string(e.what()) + " (see --help)").c_str(), stderr);
    return ballast::cli::kExitUsage;
  }
  // Under mpirun every process is one expert-parallel rank; MPI lives as long as main.
  std::optional<ballast::dist::MpiSession> mpi;
  try {
    if (ballast::dist::mpi_launched()) mpi.emplace(&argc, &argv);
    return run ? run() : 0;
  } catch (const std::exception& e) {
    // A bad_alloc that no layer turned into a message naming its size.
    const bool oom = dynamic_cast<const std::bad_alloc*>(&e) != nullptr;
    std::fputs(ballast::cli::error_line(oom ? "out of memory" : e.what()).c_str(), stderr);
    // The other ranks may be waiting for this one in a collective: end the whole job.
    if (mpi && mpi->size() > 1) ballast::dist::MpiSession::abort(1);
    return ballast::cli::kExitError;
  }
}

#pragma once
// Each CLI subcommand lives in its own file cmd_<name>.cpp and adds itself to the app through
// an add_<name> function listed in commands.cpp. A command's callback stores the work to run
// in `run`; main() calls it and turns errors into one line. The CLI's files are compiled in unity
// batches (CMakeLists.txt): a file's own helpers need names no other CLI file uses.
#include <CLI/CLI.hpp>

#include <functional>
#include <vector>

namespace ballast::cli {

using Runner = std::function<int()>;
using AddCommand = void (*)(CLI::App& app, Runner& run);

void add_generate(CLI::App& app, Runner& run);
void add_serve(CLI::App& app, Runner& run);     // the HTTP server
void add_logits(CLI::App& app, Runner& run);
void add_inspect(CLI::App& app, Runner& run);
void add_bench(CLI::App& app, Runner& run);
void add_tokenize(CLI::App& app, Runner& run);   // tokenize + detokenize
void add_eplb(CLI::App& app, Runner& run);       // eplb plan | report | replay | synth

std::vector<AddCommand> all_commands();

}  // namespace ballast::cli

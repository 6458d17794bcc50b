#pragma once
// Each CLI subcommand lives in its own file and adds itself to the app here. A command's
// callback stores the work to run in `run`; main() calls it and turns errors into one line.
#include <CLI/CLI.hpp>

#include <functional>

namespace ballast::cli {

using Runner = std::function<int()>;

void add_generate(CLI::App& app, Runner& run);
void add_logits(CLI::App& app, Runner& run);
void add_inspect(CLI::App& app, Runner& run);
void add_bench(CLI::App& app, Runner& run);
void add_tokenize(CLI::App& app, Runner& run);   // tokenize + detokenize
void add_eplb(CLI::App& app, Runner& run);       // eplb plan | report | replay | synth

}  // namespace ballast::cli

#pragma once
// Arguments shared by the commands that load a model.
#include <filesystem>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "ballast/runtime/engine.h"

namespace ballast::cli {

// The shipped default model: models/ next to the build directory's parent (the repository), or
// $BALLAST_MODEL.
std::filesystem::path default_model_dir();

// "1,2,3" -> {1, 2, 3}; errors name the offending item.
std::vector<int32_t> parse_ids(const std::string& csv);
// One comma-separated id list per non-empty line.
std::vector<std::vector<int32_t>> read_prompts_file(const std::filesystem::path& path);

// Loads the engine with a progress bar while the weights are paged in.
std::unique_ptr<runtime::Engine> load_engine(const std::filesystem::path& dir, int threads,
                                             runtime::EngineOptions opts = {});

}  // namespace ballast::cli

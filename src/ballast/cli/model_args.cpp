#include "ballast/cli/model_args.h"

#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <optional>

#include "ballast/core/error.h"
#include "ballast/core/progress.h"

namespace ballast::cli {

std::filesystem::path default_model_dir() {
  if (const char* env = std::getenv("BALLAST_MODEL")) return env;
  std::error_code ec;
  auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  for (auto dir = exe.parent_path(); !ec && dir.has_parent_path() && dir != dir.parent_path(); dir = dir.parent_path()) {
    auto candidate = dir / "models" / "default";
    if (std::filesystem::exists(candidate / "config.json")) return std::filesystem::canonical(candidate);
  }
  fail("no --model given and no default model found (models/default beside the build, or $BALLAST_MODEL)");
}

std::vector<int32_t> parse_ids(const std::string& csv) {
  std::vector<int32_t> ids;
  size_t start = 0;
  while (start <= csv.size()) {
    size_t end = csv.find(',', start);
    if (end == std::string::npos) end = csv.size();
    std::string item = csv.substr(start, end - start);
    item.erase(0, item.find_first_not_of(" \t\r"));
    item.erase(item.find_last_not_of(" \t\r") + 1);
    if (!item.empty()) {
      char* rest = nullptr;
      long v = std::strtol(item.c_str(), &rest, 10);
      check(rest && *rest == '\0' && v >= 0 && v <= INT32_MAX, "invalid token id '{}'", item);
      ids.push_back(int32_t(v));
    }
    start = end + 1;
  }
  return ids;
}

std::vector<std::vector<int32_t>> read_prompts_file(const std::filesystem::path& path) {
  std::ifstream in(path);
  check(bool(in), "cannot open prompts file {}", path.string());
  std::vector<std::vector<int32_t>> prompts;
  std::string line;
  int lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    try {
      auto ids = parse_ids(line);
      if (!ids.empty()) prompts.push_back(std::move(ids));
    } catch (const Error& e) {
      fail("{}:{}: {}", path.string(), lineno, e.what());
    }
  }
  check(!prompts.empty(), "prompts file {} holds no prompt", path.string());
  return prompts;
}

std::unique_ptr<runtime::Engine> load_engine(const std::filesystem::path& dir, int threads,
                                             runtime::EngineOptions opts) {
  std::optional<ProgressBar> bar;  // created once the total size is known
  opts.threads = threads;
  opts.load_progress = [&bar](uint64_t done, uint64_t total) {
    if (!bar) bar.emplace("loading weights", total);
    bar->update(done);
  };
  auto engine = runtime::Engine::load(dir, opts);
  if (bar) bar->finish();
  return engine;
}

}  // namespace ballast::cli

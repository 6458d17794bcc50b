// ballast tokenize | detokenize: text <-> ids with a model's tokenizer.json (byte-level BPE,
// exact Hugging Face `tokenizers` parity; see docs/tokenizer.md).
//   ballast tokenize --tokenizer DIR [--json] [--no-special] [TEXT | --file F | stdin]
//   ballast detokenize --tokenizer DIR [--json] [--skip-special] [IDS... | stdin]
// detokenize reads ids as numbers separated by spaces or commas, a JSON array, or the
// {"ids": [...]} object that `tokenize --json` prints, so the two commands pipe into each other.
#include <fmt/format.h>

#include <charconv>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>

#include "ballast/cli/commands.h"
#include "ballast/core/error.h"
#include "ballast/text/tokenizer.h"

namespace ballast::cli {

namespace {

using nlohmann::json;

std::string read_all(std::istream& in) {
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// A JSON integer that is a token id, read wide before the range check (4294967297 must not become 1).
bool is_id(const json& v) {
  if (v.is_number_unsigned()) return v.get<uint64_t>() <= INT32_MAX;
  return v.is_number_integer() && v.get<int64_t>() >= 0 && v.get<int64_t>() <= INT32_MAX;
}

// Ids from arguments or stdin: "1 2 3", "1,2,3", "[1,2,3]" or {"ids": [1,2,3]}.
std::vector<int32_t> detokenize_ids(const std::string& s) {
  size_t first = s.find_first_not_of(" \t\r\n");
  if (first != std::string::npos && (s[first] == '[' || s[first] == '{')) {
    json j;
    try {
      j = json::parse(s);
    } catch (const json::exception& e) {
      fail("detokenize: ids are not valid JSON: {}", e.what());
    }
    if (j.is_object()) {
      check(j.contains("ids"), "detokenize: JSON input has no \"ids\" field");
      j = j["ids"];
    }
    check(j.is_array(), "detokenize: expected a JSON array of ids");
    std::vector<int32_t> ids;
    for (size_t i = 0; i < j.size(); ++i) {
      check(is_id(j[i]), "detokenize: ids[{}] is {}, not a token id", i, j[i].dump());
      ids.push_back(j[i].get<int32_t>());
    }
    return ids;
  }
  std::vector<int32_t> ids;
  size_t i = 0;
  while (i < s.size()) {
    if (s[i] == ' ' || s[i] == ',' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r') {
      ++i;
      continue;
    }
    size_t j = i;
    if (s[j] == '-') ++j;
    while (j < s.size() && s[j] >= '0' && s[j] <= '9') ++j;
    check(j > i && (j == s.size() || s[j] == ' ' || s[j] == ',' || s[j] == '\t' || s[j] == '\n' || s[j] == '\r'),
          "detokenize: '{}' at character {} is not a token id", s.substr(i, std::min<size_t>(j + 1 - i, 20)), i);
    const std::string item = s.substr(i, j - i);
    int64_t v = -1;
    auto [end, ec] = std::from_chars(item.data(), item.data() + item.size(), v);
    check(ec == std::errc() && end == item.data() + item.size() && v >= 0 && v <= INT32_MAX,
          "detokenize: '{}' at character {} is not a token id", item.substr(0, 24), i);
    ids.push_back(static_cast<int32_t>(v));
    i = j;
  }
  return ids;
}

}  // namespace

void add_tokenize(CLI::App& app, Runner& run) {
  struct Args {
    std::string tokenizer, text, file;
    std::vector<std::string> ids;
    bool json = false, no_special = false, skip_special = false, has_text = false;
  };
  auto args = std::make_shared<Args>();

  auto* tok = app.add_subcommand("tokenize", "Encode text into token ids");
  tok->add_option("--tokenizer,--model", args->tokenizer,
                  "Directory with tokenizer.json (and tokenizer_config.json), e.g. the model directory")
      ->required();
  tok->add_option("text", args->text, "Text to encode (default: stdin)");
  tok->add_option("--file", args->file, "Read the text from this file");
  tok->add_flag("--json", args->json, "Print {\"ids\": [...]}");
  tok->add_flag("--no-special", args->no_special,
                "Encode special-token text such as <|im_end|> as plain text");
  tok->callback([&run, args, tok] {
    args->has_text = tok->count("text") > 0;
    run = [args] {
      auto t = text::Tokenizer::load(args->tokenizer);
      std::string input;
      if (!args->file.empty()) {
        std::ifstream f(args->file, std::ios::binary);
        check(static_cast<bool>(f), "{}: cannot open", args->file);
        input = read_all(f);
      } else if (args->has_text) {
        input = args->text;
      } else {
        input = read_all(std::cin);
      }
      auto ids = t.encode(input, !args->no_special);
      if (args->json) {
        fmt::print("{}\n", json{{"ids", ids}}.dump());
      } else {
        std::string line;
        for (size_t i = 0; i < ids.size(); ++i) line += (i ? " " : "") + std::to_string(ids[i]);
        fmt::print("{}\n", line);
      }
      return 0;
    };
  });

  auto* detok = app.add_subcommand("detokenize", "Decode token ids into text");
  detok->add_option("--tokenizer,--model", args->tokenizer,
                    "Directory with tokenizer.json (and tokenizer_config.json), e.g. the model directory")
      ->required();
  detok->add_option("ids", args->ids, "Token ids (default: stdin; also \"1,2,3\", [1,2,3] or {\"ids\": [...]})");
  detok->add_flag("--json", args->json, "Print {\"text\": \"...\"}");
  detok->add_flag("--skip-special", args->skip_special, "Leave special tokens out of the text");
  detok->callback([&run, args] {
    run = [args] {
      auto t = text::Tokenizer::load(args->tokenizer);
      std::string joined;
      if (args->ids.empty()) {
        joined = read_all(std::cin);
      } else {
        for (const auto& s : args->ids) joined += s + " ";
      }
      std::string out = t.decode(detokenize_ids(joined), args->skip_special);
      if (args->json) fmt::print("{}\n", json{{"text", out}}.dump());
      else fmt::print("{}\n", out);
      return 0;
    };
  });
}

}  // namespace ballast::cli

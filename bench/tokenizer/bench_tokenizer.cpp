// Tokenizer encode throughput, single thread, on one text file: the whole text in one call,
// then line by line (split on '\n', as tools/make_tokenizer_corpus.py times HF's encode_batch).
// With --ids FILE (int32 little-endian, e.g. HF's ids written by that script) it also checks
// that the whole-text ids are identical. Prints one JSON line per text.
//   bench_tokenizer --tokenizer DIR --text FILE [--ids FILE] [--repeat N]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "ballast/text/tokenizer.h"

namespace {

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    std::fprintf(stderr, "cannot open %s\n", path.c_str());
    std::exit(2);
  }
  std::ostringstream ss;
  ss << f.rdbuf();
  return std::move(ss).str();
}

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// CPU time of this thread: unaffected by other processes taking the core.
double cpu_now() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir, text_path, ids_path;
  int repeat = 3;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string a = argv[i];
    if (a == "--tokenizer") dir = argv[i + 1];
    else if (a == "--text") text_path = argv[i + 1];
    else if (a == "--ids") ids_path = argv[i + 1];
    else if (a == "--repeat") repeat = std::atoi(argv[i + 1]);
  }
  if (dir.empty() || text_path.empty()) {
    std::fprintf(stderr, "usage: bench_tokenizer --tokenizer DIR --text FILE [--ids FILE] [--repeat N]\n");
    return 2;
  }
  try {
    double t0 = now();
    auto tok = ballast::text::Tokenizer::load(dir);
    double load_s = now() - t0;
    std::string text = slurp(text_path);
    std::vector<std::string_view> lines;
    for (size_t p = 0;;) {
      size_t q = text.find('\n', p);
      lines.emplace_back(std::string_view(text).substr(p, q == std::string::npos ? std::string::npos : q - p));
      if (q == std::string::npos) break;
      p = q + 1;
    }
    std::vector<int32_t> ids;
    double best = 1e30, best_cold = 0, best_lines = 1e30, best_cpu = 1e30;
    for (int r = 0; r < repeat; ++r) {
      t0 = now();
      double c0 = cpu_now();
      ids = tok.encode(text);
      double dt = now() - t0;
      best_cpu = std::min(best_cpu, cpu_now() - c0);
      if (r == 0) best_cold = dt;
      best = std::min(best, dt);
    }
    size_t nl = 0;
    for (int r = 0; r < repeat; ++r) {
      t0 = now();
      nl = 0;
      for (auto l : lines) nl += tok.encode(l).size();
      best_lines = std::min(best_lines, now() - t0);
    }
    std::string match = "not-checked";
    if (!ids_path.empty()) {
      std::string raw = slurp(ids_path);
      std::vector<int32_t> ref(raw.size() / 4);
      std::memcpy(ref.data(), raw.data(), ref.size() * 4);
      if (ref == ids) {
        match = "identical";
      } else {
        size_t k = 0;
        while (k < ref.size() && k < ids.size() && ref[k] == ids[k]) ++k;
        match = "DIFFER at id " + std::to_string(k) + " (ours " + std::to_string(ids.size()) +
                " ids, reference " + std::to_string(ref.size()) + ")";
      }
    }
    double mb = static_cast<double>(text.size()) / 1e6;
    std::printf(
        "{\"impl\": \"ballast\", \"text\": \"%s\", \"bytes\": %zu, \"ids\": %zu, \"whole_MBps\": %.2f, "
        "\"whole_cpu_MBps\": %.2f, \"whole_cold_MBps\": %.2f, \"lines_MBps\": %.2f, \"load_s\": %.3f, \"ids_vs_reference\": \"%s\"}\n",
        text_path.c_str(), text.size(), ids.size(), mb / best, mb / best_cpu, mb / best_cold, mb / best_lines, load_s,
        match.c_str());
    return match.rfind("DIFFER", 0) == 0 ? 1 : 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}

#pragma once
// What every fuzz target shares. A finding is a crash, a sanitizer report, a hang, memory past
// libFuzzer's limit, or an exception other than the clear error the input's edge promises: such an
// exception escapes LLVMFuzzerTestOneInput and libFuzzer reports it with the input.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <string_view>

namespace ballast::fuzz {

inline std::string_view as_text(const uint8_t* data, size_t size) {
  return {reinterpret_cast<const char*>(data), size};
}

// A file of this process under the temporary directory, rewritten with each input, for loaders
// that take a path: `name` keeps the file name the loader looks for (config.json, x.safetensors).
class InputFile {
 public:
  explicit InputFile(const std::string& name)
      : dir_(std::filesystem::temp_directory_path() / ("ballast-fuzz-" + std::to_string(getpid()))),
        path_(dir_ / name) {
    std::filesystem::create_directories(dir_);
  }
  ~InputFile() {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  const std::filesystem::path& write(std::string_view bytes) {
    FILE* f = std::fopen(path_.c_str(), "wb");
    if (!f || std::fwrite(bytes.data(), 1, bytes.size(), f) != bytes.size() || std::fclose(f) != 0) std::abort();
    return path_;
  }

 private:
  std::filesystem::path dir_, path_;
};

}  // namespace ballast::fuzz

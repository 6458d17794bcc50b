#pragma once
// One .safetensors file, mapped read-only and validated once at open; tensors are zero-copy
// views into the mapping, which every view keeps alive.
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "ballast/core/tensor.h"

namespace ballast::io {

// Called with (bytes done, bytes total) while pages are brought in.
using ProgressFn = std::function<void(uint64_t done, uint64_t total)>;

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte offsets within the data region (after the header)
  uint64_t nbytes() const { return end - begin; }
};

class SafetensorsFile {
 public:
  // Maps and validates `path`: header length, JSON, dtypes, shapes, offsets (in range, sized
  // as shape*dtype, tiling the data region without overlap or gap, as the safetensors format
  // requires). Throws ballast::Error naming the file (and tensor).
  static std::shared_ptr<const SafetensorsFile> open(const std::filesystem::path& path);

  const std::filesystem::path& path() const { return path_; }
  bool has(const std::string& name) const { return index_.count(name) != 0; }
  const TensorInfo* find(const std::string& name) const;   // nullptr if absent
  const TensorInfo& info(const std::string& name) const;    // throws if absent
  Tensor get(const std::string& name) const;                // zero-copy view; throws if absent
  std::vector<std::string> names() const;                   // sorted
  const std::vector<TensorInfo>& tensors() const { return tensors_; }  // in file order
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  uint64_t file_size() const { return file_size_; }
  uint64_t data_size() const { return file_size_ - data_offset_; }
  // Sum of all tensors' byte sizes.
  uint64_t tensor_bytes() const;

  // Brings the whole file into the page cache: madvise(WILLNEED), then touches one byte per
  // page. `progress` gets (done, data_size()) as pages are touched.
  void prefault(const ProgressFn& progress = {}) const;

 private:
  struct Mapping;
  SafetensorsFile() = default;

  std::filesystem::path path_;
  std::shared_ptr<Mapping> map_;
  uint64_t file_size_ = 0;
  uint64_t data_offset_ = 0;  // 8 + header length
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// Writes CPU tensors into a .safetensors file readable by the `safetensors` Python package:
// header padded to 8 bytes, tensors packed by decreasing element size then name (so each one
// is aligned to its element size). Written to a temporary file renamed into place.
void write_safetensors(const std::filesystem::path& path, const std::map<std::string, Tensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace ballast::io

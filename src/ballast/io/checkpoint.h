#pragma once
// A model checkpoint directory: one model.safetensors, or shards listed by
// model.safetensors.index.json. Every tensor is a zero-copy view into a mapped file.
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "ballast/io/safetensors.h"

namespace ballast::io {

class Checkpoint {
 public:
  Checkpoint() = default;

  // `path` is a directory (holding model.safetensors.index.json or model.safetensors, the index
  // preferred; beside a single model.safetensors an optional mtp.safetensors holds the MTP head) or a single .safetensors file. Validates every file; for an index, also that
  // every listed shard exists and holds each tensor the index puts there. Tensors a shard holds
  // but the index does not list are ignored: the index is authoritative.
  static Checkpoint open(const std::filesystem::path& path);

  const std::filesystem::path& path() const { return path_; }
  bool has(const std::string& name) const { return where_.count(name) != 0; }
  // Throws "tensor 'X' not found in <path>".
  Tensor get(const std::string& name) const;
  // Also checks the shape; the error names the tensor, the expected and the actual shape.
  Tensor get(const std::string& name, const std::vector<int64_t>& expected_shape) const;
  const TensorInfo& info(const std::string& name) const;  // dtype/shape without touching data
  const SafetensorsFile& file_of(const std::string& name) const;
  std::vector<std::string> names() const;  // sorted
  size_t size() const { return where_.size(); }

  const std::vector<std::shared_ptr<const SafetensorsFile>>& files() const { return files_; }
  uint64_t total_bytes() const;   // sum of the listed tensors' sizes
  uint64_t mapped_bytes() const;  // sum of the files' data regions

  // Throws Error naming the file, tensor and element of the first NaN or infinity in a listed
  // float tensor: such weights compute (NaN logits, one token for ever) without a word. Reads every
  // byte once, on up to `threads` threads (0: the hardware's).
  void check_finite(int threads = 0) const;

  // Brings every file's pages into memory, calling progress(done, mapped_bytes()) as it goes;
  // lets the CLI show a progress bar instead of paying for page faults in the first forward.
  void prefault(const ProgressFn& progress = {}) const;

 private:
  std::filesystem::path path_;
  std::vector<std::shared_ptr<const SafetensorsFile>> files_;
  std::map<std::string, size_t> where_;  // tensor name -> index into files_
};

}  // namespace ballast::io

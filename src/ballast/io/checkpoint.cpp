#include "ballast/io/checkpoint.h"

#include <atomic>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <system_error>
#include <thread>

#include "ballast/core/error.h"

namespace ballast::io {

namespace fs = std::filesystem;
using nlohmann::json;

Checkpoint Checkpoint::open(const fs::path& path) {
  Checkpoint ck;
  ck.path_ = path;
  std::error_code ec;
  if (fs::is_regular_file(path, ec)) {
    ck.files_.push_back(SafetensorsFile::open(path));
    for (const auto& t : ck.files_[0]->tensors()) ck.where_[t.name] = 0;
    return ck;
  }
  check(fs::is_directory(path, ec), "{}: no such checkpoint directory or file", path.string());

  const fs::path index_path = path / "model.safetensors.index.json";
  const fs::path single = path / "model.safetensors";
  if (!fs::exists(index_path, ec)) {
    check(fs::exists(single, ec), "{}: no model.safetensors or model.safetensors.index.json",
          path.string());
    ck.files_.push_back(SafetensorsFile::open(single));
    for (const auto& t : ck.files_[0]->tensors()) ck.where_[t.name] = 0;
    // The MTP head may ship beside the trunk as its own file (mtp.* tensors only).
    const fs::path mtp = path / "mtp.safetensors";
    if (fs::exists(mtp, ec)) {
      ck.files_.push_back(SafetensorsFile::open(mtp));
      for (const auto& t : ck.files_[1]->tensors()) {
        check(t.name.rfind("mtp.", 0) == 0, "{}: tensor '{}' is not an MTP tensor (mtp.*)", mtp.string(), t.name);
        check(ck.where_.emplace(t.name, 1).second, "{}: tensor '{}' is also in {}", mtp.string(), t.name,
              single.string());
      }
    }
    return ck;
  }

  const std::string idx = index_path.string();
  json j;
  {
    std::ifstream in(index_path);
    check(bool(in), "{}: cannot open", idx);
    try {
      j = json::parse(in);
    } catch (const json::exception& e) {
      fail("{}: malformed JSON: {}", idx, e.what());
    }
  }
  check(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(),
        "{}: missing \"weight_map\" object", idx);

  std::map<std::string, size_t> shard_index;  // shard file name -> index into files_
  for (const auto& [name, v] : j["weight_map"].items()) {
    check(v.is_string(), "{}: weight_map: tensor '{}' must map to a file name string", idx, name);
    const auto shard = v.get<std::string>();
    const fs::path rel(shard);
    // Shards live beside the index; refuse paths that would reach elsewhere.
    check(!shard.empty() && rel.is_relative() && rel.filename() == rel,
          "{}: weight_map: tensor '{}': shard \"{}\" must be a plain file name in {}", idx, name, shard,
          path.string());
    auto it = shard_index.find(shard);
    if (it == shard_index.end()) {
      const fs::path shard_path = path / rel;
      check(fs::exists(shard_path, ec), "{}: tensor '{}' is listed in shard {}, which does not exist",
            idx, name, shard_path.string());
      ck.files_.push_back(SafetensorsFile::open(shard_path));
      it = shard_index.emplace(shard, ck.files_.size() - 1).first;
    }
    check(ck.files_[it->second]->has(name), "{}: tensor '{}' is listed in {} but that file does not contain it",
          idx, name, ck.files_[it->second]->path().string());
    ck.where_[name] = it->second;
  }
  return ck;
}

const SafetensorsFile& Checkpoint::file_of(const std::string& name) const {
  auto it = where_.find(name);
  check(it != where_.end(), "tensor '{}' not found in {}", name, path_.string());
  return *files_[it->second];
}

const TensorInfo& Checkpoint::info(const std::string& name) const { return file_of(name).info(name); }

Tensor Checkpoint::get(const std::string& name) const { return file_of(name).get(name); }

Tensor Checkpoint::get(const std::string& name, const std::vector<int64_t>& expected_shape) const {
  const auto& f = file_of(name);
  const auto& t = f.info(name);
  check(t.shape == expected_shape, "{}: tensor '{}' has shape {}, expected {}", f.path().string(), name,
        format_shape(t.shape), format_shape(expected_shape));
  return f.get(name);
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  out.reserve(where_.size());
  for (const auto& [k, _] : where_) out.push_back(k);
  return out;
}

uint64_t Checkpoint::total_bytes() const {
  uint64_t s = 0;
  for (const auto& [name, i] : where_) s += files_[i]->info(name).nbytes();
  return s;
}

uint64_t Checkpoint::mapped_bytes() const {
  uint64_t s = 0;
  for (const auto& f : files_) s += f->data_size();
  return s;
}

void Checkpoint::check_finite(int threads) const {
  std::vector<std::string> names = this->names();
  if (threads <= 0) threads = int(std::max(1u, std::thread::hardware_concurrency()));
  threads = std::min<int>(threads, int(names.size()));
  std::atomic<size_t> next{0};
  std::mutex mu;
  std::string first;  // the message for the lowest tensor name found non-finite
  size_t first_at = SIZE_MAX;
  auto scan = [&] {
    for (size_t i; (i = next.fetch_add(1)) < names.size();) {
      const auto& f = file_of(names[i]);
      const TensorInfo& t = f.info(names[i]);
      const Tensor v = f.get(names[i]);
      const int64_t at = first_non_finite(v.raw(), t.dtype, size_t(v.numel()));
      if (at < 0) continue;
      std::lock_guard lk(mu);
      if (i < first_at)
        first_at = i, first = fmt::format("{}: tensor '{}' holds a NaN or infinity at element {} (of {})",
                                          f.path().string(), names[i], at, v.numel());
    }
  };
  std::vector<std::thread> pool;
  try {
    for (int k = 1; k < threads; ++k) pool.emplace_back(scan);
  } catch (const std::system_error&) {
    // fewer threads than asked: the ones started (and this one) do the work
  }
  scan();
  for (auto& th : pool) th.join();
  check(first.empty(), "{}", first);
}

void Checkpoint::prefault(const ProgressFn& progress) const {
  const uint64_t total = mapped_bytes();
  uint64_t base = 0;
  for (const auto& f : files_) {
    f->prefault(progress ? ProgressFn([&](uint64_t done, uint64_t) { progress(base + done, total); })
                         : ProgressFn());
    base += f->data_size();
  }
  if (progress) progress(total, total);
}

}  // namespace ballast::io

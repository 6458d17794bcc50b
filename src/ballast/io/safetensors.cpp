#include "ballast/io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>

#include "ballast/core/error.h"

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22  // older libc headers
#endif

namespace ballast::io {

namespace fs = std::filesystem;
using nlohmann::json;

// The read-only mapping; munmapped when the last SafetensorsFile or Tensor view goes away.
struct SafetensorsFile::Mapping {
  void* base = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (base) munmap(base, size);
  }
};

namespace {

// The safetensors reference implementation refuses headers over 100 MB; so do we, so that a
// corrupt length cannot make us parse most of a weight file as JSON.
constexpr uint64_t kMaxHeader = 100ull << 20;

std::string dtype_list() {
  std::string s;
  for (DType t : {DType::F32, DType::BF16, DType::F16, DType::F8_E4M3, DType::I32, DType::I64})
    s += (s.empty() ? "" : ", ") + std::string(dtype_name(t));
  return s;
}

// Reads a JSON array of non-negative integers, naming the tensor and field on error.
std::vector<uint64_t> read_uints(const json& v, const std::string& file, const std::string& tensor,
                                 const char* field) {
  check(v.is_array(), "{}: tensor '{}': \"{}\" must be an array of non-negative integers", file,
        tensor, field);
  std::vector<uint64_t> out;
  for (const auto& x : v) {
    check(x.is_number_unsigned() || (x.is_number_integer() && x.get<int64_t>() >= 0),
          "{}: tensor '{}': \"{}\" must be an array of non-negative integers, got {}", file, tensor,
          field, v.dump());
    out.push_back(x.get<uint64_t>());
  }
  return out;
}

}  // namespace

std::shared_ptr<const SafetensorsFile> SafetensorsFile::open(const fs::path& path) {
  const std::string file = path.string();
  int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
  check(fd >= 0, "{}: cannot open: {}", file, std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    int e = errno;
    ::close(fd);
    fail("{}: cannot stat: {}", file, std::strerror(e));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail("{}: not a regular file", file);
  }
  const uint64_t size = uint64_t(st.st_size);
  if (size < 8) {
    ::close(fd);
    fail("{}: truncated safetensors file ({} bytes, shorter than the 8-byte header length)", file,
         size);
  }
  auto map = std::make_shared<Mapping>();
  map->base = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  int map_errno = errno;
  ::close(fd);  // the mapping keeps the file referenced
  if (map->base == MAP_FAILED) {
    map->base = nullptr;
    fail("{}: mmap failed: {}", file, std::strerror(map_errno));
  }
  map->size = size;
  const auto* bytes = static_cast<const uint8_t*>(map->base);

  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];  // little-endian u64
  check(n <= kMaxHeader, "{}: header length {} exceeds the 100 MB limit (corrupt file?)", file, n);
  check(8 + n <= size,
        "{}: truncated safetensors file: header length {} runs past the end of the file ({} bytes)",
        file, n, size);

  json header;
  try {
    header = json::parse(bytes + 8, bytes + 8 + n);
  } catch (const json::exception& e) {  // out_of_range too: a number beyond a double
    fail("{}: malformed JSON header: {}", file, e.what());
  }
  check(header.is_object(), "{}: JSON header must be an object, got {}", file, header.type_name());

  std::shared_ptr<SafetensorsFile> sf(new SafetensorsFile());
  sf->path_ = path;
  sf->map_ = map;
  sf->file_size_ = size;
  sf->data_offset_ = 8 + n;
  const uint64_t data_size = size - sf->data_offset_;

  for (const auto& [name, v] : header.items()) {
    if (name == "__metadata__") {
      check(v.is_object(), "{}: \"__metadata__\" must be an object of strings", file);
      for (const auto& [k, mv] : v.items()) {
        check(mv.is_string(), "{}: \"__metadata__\".\"{}\" must be a string", file, k);
        sf->metadata_[k] = mv.get<std::string>();
      }
      continue;
    }
    check(v.is_object(), "{}: tensor '{}': entry must be an object", file, name);
    for (const char* field : {"dtype", "shape", "data_offsets"})
      check(v.contains(field), "{}: tensor '{}': missing \"{}\"", file, name, field);
    check(v["dtype"].is_string(), "{}: tensor '{}': \"dtype\" must be a string", file, name);

    TensorInfo t;
    t.name = name;
    const auto dname = v["dtype"].get<std::string>();
    check(dtype_from_name(dname, &t.dtype), "{}: tensor '{}': unsupported dtype {} (supported: {})",
          file, name, dname, dtype_list());

    uint64_t numel = 1;
    bool overflow = false;
    for (uint64_t d : read_uints(v["shape"], file, name, "shape")) {
      check(d <= uint64_t(std::numeric_limits<int64_t>::max()), "{}: tensor '{}': dimension {} too large",
            file, name, d);
      t.shape.push_back(int64_t(d));
      if (d != 0 && numel > std::numeric_limits<uint64_t>::max() / d) overflow = true;
      numel *= d;
    }
    const uint64_t esz = dtype_size(t.dtype);
    overflow = overflow || (numel != 0 && numel > std::numeric_limits<uint64_t>::max() / esz);
    check(!overflow, "{}: tensor '{}': shape {} is too large", file, name, v["shape"].dump());

    auto off = read_uints(v["data_offsets"], file, name, "data_offsets");
    check(off.size() == 2, "{}: tensor '{}': \"data_offsets\" must be [begin, end], got {}", file,
          name, v["data_offsets"].dump());
    t.begin = off[0];
    t.end = off[1];
    check(t.begin <= t.end, "{}: tensor '{}': data_offsets [{}, {}] end before begin", file, name,
          t.begin, t.end);
    check(t.end <= data_size,
          "{}: tensor '{}': data_offsets [{}, {}] out of range: the data region has {} bytes "
          "(truncated file?)",
          file, name, t.begin, t.end, data_size);
    check(t.nbytes() == numel * esz,
          "{}: tensor '{}': data_offsets [{}, {}] hold {} bytes but shape {} x {} needs {}", file, name,
          t.begin, t.end, t.nbytes(), v["shape"].dump(), dname, numel * esz);
    sf->tensors_.push_back(std::move(t));
  }

  // The format requires the tensors to tile the data region exactly: anything else means the
  // header lies about where the bytes are.
  std::vector<const TensorInfo*> order;
  for (const auto& t : sf->tensors_) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t pos = 0;
  const TensorInfo* prev = nullptr;
  for (const auto* t : order) {
    if (t->begin < pos)
      fail("{}: tensor '{}': data_offsets [{}, {}] overlap tensor '{}' [{}, {}]", file, t->name,
           t->begin, t->end, prev->name, prev->begin, prev->end);
    if (t->begin > pos)
      fail("{}: tensor '{}': data_offsets [{}, {}] leave a gap of {} bytes after {}", file, t->name,
           t->begin, t->end, t->begin - pos, prev ? "tensor '" + prev->name + "'" : "the header");
    pos = t->end;
    prev = t;
  }
  check(pos == data_size, "{}: {} bytes after the last tensor{} are not described by the header", file,
        data_size - pos, prev ? " ('" + prev->name + "')" : "");

  for (size_t i = 0; i < sf->tensors_.size(); ++i) sf->index_[sf->tensors_[i].name] = i;
  return sf;
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
  const TensorInfo* t = find(name);
  check(t != nullptr, "tensor '{}' not found in {}", name, path_.string());
  return *t;
}

Tensor SafetensorsFile::get(const std::string& name) const {
  const TensorInfo& t = info(name);
  auto* p = static_cast<uint8_t*>(map_->base) + data_offset_ + t.begin;
  // Read-only pages: a kernel that writes into a weight faults instead of corrupting it.
  return Tensor::borrow(p, t.shape, t.dtype, Device::CPU, map_);
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  for (const auto& [k, _] : index_) out.push_back(k);
  return out;
}

uint64_t SafetensorsFile::tensor_bytes() const {
  uint64_t s = 0;
  for (const auto& t : tensors_) s += t.nbytes();
  return s;
}

void SafetensorsFile::prefault(const ProgressFn& progress) const {
  const uint64_t total = data_size();
  auto* base = static_cast<uint8_t*>(map_->base);
  madvise(base, map_->size, MADV_WILLNEED);
  const uint64_t page = uint64_t(sysconf(_SC_PAGESIZE));
  constexpr uint64_t kChunk = 64ull << 20;  // one progress report per chunk
  bool populate = true;                     // MADV_POPULATE_READ: Linux 5.14+, no per-page faults
  uint8_t sink = 0;
  for (uint64_t off = data_offset_ / page * page; off < map_->size; off += kChunk) {
    const uint64_t len = std::min(kChunk, map_->size - off);
    if (populate && madvise(base + off, len, MADV_POPULATE_READ) != 0) populate = false;
    if (!populate)
      for (uint64_t p = 0; p < len; p += page) sink ^= static_cast<volatile const uint8_t*>(base)[off + p];
    const uint64_t done = off + len > data_offset_ ? off + len - data_offset_ : 0;
    if (progress) progress(std::min(done, total), total);
  }
  (void)sink;
  if (progress) progress(total, total);
}

void write_safetensors(const fs::path& path, const std::map<std::string, Tensor>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<std::pair<std::string, const Tensor*>> order;
  for (const auto& [name, t] : tensors) {
    check(name != "__metadata__", "{}: '__metadata__' is not a valid tensor name", path.string());
    check(t.device() == Device::CPU, "{}: tensor '{}' is not on the CPU", path.string(), name);
    check(t.defined() || t.numel() == 0, "{}: tensor '{}' has no storage", path.string(), name);
    order.emplace_back(name, &t);
  }
  std::stable_sort(order.begin(), order.end(), [](const auto& a, const auto& b) {
    return dtype_size(a.second->dtype()) > dtype_size(b.second->dtype());
  });

  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t off = 0;
  for (const auto& [name, t] : order) {
    header[name] = {{"dtype", std::string(dtype_name(t->dtype()))},
                    {"shape", t->shape()},
                    {"data_offsets", {off, off + t->nbytes()}}};
    off += t->nbytes();
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');  // keeps the data region 8-byte aligned

  fs::path tmp = path;
  tmp += ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    check(bool(out), "{}: cannot open for writing", tmp.string());
    uint8_t len[8];
    for (int i = 0; i < 8; ++i) len[i] = uint8_t(uint64_t(h.size()) >> (8 * i));
    out.write(reinterpret_cast<const char*>(len), 8);
    out.write(h.data(), std::streamsize(h.size()));
    for (const auto& [name, t] : order)
      if (t->nbytes()) out.write(static_cast<const char*>(t->raw()), std::streamsize(t->nbytes()));
    out.close();
    check(bool(out), "{}: write failed", tmp.string());
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  check(!ec, "{}: cannot rename {} into place: {}", path.string(), tmp.string(), ec.message());
}

}  // namespace ballast::io

#include "ballast/eplb/load.h"

#include "ballast/core/error.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>

namespace ballast::eplb {

LoadTrace LoadTrace::sum(int begin, int end) const { return slices(begin, end, 1); }

LoadTrace LoadTrace::slices(int begin, int end, int nslices) const {
  check(0 <= begin && begin < end && end <= passes, "load: pass range [{}, {}) outside [0, {})", begin, end, passes);
  nslices = std::max(1, std::min(nslices, end - begin));
  LoadTrace out(nslices, layers, experts);
  int n = end - begin;
  for (int t = begin; t < end; ++t) {
    int s = int(int64_t(t - begin) * nslices / n);
    for (int l = 0; l < layers; ++l) {
      const double* src = at(t, l);
      double* dst = out.at(s, l);
      for (int e = 0; e < experts; ++e) dst[e] += src[e];
    }
  }
  return out;
}

LoadTrace LoadTrace::range(int begin, int end) const {
  check(0 <= begin && begin <= end && end <= passes, "load: pass range [{}, {}) outside [0, {})", begin, end, passes);
  LoadTrace out(end - begin, layers, experts);
  std::copy(at(begin, 0), at(begin, 0) + size_t(end - begin) * layers * experts, out.count.begin());
  return out;
}

void LoadTrace::validate(const std::string& origin) const {
  check(count.size() == size_t(passes) * layers * experts, "{}: {} counts for shape [{}][{}][{}]", origin,
        count.size(), passes, layers, experts);
  // A window of passes is the planner's largest input: checked block by block on the bits (sign
  // set, or exponent all ones: negative, infinite or NaN), with integer operations that vectorise,
  // and a block searched for its first bad count only when it may have one (-0.0 sets the sign and
  // is accepted there), so the message names the first in the trace.
  constexpr uint64_t kExp = 0x7FF0000000000000ull, kOne = 0x0010000000000000ull;
  const size_t n = count.size(), block = 4096;
  for (size_t b0 = 0; b0 < n; b0 += block) {
    const size_t b1 = std::min(n, b0 + block);
    uint64_t acc = 0;
    for (size_t i = b0; i < b1; ++i) {
      uint64_t u;
      std::memcpy(&u, &count[i], sizeof u);
      acc |= ((u & kExp) + kOne) | u;  // bit 63: the sign, or the carry out of an all-ones exponent
    }
    if (!(acc >> 63)) continue;
    for (size_t i = b0; i < b1; ++i) {
      if (!std::isfinite(count[i]) || count[i] < 0) {
        size_t e = i % experts, l = (i / experts) % layers, t = i / (size_t(experts) * layers);
        fail("{}: count at pass {} layer {} expert {} is {} (counts must be finite and >= 0)", origin, t, l, e, count[i]);
      }
    }
  }
}

namespace {

double number_at(const nlohmann::json& v, const std::string& origin, const std::string& where) {
  check(v.is_number(), "{}: logical_count{} is not a number", origin, where);
  double x = v.get<double>();
  check(std::isfinite(x) && x >= 0, "{}: logical_count{} is {} (counts must be >= 0)", origin, where, x);
  return x;
}

}  // namespace

LoadTrace load_from_json_text(const std::string& text, const std::string& origin) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const std::exception& e) {
    fail("{}: not valid JSON: {}", origin, e.what());
  }
  const nlohmann::json* a = &j;
  if (j.is_object()) {
    check(j.contains("logical_count"), "{}: no field 'logical_count'", origin);
    a = &j["logical_count"];
  }
  check(a->is_array() && !a->empty(), "{}: logical_count must be a non-empty [L][E] or [T][L][E] array", origin);
  check((*a)[0].is_array() && !(*a)[0].empty(), "{}: logical_count[0] must be a non-empty array", origin);
  bool three = (*a)[0][0].is_array();
  if (!three) {
    int L = int(a->size()), E = int((*a)[0].size());
    LoadTrace out(1, L, E);
    for (int l = 0; l < L; ++l) {
      const auto& row = (*a)[l];
      check(row.is_array() && int(row.size()) == E, "{}: ragged logical_count: row {} has {} entries, row 0 has {}",
            origin, l, row.is_array() ? row.size() : 0, E);
      for (int e = 0; e < E; ++e) out.at(0, l)[e] = number_at(row[e], origin, fmt::format("[{}][{}]", l, e));
    }
    return out;
  }
  int T = int(a->size()), L = int((*a)[0].size()), E = int((*a)[0][0].size());
  check(E > 0, "{}: logical_count[0][0] is empty", origin);
  LoadTrace out(T, L, E);
  for (int t = 0; t < T; ++t) {
    const auto& m = (*a)[t];
    check(m.is_array() && int(m.size()) == L, "{}: ragged logical_count: pass {} has {} layers, pass 0 has {}", origin,
          t, m.is_array() ? m.size() : 0, L);
    for (int l = 0; l < L; ++l) {
      const auto& row = m[l];
      check(row.is_array() && int(row.size()) == E,
            "{}: ragged logical_count: pass {} layer {} has {} entries, expected {}", origin, t, l,
            row.is_array() ? row.size() : 0, E);
      for (int e = 0; e < E; ++e) out.at(t, l)[e] = number_at(row[e], origin, fmt::format("[{}][{}][{}]", t, l, e));
    }
  }
  return out;
}

std::string load_to_json_text(const LoadTrace& t, bool as_matrix) {
  auto mat = [&](int p) {
    nlohmann::json m = nlohmann::json::array();
    for (int l = 0; l < t.layers; ++l) {
      nlohmann::json row = nlohmann::json::array();
      for (int e = 0; e < t.experts; ++e) {
        double x = t.at(p, l)[e];
        if (x == std::floor(x) && x < 9e15) row.push_back(int64_t(x)); else row.push_back(x);
      }
      m.push_back(std::move(row));
    }
    return m;
  };
  nlohmann::json j;
  if (as_matrix && t.passes == 1) {
    j["logical_count"] = mat(0);
  } else {
    nlohmann::json a = nlohmann::json::array();
    for (int p = 0; p < t.passes; ++p) a.push_back(mat(p));
    j["logical_count"] = std::move(a);
  }
  return j.dump() + "\n";
}

std::string read_text_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  check(bool(f), "{}: cannot open for reading", path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void write_text_file(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  check(bool(f), "{}: cannot open for writing", path);
  f << text;
  check(bool(f), "{}: write failed", path);
}

static bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

LoadTrace read_load(const std::string& path) {
  std::string bytes = read_text_file(path);
  if (!ends_with(path, ".safetensors")) {
    LoadTrace t = load_from_json_text(bytes, path);
    return t;
  }
  check(bytes.size() >= 8, "{}: too short for safetensors", path);
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  check(n <= bytes.size() - 8, "{}: bad safetensors header length {}", path, n);
  nlohmann::json h;
  try {
    h = nlohmann::json::parse(bytes.substr(8, n));
  } catch (const std::exception& e) {
    fail("{}: bad safetensors header: {}", path, e.what());
  }
  check(h.contains("logical_count"), "{}: no tensor 'logical_count'", path);
  const auto& d = h["logical_count"];
  std::string dtype = d["dtype"].get<std::string>();
  check(dtype == "I32", "{}: logical_count has dtype {}, expected I32", path, dtype);
  auto shape = d["shape"].get<std::vector<int64_t>>();
  check(shape.size() == 2 || shape.size() == 3, "{}: logical_count must be [L,E] or [T,L,E]", path);
  if (shape.size() == 2) shape.insert(shape.begin(), 1);
  auto off = d["data_offsets"].get<std::vector<uint64_t>>();
  size_t numel = size_t(shape[0] * shape[1] * shape[2]);
  check(off.size() == 2 && off[1] - off[0] == numel * 4 && 8 + n + off[1] <= bytes.size(),
        "{}: logical_count data offsets do not match its shape", path);
  LoadTrace t{int(shape[0]), int(shape[1]), int(shape[2])};
  const char* base = bytes.data() + 8 + n + off[0];
  for (size_t i = 0; i < numel; ++i) {
    int32_t v;
    std::memcpy(&v, base + 4 * i, 4);
    t.count[i] = v;
  }
  t.validate(path);
  return t;
}

void write_load(const std::string& path, const LoadTrace& t) {
  if (!ends_with(path, ".safetensors")) {
    write_text_file(path, load_to_json_text(t, t.passes == 1));
    return;
  }
  size_t numel = t.count.size();
  nlohmann::json h;
  h["logical_count"] = {{"dtype", "I32"},
                        {"shape", {t.passes, t.layers, t.experts}},
                        {"data_offsets", {0, numel * 4}}};
  std::string hs = h.dump();
  while ((8 + hs.size()) % 8) hs.push_back(' ');
  std::string out(8, '\0');
  uint64_t n = hs.size();
  std::memcpy(out.data(), &n, 8);
  out += hs;
  out.resize(8 + hs.size() + numel * 4);
  char* base = out.data() + 8 + hs.size();
  for (size_t i = 0; i < numel; ++i) {
    double x = t.count[i];
    check(x >= 0 && x <= 2147483647.0 && x == std::floor(x), "{}: count {} does not fit I32", path, x);
    int32_t v = int32_t(x);
    std::memcpy(base + 4 * i, &v, 4);
  }
  write_text_file(path, out);
}

}  // namespace ballast::eplb

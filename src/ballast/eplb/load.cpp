#include "ballast/eplb/load.h"

#include "ballast/core/checked.h"
#include "ballast/core/error.h"
#include "ballast/eplb/limits.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>

namespace ballast::eplb {

LoadTrace::LoadTrace(int passes, int layers, int experts) : passes(passes), layers(layers), experts(experts) {
  const int64_t dims[] = {passes, layers, experts};
  count.assign(size_t(checked_numel(dims, kMaxLoadCounts, "load: counts [T][L][E]")), 0.0);
}

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
  // A window of passes is the planner's largest input: checked block by block on the bits, with
  // integer operations that vectorise. For a double >= +0 the bits grow with the value, so bits
  // above 2^53's flag every bad count (negative: the sign bit; infinite; NaN; above 2^53) and
  // -0.0, which the search of the block then accepts; the search names the first bad count.
  uint64_t max_bits;
  std::memcpy(&max_bits, &kMaxCount, sizeof max_bits);
  const size_t n = count.size(), block = 4096;
  for (size_t b0 = 0; b0 < n; b0 += block) {
    const size_t b1 = std::min(n, b0 + block);
    uint64_t any = 0;
    for (size_t i = b0; i < b1; ++i) {
      uint64_t u;
      std::memcpy(&u, &count[i], sizeof u);
      any |= uint64_t(u > max_bits);
    }
    if (!any) continue;
    for (size_t i = b0; i < b1; ++i) {
      if (!(count[i] >= 0 && count[i] <= kMaxCount)) {
        size_t e = i % experts, l = (i / experts) % layers, t = i / (size_t(experts) * layers);
        fail("{}: count at pass {} layer {} expert {} is {} (counts must be finite, >= 0 and <= 2^53)", origin, t, l, e,
             count[i]);
      }
    }
  }
}

namespace {

double number_at(const nlohmann::json& v, const std::string& origin, const std::string& where) {
  check(v.is_number(), "{}: logical_count{} is not a number", origin, where);
  double x = v.get<double>();
  check(x >= 0 && x <= kMaxCount, "{}: logical_count{} is {} (counts must be >= 0 and <= 2^53)", origin, where, x);
  return x;
}

// The size of a JSON array dimension, within `limit`.
int dim(const nlohmann::json& a, int limit, const std::string& origin, const char* what) {
  check(a.size() <= size_t(limit), "{}: logical_count has {} {}, more than the limit of {}", origin, a.size(), what,
        limit);
  return int(a.size());
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
    int L = dim(*a, kMaxLayers, origin, "layers"), E = dim((*a)[0], kMaxExperts, origin, "experts");
    LoadTrace out(1, L, E);
    for (int l = 0; l < L; ++l) {
      const auto& row = (*a)[l];
      check(row.is_array() && int(row.size()) == E, "{}: ragged logical_count: row {} has {} entries, row 0 has {}",
            origin, l, row.is_array() ? row.size() : 0, E);
      for (int e = 0; e < E; ++e) out.at(0, l)[e] = number_at(row[e], origin, fmt::format("[{}][{}]", l, e));
    }
    return out;
  }
  int T = dim(*a, INT32_MAX, origin, "passes"), L = dim((*a)[0], kMaxLayers, origin, "layers"),
      E = dim((*a)[0][0], kMaxExperts, origin, "experts");
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
  check(h.is_object() && h.contains("logical_count"), "{}: no tensor 'logical_count'", path);
  const auto& d = h["logical_count"];
  check(d.is_object(), "{}: logical_count's header entry is not an object", path);
  check(d.contains("dtype") && d["dtype"].is_string(), "{}: logical_count has no \"dtype\" string", path);
  std::string dtype = d["dtype"].get<std::string>();
  check(dtype == "I32", "{}: logical_count has dtype {}, expected I32", path, dtype);
  auto ints = [&](const char* key) {
    check(d.contains(key) && d[key].is_array(), "{}: logical_count has no \"{}\" array", path, key);
    std::vector<int64_t> v;
    for (const auto& x : d[key]) {
      check(x.is_number_unsigned(), "{}: logical_count's \"{}\" holds {}, not an integer >= 0", path, key, x.dump());
      check(x.get<uint64_t>() <= uint64_t(INT64_MAX), "{}: logical_count's \"{}\" holds {}, too large", path, key,
            x.dump());
      v.push_back(x.get<int64_t>());
    }
    return v;
  };
  auto shape = ints("shape");
  check(shape.size() == 2 || shape.size() == 3, "{}: logical_count must be [L,E] or [T,L,E]", path);
  if (shape.size() == 2) shape.insert(shape.begin(), 1);
  check(shape[0] <= INT32_MAX && shape[1] <= kMaxLayers && shape[2] <= kMaxExperts,
        "{}: logical_count shape [{}, {}, {}] is beyond the limits of {} layers and {} experts", path, shape[0],
        shape[1], shape[2], kMaxLayers, kMaxExperts);
  const int64_t numel = checked_numel(shape, kMaxLoadCounts, path + ": logical_count");
  auto off = ints("data_offsets");
  const int64_t data = int64_t(bytes.size() - 8 - n);
  check(off.size() == 2 && off[0] <= off[1] && off[1] <= data && off[1] - off[0] == numel * 4,
        "{}: logical_count data offsets do not match its shape", path);
  LoadTrace t{int(shape[0]), int(shape[1]), int(shape[2])};
  const char* base = bytes.data() + 8 + n + off[0];
  for (int64_t i = 0; i < numel; ++i) {
    int32_t v;
    std::memcpy(&v, base + 4 * i, 4);
    t.count[size_t(i)] = v;
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

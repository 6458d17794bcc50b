#include "ballast/serve/pass_plan.h"

#include <cstring>
#include <type_traits>

#include "ballast/core/error.h"

namespace ballast::serve {

namespace {

// Fixed-width values in host order (every rank runs the same binary on the same kind of host).
class Writer {
 public:
  template <typename T>
    requires std::is_trivially_copyable_v<T>
  void put(const T& v) {
    const auto* p = reinterpret_cast<const std::byte*>(&v);
    out_.insert(out_.end(), p, p + sizeof(T));
  }
  template <typename T>
  void put_vector(const std::vector<T>& v) {
    put(uint64_t(v.size()));
    for (const T& e : v) put(e);
  }
  void put_string(const std::string& s) {
    put(uint64_t(s.size()));
    const auto* p = reinterpret_cast<const std::byte*>(s.data());
    out_.insert(out_.end(), p, p + s.size());
  }
  dist::Bytes take() { return std::move(out_); }

 private:
  dist::Bytes out_;
};

class Reader {
 public:
  explicit Reader(const dist::Bytes& in) : in_(in) {}
  template <typename T>
    requires std::is_trivially_copyable_v<T>
  T get() {
    check(at_ + sizeof(T) <= in_.size(), "serve: a lockstep message of {} bytes is truncated", in_.size());
    T v;
    std::memcpy(&v, in_.data() + at_, sizeof(T));
    at_ += sizeof(T);
    return v;
  }
  template <typename T>
  std::vector<T> get_vector() {
    const auto n = get<uint64_t>();
    check(n <= in_.size(), "serve: a lockstep message holds a bad count {}", n);
    std::vector<T> v;
    v.reserve(size_t(n));
    for (uint64_t i = 0; i < n; ++i) v.push_back(get<T>());
    return v;
  }
  std::string get_string() {
    const auto n = get<uint64_t>();
    check(at_ + n <= in_.size(), "serve: a lockstep message of {} bytes is truncated", in_.size());
    std::string s(reinterpret_cast<const char*>(in_.data() + at_), size_t(n));
    at_ += size_t(n);
    return s;
  }
  void done() const { check(at_ == in_.size(), "serve: {} bytes left over in a lockstep message", in_.size() - at_); }

 private:
  const dist::Bytes& in_;
  size_t at_ = 0;
};

void put_logprobs(Writer& w, const std::vector<runtime::TokenLogprobs>& v) {
  w.put(uint64_t(v.size()));
  for (const auto& t : v) {
    w.put(t.logprob);
    w.put(uint64_t(t.top.size()));
    for (const auto& [id, lp] : t.top) {
      w.put(id);
      w.put(lp);
    }
  }
}

std::vector<runtime::TokenLogprobs> get_logprobs(Reader& r) {
  std::vector<runtime::TokenLogprobs> v(size_t(r.get<uint64_t>()));
  for (auto& t : v) {
    t.logprob = r.get<float>();
    t.top.resize(size_t(r.get<uint64_t>()));
    for (auto& [id, lp] : t.top) {
      id = r.get<int32_t>();
      lp = r.get<float>();
    }
  }
  return v;
}

}  // namespace

dist::Bytes encode(const PassPlan& plan) {
  Writer w;
  w.put(uint64_t(plan.joins.size()));
  for (const auto& j : plan.joins) {
    w.put(j.id);
    w.put(int32_t(j.rank));
    const runtime::Request& r = j.request;
    w.put_vector(r.prompt);
    w.put(r.sampling);
    w.put(int32_t(r.max_new_tokens));
    w.put_vector(r.stop_ids);
    w.put(int32_t(r.top_logprobs));
  }
  w.put_vector(plan.aborts);
  w.put_vector(plan.commands);
  w.put(uint8_t(plan.stop));
  return w.take();
}

PassPlan decode_plan(const dist::Bytes& bytes) {
  Reader r(bytes);
  PassPlan plan;
  plan.joins.resize(size_t(r.get<uint64_t>()));
  for (auto& j : plan.joins) {
    j.id = r.get<uint64_t>();
    j.rank = r.get<int32_t>();
    j.request.prompt = r.get_vector<int32_t>();
    j.request.sampling = r.get<runtime::SamplingParams>();
    j.request.max_new_tokens = r.get<int32_t>();
    j.request.stop_ids = r.get_vector<int32_t>();
    j.request.top_logprobs = r.get<int32_t>();
  }
  plan.aborts = r.get_vector<uint64_t>();
  plan.commands = r.get_vector<Command>();
  plan.stop = r.get<uint8_t>() != 0;
  r.done();
  return plan;
}

dist::Bytes encode(const RankReport& rep) {
  Writer w;
  w.put(uint64_t(rep.outputs.size()));
  for (const auto& o : rep.outputs) {
    w.put(o.id);
    w.put_vector(o.tokens);
    put_logprobs(w, o.logprobs);
    w.put(uint8_t(o.finished));
    w.put(o.reason);
  }
  w.put(uint64_t(rep.refused.size()));
  for (const auto& [id, why] : rep.refused) {
    w.put(id);
    w.put_string(why);
  }
  for (int64_t v : {rep.running, rep.waiting, rep.used_blocks, rep.total_blocks, rep.preemptions, rep.spec_rounds,
                    rep.spec_emitted})
    w.put(v);
  return w.take();
}

RankReport decode_report(const dist::Bytes& bytes) {
  Reader r(bytes);
  RankReport rep;
  rep.outputs.resize(size_t(r.get<uint64_t>()));
  for (auto& o : rep.outputs) {
    o.id = r.get<uint64_t>();
    o.tokens = r.get_vector<int32_t>();
    o.logprobs = get_logprobs(r);
    o.finished = r.get<uint8_t>() != 0;
    o.reason = r.get<runtime::FinishReason>();
  }
  rep.refused.resize(size_t(r.get<uint64_t>()));
  for (auto& [id, why] : rep.refused) {
    id = r.get<uint64_t>();
    why = r.get_string();
  }
  for (int64_t* v : {&rep.running, &rep.waiting, &rep.used_blocks, &rep.total_blocks, &rep.preemptions,
                     &rep.spec_rounds, &rep.spec_emitted})
    *v = r.get<int64_t>();
  r.done();
  return rep;
}

}  // namespace ballast::serve

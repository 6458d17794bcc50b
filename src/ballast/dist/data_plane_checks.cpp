#include "ballast/dist/data_plane_checks.h"

#include "ballast/core/error.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cstring>

namespace ballast::dist::detail {

namespace {

std::string_view device_name(Device d) {
  switch (d) {
    case Device::CPU: return "CPU";
    case Device::CUDA: return "CUDA";
  }
  return "?";
}

// A buffer this rank reads or writes: storage (unless empty) in the plane's memory.
std::optional<std::string> check_memory(std::string_view call, int rank, std::string_view what, const Tensor& t,
                                        std::string_view impl, Device where) {
  if (t.device() != where)
    return fmt::format("{}: rank {}'s {} is in {} memory; the {} data plane moves {} memory only", call, rank, what,
                       device_name(t.device()), impl, where == Device::CPU ? "host (CPU)" : device_name(where));
  if (!t.defined() && t.nbytes() > 0)
    return fmt::format("{}: rank {}'s {} {} has no storage", call, rank, what, t);
  return std::nullopt;
}

bool overlap(const Tensor& a, const Tensor& b) {
  if (a.nbytes() == 0 || b.nbytes() == 0) return false;
  auto* pa = static_cast<const std::byte*>(a.raw());
  auto* pb = static_cast<const std::byte*>(b.raw());
  return pa < pb + b.nbytes() && pb < pa + a.nbytes();
}

std::optional<std::string> check_counts(int rank, int size, std::string_view what, const Tensor& t,
                                        std::string_view impl, Device where) {
  if (auto bad = check_memory("all_to_all_v", rank, what, t, impl, where)) return bad;
  if (t.dtype() != DType::I32 || t.rank() != 1 || t.dim(0) != size)
    return fmt::format("all_to_all_v: rank {}'s {} is {} {}, expected I32 [{}]", rank, what,
                       dtype_name(t.dtype()), t, size);
  return std::nullopt;
}

}  // namespace

std::optional<std::string> check_row_buffers(int rank, int size, const Tensor& send, const Tensor& send_counts,
                                             const Tensor& recv, const Tensor& recv_counts, std::string_view impl,
                                             Device where, RowArgs* out) {
  for (auto [what, t] : {std::pair<const char*, const Tensor*>{"send", &send}, {"recv", &recv}}) {
    if (auto bad = check_memory("all_to_all_v", rank, what, *t, impl, where)) return bad;
    if (t->rank() < 1)
      return fmt::format("all_to_all_v: rank {}'s {} has no dimensions; rows are its first dimension", rank, what);
  }
  if (auto bad = check_counts(rank, size, "send_counts", send_counts, impl, where)) return bad;
  if (auto bad = check_counts(rank, size, "recv_counts", recv_counts, impl, where)) return bad;
  if (send.dtype() != recv.dtype() || send.row_bytes() != recv.row_bytes())
    return fmt::format("all_to_all_v: rank {}'s send is {} {} but its recv is {} {}; they need the same dtype "
                       "and row size",
                       rank, dtype_name(send.dtype()), send, dtype_name(recv.dtype()), recv);
  if (overlap(send, recv))
    return fmt::format("all_to_all_v: rank {}'s send and recv overlap (in place is not supported)", rank);
  out->row_bytes = send.row_bytes();
  out->dtype = send.dtype();
  out->recv_rows = recv.dim(0);
  out->send_rows = send.dim(0);
  return std::nullopt;
}

std::optional<std::string> check_send_counts(int rank, std::span<const int32_t> counts, RowArgs* out) {
  out->send_counts.assign(counts.size(), 0);
  out->rows_out = 0;
  for (size_t g = 0; g < counts.size(); ++g) {
    if (counts[g] < 0) return fmt::format("all_to_all_v: rank {}'s send_counts[{}] is {}", rank, g, counts[g]);
    out->send_counts[g] = counts[g];
    out->rows_out += counts[g];
  }
  if (out->rows_out > out->send_rows)
    return fmt::format("all_to_all_v: rank {}'s send_counts sum to {} rows, its send holds {}", rank,
                       out->rows_out, out->send_rows);
  return std::nullopt;
}

std::optional<std::string> check_all_to_all_v(int rank, int size, const Tensor& send, const Tensor& send_counts,
                                              const Tensor& recv, const Tensor& recv_counts,
                                              std::string_view impl, RowArgs* out) {
  if (auto bad = check_row_buffers(rank, size, send, send_counts, recv, recv_counts, impl, Device::CPU, out))
    return bad;
  return check_send_counts(rank, {send_counts.data<int32_t>(), size_t(size)}, out);
}

std::optional<std::string> check_recv_room(int rank, std::span<const int64_t> from, int64_t recv_rows) {
  int64_t total = 0;
  for (auto n : from) total += n;
  if (total <= recv_rows) return std::nullopt;
  return fmt::format("all_to_all_v: rank {} receives {} rows (by source rank: [{}]) but its recv holds {}", rank,
                     total, fmt::join(from, ", "), recv_rows);
}

std::optional<std::string> check_all_gather(int rank, int size, const Tensor& mine, const Tensor& all,
                                            std::string_view impl, Device where) {
  if (auto bad = check_memory("all_gather", rank, "mine", mine, impl, where)) return bad;
  if (auto bad = check_memory("all_gather", rank, "all", all, impl, where)) return bad;
  if (mine.dtype() != all.dtype())
    return fmt::format("all_gather: rank {}'s mine is {} but its all is {}", rank, dtype_name(mine.dtype()),
                       dtype_name(all.dtype()));
  if (all.numel() != int64_t(size) * mine.numel())
    return fmt::format("all_gather: rank {}'s all is {} {}, expected {} elements ({} ranks x {})", rank,
                       dtype_name(all.dtype()), all, int64_t(size) * mine.numel(), size, mine.numel());
  const bool own_slot = static_cast<const std::byte*>(mine.raw()) ==
                        static_cast<const std::byte*>(all.raw()) + size_t(rank) * mine.nbytes();
  if (overlap(mine, all) && !own_slot)
    return fmt::format("all_gather: rank {}'s mine overlaps its all, other than as its own slot {}", rank, rank);
  return std::nullopt;
}

std::optional<std::string> check_all_reduce(int rank, const Tensor& data, std::string_view impl, Device where) {
  if (auto bad = check_memory("all_reduce_sum", rank, "data", data, impl, where)) return bad;
  const DType t = data.dtype();
  if (t != DType::I32 && t != DType::I64 && t != DType::F32)
    return fmt::format("all_reduce_sum: rank {}'s data is {} {}; sums are over I32, I64 or F32", rank,
                       dtype_name(t), data);
  return std::nullopt;
}

std::optional<std::string> check_transfers(int rank, int size, std::span<const DataPlane::Transfer> items,
                                           std::string_view impl, Device where) {
  for (const auto& it : items) {
    const bool send = it.kind == DataPlane::Transfer::send;
    if (it.peer < 0 || it.peer >= size)
      return fmt::format("send_recv: rank {} {} rank {} of {}", rank, send ? "sends to" : "receives from",
                         it.peer, size);
    const std::string what = fmt::format("buffer {} rank {}", send ? "to send to" : "to receive from", it.peer);
    if (auto bad = check_memory("send_recv", rank, what, it.buffer, impl, where)) return bad;
  }
  return std::nullopt;
}

std::optional<std::string> check_same_layout(std::string_view call, std::span<const Layout> by_rank, bool rows) {
  auto describe = [&](const Layout& l) {
    return rows ? fmt::format("rows of {} bytes ({})", l.size, dtype_name(l.dtype))
                : fmt::format("{} {} elements", l.size, dtype_name(l.dtype));
  };
  for (size_t r = 1; r < by_rank.size(); ++r)
    if (by_rank[r].size != by_rank[0].size || by_rank[r].dtype != by_rank[0].dtype)
      return fmt::format("{}: rank 0 passes {}, rank {} passes {}", call, describe(by_rank[0]), r,
                         describe(by_rank[r]));
  return std::nullopt;
}

Statement::Statement(const std::optional<std::string>& error, Layout mine)
    : failed(error ? 1 : 0), size(mine.size), dtype(int64_t(mine.dtype)) {
  if (error) error->copy(message, sizeof message - 1);
}

void throw_verdict(std::string_view call, int rank, std::span<const std::optional<std::string>> errors,
                   std::span<const Layout> layouts, bool rows) {
  if (errors[size_t(rank)]) throw Error(*errors[size_t(rank)]);
  for (size_t r = 0; r < errors.size(); ++r)
    if (errors[r]) fail("rank {} failed: {}", r, *errors[r]);
  if (auto bad = check_same_layout(call, layouts, rows)) fail("{}", *bad);
}

void throw_verdict(std::string_view call, int rank, std::span<const Statement> said,
                   const std::optional<std::string>& mine, bool rows) {
  std::vector<std::optional<std::string>> errors(said.size());
  std::vector<Layout> layouts(said.size());
  for (size_t r = 0; r < said.size(); ++r) {
    if (said[r].failed) errors[r] = std::string(said[r].message);
    layouts[r] = said[r].layout();
  }
  errors[size_t(rank)] = mine;
  throw_verdict(call, rank, errors, layouts, rows);
}

std::string transfer_size_mismatch(int receiver, int64_t expected, int sender, int64_t sent) {
  return fmt::format("send_recv: rank {} expected {} bytes from rank {}, which sent {}", receiver, expected, sender,
                     sent);
}

void add_into(DType dtype, void* acc, const void* x, size_t n) {
  // Integers wrap (through unsigned, which C++ defines); floats round once per add.
  auto add = [&]<typename T, typename U>() {
    auto* a = static_cast<T*>(acc);
    auto* b = static_cast<const T*>(x);
    for (size_t i = 0; i < n; ++i) a[i] = T(U(a[i]) + U(b[i]));
  };
  switch (dtype) {
    case DType::I32: add.template operator()<int32_t, uint32_t>(); break;
    case DType::I64: add.template operator()<int64_t, uint64_t>(); break;
    case DType::F32: add.template operator()<float, float>(); break;
    default: break;  // refused by check_all_reduce
  }
}

}  // namespace ballast::dist::detail

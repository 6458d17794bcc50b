#include "ballast/dist/nccl_data_plane.h"

#include <cuda_runtime.h>
#include <fmt/format.h>
#include <nccl.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "ballast/core/error.h"
#include "ballast/dist/data_plane_checks.h"

namespace ballast::dist {

namespace {

constexpr std::string_view kImpl = "NCCL";

void cuda_check(cudaError_t e, int rank, std::string_view what) {
  if (e != cudaSuccess) fail("{} failed on rank {}: {}", what, rank, cudaGetErrorString(e));
}

void nccl_check(ncclResult_t r, ncclComm_t comm, int rank, std::string_view what) {
  if (r == ncclSuccess) return;
  const char* detail = comm ? ncclGetLastError(comm) : "";
  fail("{} failed on rank {}: {}{}{}", what, rank, ncclGetErrorString(r), *detail ? ": " : "", detail);
}

// What a rank says of its arguments to a collective (detail::Statement), the same fixed layout on
// every rank; all_to_all_v's also carry its send and receive rows, then its G send counts (I32),
// copied after the header on the device.
struct Header {
  detail::Statement said;
  int64_t send_rows = 0, recv_rows = 0;  // all_to_all_v
};

// Device scratch that grows in stream order (cudaMallocAsync / cudaFreeAsync on the plane's stream).
struct DeviceScratch {
  void* p = nullptr;
  size_t bytes = 0;
  std::byte* get(size_t want, cudaStream_t s, int rank) {
    if (want > bytes) {
      if (p) cuda_check(cudaFreeAsync(p, s), rank, "cudaFreeAsync (NCCL data plane scratch)");
      p = nullptr;
      bytes = std::max(want, 2 * bytes);
      cuda_check(cudaMallocAsync(&p, bytes, s), rank, "cudaMallocAsync (NCCL data plane scratch)");
    }
    return static_cast<std::byte*>(p);
  }
};

std::byte* bytes_of(const Tensor& t) { return static_cast<std::byte*>(t.raw()); }

// Every rank's header (and all_to_all_v's counts), downloaded: slot r at at + r * stride.
struct Gathered {
  const std::byte* at;
  size_t stride;
  const Header& header(int r) const { return *reinterpret_cast<const Header*>(at + size_t(r) * stride); }
  const int32_t* counts(int r) const {
    return reinterpret_cast<const int32_t*>(at + size_t(r) * stride + sizeof(Header));
  }
};

}  // namespace

struct NcclDataPlane::Impl {
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  int device = 0;
  Watchdog* watchdog = nullptr;
  DeviceScratch headers, sizes, drain, gathered;
  std::vector<std::byte> host;  // the gathered headers (or F32 rows), downloaded

  // Waits for the stream (everything queued so far, NCCL's work included) under the watchdog.
  void wait(int rank, const char* what) {
    Watchdog::Scope watch(watchdog, what);
    cuda_check(cudaStreamSynchronize(stream), rank, what);
  }

  // This rank's `mine` (and, when given, its G send counts, copied on the device) goes into its
  // slot of a device buffer, NCCL all-gathers the slots in place, and the result is downloaded.
  Gathered gather(int rank, int G, const Header& mine, const Tensor* counts) {
    const size_t stride = (sizeof(Header) + 4 * size_t(G) + 15) / 16 * 16;
    std::byte* dev = headers.get(stride * size_t(G), stream, rank);
    std::byte* own = dev + size_t(rank) * stride;
    cuda_check(cudaMemcpyAsync(own, &mine, sizeof mine, cudaMemcpyHostToDevice, stream), rank, "header upload");
    if (counts)
      cuda_check(cudaMemcpyAsync(own + sizeof(Header), counts->raw(), 4 * size_t(G), cudaMemcpyDeviceToDevice, stream),
                 rank, "send counts copy");
    else
      cuda_check(cudaMemsetAsync(own + sizeof(Header), 0, 4 * size_t(G), stream), rank, "send counts clear");
    nccl_check(ncclAllGather(own, dev, stride, ncclUint8, comm, stream), comm, rank, "ncclAllGather (headers)");
    host.resize(stride * size_t(G));
    cuda_check(cudaMemcpyAsync(host.data(), dev, host.size(), cudaMemcpyDeviceToHost, stream), rank,
               "header download");
    wait(rank, "NCCL headers");
    return {host.data(), stride};
  }

  // all_gather's and all_reduce_sum's agreement: every rank's verdict on its own arguments, its
  // element count and dtype (of `t`), judged alike on every rank.
  void agree_on_elements(std::string_view call, int rank, int G, const std::optional<std::string>& error,
                         const Tensor& t) {
    const Gathered heads = gather(rank, G, Header{detail::Statement(error, {t.numel(), t.dtype()})}, nullptr);
    std::vector<detail::Statement> said(static_cast<size_t>(G));
    for (int r = 0; r < G; ++r) said[size_t(r)] = heads.header(r).said;
    detail::throw_verdict(call, rank, said, error, false);
  }
};

NcclDataPlane::NcclDataPlane(Communicator& bootstrap, int device, void* stream, Watchdog* watchdog)
    : impl_(std::make_unique<Impl>()), rank_(bootstrap.rank()), size_(bootstrap.size()) {
  impl_->stream = static_cast<cudaStream_t>(stream);
  impl_->device = device;
  impl_->watchdog = watchdog;
  ncclUniqueId id{};
  Bytes mine;
  if (rank_ == 0) {
    nccl_check(ncclGetUniqueId(&id), nullptr, rank_, "ncclGetUniqueId");
    mine.resize(sizeof id);
    std::memcpy(mine.data(), &id, sizeof id);
  }
  const std::vector<Bytes> all = bootstrap.all_gather(mine);
  check(all.size() == size_t(size_) && all[0].size() == sizeof id,
        "NCCL data plane: rank {} did not receive rank 0's NCCL unique id", rank_);
  std::memcpy(&id, all[0].data(), sizeof id);
  cuda_check(cudaSetDevice(device), rank_, fmt::format("cudaSetDevice({})", device));
  Watchdog::Scope watch(watchdog, "ncclCommInitRank");
  nccl_check(ncclCommInitRank(&impl_->comm, size_, id, rank_), nullptr, rank_,
             fmt::format("ncclCommInitRank ({} ranks, CUDA device {})", size_, device));
}

NcclDataPlane::~NcclDataPlane() {
  if (!impl_) return;
  cudaSetDevice(impl_->device);
  cudaStreamSynchronize(impl_->stream);
  for (DeviceScratch* s : {&impl_->headers, &impl_->sizes, &impl_->drain, &impl_->gathered})
    if (s->p) cudaFree(s->p);
  if (impl_->comm) ncclCommDestroy(impl_->comm);
}

void NcclDataPlane::all_to_all_v(const Tensor& send, const Tensor& send_counts, Tensor& recv, Tensor& recv_counts) {
  Impl& m = *impl_;
  const int G = size_;
  cuda_check(cudaSetDevice(m.device), rank_, "cudaSetDevice");
  detail::RowArgs mine;
  const auto error = detail::check_row_buffers(rank_, G, send, send_counts, recv, recv_counts, kImpl, Device::CUDA,
                                               &mine);
  const Header h{detail::Statement(error, {int64_t(mine.row_bytes), mine.dtype}), mine.send_rows, mine.recv_rows};
  const Gathered all = m.gather(rank_, G, h, error ? nullptr : &send_counts);

  // Each rank's own arguments, then its counts, then its room for what the others send it (a rank
  // at fault sends nothing), judged alike on every rank from the gathered headers.
  std::vector<std::optional<std::string>> errors(static_cast<size_t>(G));
  std::vector<detail::RowArgs> args(static_cast<size_t>(G));
  std::vector<detail::Layout> layouts(static_cast<size_t>(G));
  for (int r = 0; r < G; ++r) {
    const Header& hr = all.header(r);
    layouts[size_t(r)] = hr.said.layout();
    if (hr.said.failed) {
      errors[size_t(r)] = r == rank_ ? error : std::string(hr.said.message);  // its own in full
      continue;
    }
    args[size_t(r)].send_rows = hr.send_rows;
    errors[size_t(r)] = detail::check_send_counts(r, {all.counts(r), size_t(G)}, &args[size_t(r)]);
  }
  std::vector<int64_t> from(static_cast<size_t>(G));
  for (int r = 0; r < G; ++r) {
    if (errors[size_t(r)]) continue;
    for (int g = 0; g < G; ++g) from[size_t(g)] = errors[size_t(g)] ? 0 : args[size_t(g)].send_counts[size_t(r)];
    errors[size_t(r)] = detail::check_recv_room(r, from, all.header(r).recv_rows);
  }
  detail::throw_verdict("all_to_all_v", rank_, errors, layouts, true);

  const size_t rb = mine.row_bytes;
  std::vector<int64_t> in(static_cast<size_t>(G));
  int64_t total_in = 0;
  for (int g = 0; g < G; ++g) total_in += in[size_t(g)] = args[size_t(g)].send_counts[size_t(rank_)];
  std::byte* src = bytes_of(send);
  std::byte* dst = bytes_of(recv);
  std::vector<int64_t> out_at(static_cast<size_t>(G)), in_at(static_cast<size_t>(G));
  for (int64_t g = 0, o = 0, i = 0; g < G; ++g) {
    out_at[size_t(g)] = o;
    in_at[size_t(g)] = i;
    o += args[size_t(rank_)].send_counts[size_t(g)];
    i += in[size_t(g)];
  }
  nccl_check(ncclGroupStart(), m.comm, rank_, "ncclGroupStart");
  for (int g = 0; g < G; ++g) {
    if (g == rank_) continue;
    if (const int64_t n = args[size_t(rank_)].send_counts[size_t(g)]; n > 0)
      nccl_check(ncclSend(src + size_t(out_at[size_t(g)]) * rb, size_t(n) * rb, ncclUint8, g, m.comm, m.stream),
                 m.comm, rank_, "ncclSend (all_to_all_v rows)");
    if (const int64_t n = in[size_t(g)]; n > 0)
      nccl_check(ncclRecv(dst + size_t(in_at[size_t(g)]) * rb, size_t(n) * rb, ncclUint8, g, m.comm, m.stream),
                 m.comm, rank_, "ncclRecv (all_to_all_v rows)");
  }
  nccl_check(ncclGroupEnd(), m.comm, rank_, "ncclGroupEnd (all_to_all_v rows)");
  if (const int64_t n = in[size_t(rank_)]; n > 0)
    cuda_check(cudaMemcpyAsync(dst + size_t(in_at[size_t(rank_)]) * rb, src + size_t(out_at[size_t(rank_)]) * rb,
                               size_t(n) * rb, cudaMemcpyDeviceToDevice, m.stream),
               rank_, "all_to_all_v rows to itself");
  // recv_counts: column `rank` of the gathered counts, copied on the device.
  const std::byte* column = static_cast<const std::byte*>(m.headers.p) + sizeof(Header) + 4 * size_t(rank_);
  cuda_check(cudaMemcpy2DAsync(recv_counts.raw(), 4, column, all.stride, 4, size_t(G), cudaMemcpyDeviceToDevice,
                               m.stream),
             rank_, "recv_counts copy");
  last_received_ = total_in;
}

void NcclDataPlane::all_gather(const Tensor& mine, Tensor& all) {
  Impl& m = *impl_;
  const int G = size_;
  cuda_check(cudaSetDevice(m.device), rank_, "cudaSetDevice");
  m.agree_on_elements("all_gather", rank_, G, detail::check_all_gather(rank_, G, mine, all, kImpl, Device::CUDA),
                      mine);
  if (mine.nbytes() == 0) return;
  // In place when mine is all's own slot (NCCL's in-place form); check_all_gather refused other overlaps.
  nccl_check(ncclAllGather(mine.raw(), all.raw(), mine.nbytes(), ncclUint8, m.comm, m.stream), m.comm, rank_,
             "ncclAllGather");
}

void NcclDataPlane::all_reduce_sum(Tensor& data) {
  Impl& m = *impl_;
  const int G = size_;
  cuda_check(cudaSetDevice(m.device), rank_, "cudaSetDevice");
  m.agree_on_elements("all_reduce_sum", rank_, G, detail::check_all_reduce(rank_, data, kImpl, Device::CUDA), data);
  const size_t n = size_t(data.numel()), bytes = data.nbytes();
  if (n == 0) return;
  if (data.dtype() != DType::F32) {
    const ncclDataType_t t = data.dtype() == DType::I32 ? ncclInt32 : ncclInt64;
    nccl_check(ncclAllReduce(data.raw(), data.raw(), n, t, ncclSum, m.comm, m.stream), m.comm, rank_,
               "ncclAllReduce");
    return;
  }
  // NCCL adds floats in an order of its own: gather, then add in rank order (every rank the same bits).
  std::byte* all = m.gathered.get(bytes * size_t(G), m.stream, rank_);
  nccl_check(ncclAllGather(data.raw(), all, bytes, ncclUint8, m.comm, m.stream), m.comm, rank_,
             "ncclAllGather (all_reduce_sum F32)");
  m.host.resize(bytes * size_t(G));
  cuda_check(cudaMemcpyAsync(m.host.data(), all, m.host.size(), cudaMemcpyDeviceToHost, m.stream), rank_,
             "all_reduce_sum download");
  m.wait(rank_, "all_reduce_sum (F32)");
  for (int r = 1; r < G; ++r) detail::add_into(DType::F32, m.host.data(), m.host.data() + size_t(r) * bytes, n);
  cuda_check(cudaMemcpyAsync(data.raw(), m.host.data(), bytes, cudaMemcpyHostToDevice, m.stream), rank_,
             "all_reduce_sum upload");
  m.wait(rank_, "all_reduce_sum (F32)");  // the upload reads m.host, which the next call reuses
}

void NcclDataPlane::send_recv(std::span<const Transfer> items) {
  Impl& m = *impl_;
  const int G = size_;
  if (auto bad = detail::check_transfers(rank_, G, items, kImpl, Device::CUDA)) fail("{}", *bad);
  cuda_check(cudaSetDevice(m.device), rank_, "cudaSetDevice");
  // Items by peer, in order: the k-th send to a peer is matched with its k-th receive from us.
  std::vector<std::vector<size_t>> sends(static_cast<size_t>(G)), recvs(static_cast<size_t>(G));
  for (size_t i = 0; i < items.size(); ++i)
    (items[i].kind == Transfer::send ? sends : recvs)[size_t(items[i].peer)].push_back(i);

  // 1. Sizes, pair by pair: every peer learns the sizes of what it is sent before receiving it.
  std::vector<int64_t> sizes;  // [sends to peer 0..G-1 | receives from peer 0..G-1], by peer in order
  std::vector<size_t> out_at(static_cast<size_t>(G)), in_at(static_cast<size_t>(G));
  for (int p = 0; p < G; ++p) {
    out_at[size_t(p)] = sizes.size();
    for (size_t i : sends[size_t(p)]) sizes.push_back(int64_t(items[i].buffer.nbytes()));
  }
  const size_t outs = sizes.size();
  for (int p = 0; p < G; ++p) {
    in_at[size_t(p)] = sizes.size();
    sizes.resize(sizes.size() + recvs[size_t(p)].size(), -1);
  }
  if (!sizes.empty()) {
    auto* dev = reinterpret_cast<int64_t*>(m.sizes.get(sizes.size() * 8, m.stream, rank_));
    cuda_check(cudaMemcpyAsync(dev, sizes.data(), outs * 8, cudaMemcpyHostToDevice, m.stream), rank_,
               "send_recv sizes upload");
    nccl_check(ncclGroupStart(), m.comm, rank_, "ncclGroupStart");
    for (int p = 0; p < G; ++p) {
      if (p == rank_) continue;
      if (!sends[size_t(p)].empty())
        nccl_check(ncclSend(dev + out_at[size_t(p)], sends[size_t(p)].size(), ncclInt64, p, m.comm, m.stream),
                   m.comm, rank_, "ncclSend (send_recv sizes)");
      if (!recvs[size_t(p)].empty())
        nccl_check(ncclRecv(dev + in_at[size_t(p)], recvs[size_t(p)].size(), ncclInt64, p, m.comm, m.stream),
                   m.comm, rank_, "ncclRecv (send_recv sizes)");
    }
    nccl_check(ncclGroupEnd(), m.comm, rank_, "ncclGroupEnd (send_recv sizes)");
    cuda_check(cudaMemcpyAsync(sizes.data() + outs, dev + outs, (sizes.size() - outs) * 8, cudaMemcpyDeviceToHost,
                               m.stream),
               rank_, "send_recv sizes download");
    m.wait(rank_, "send_recv (sizes)");
    // To itself: the k-th send is the k-th receive.
    for (size_t k = 0; k < recvs[size_t(rank_)].size() && k < sends[size_t(rank_)].size(); ++k)
      sizes[in_at[size_t(rank_)] + k] = sizes[out_at[size_t(rank_)] + k];
  }

  // 2. The bytes. A receive whose sender sends another size drains into scratch (so the sender
  // completes) and is reported once everything is done.
  std::string mismatch;
  size_t drain_bytes = 0;
  for (int p = 0; p < G; ++p)
    for (size_t k = 0; k < recvs[size_t(p)].size(); ++k) {
      const int64_t sent = sizes[in_at[size_t(p)] + k], want = int64_t(items[recvs[size_t(p)][k]].buffer.nbytes());
      if (sent != want) {
        if (mismatch.empty()) mismatch = detail::transfer_size_mismatch(rank_, want, p, sent);
        drain_bytes = std::max(drain_bytes, size_t(std::max<int64_t>(sent, 0)));
      }
    }
  std::byte* drain = drain_bytes ? m.drain.get(drain_bytes, m.stream, rank_) : nullptr;
  std::vector<size_t> next_send(size_t(G), 0), next_recv(size_t(G), 0);
  nccl_check(ncclGroupStart(), m.comm, rank_, "ncclGroupStart");
  for (const Transfer& t : items) {
    const size_t p = size_t(t.peer);
    if (t.kind == Transfer::send) {
      ++next_send[p];
      if (t.peer != rank_ && t.buffer.nbytes() > 0)
        nccl_check(ncclSend(t.buffer.raw(), t.buffer.nbytes(), ncclUint8, t.peer, m.comm, m.stream), m.comm, rank_,
                   "ncclSend (send_recv)");
      continue;
    }
    const size_t k = next_recv[p]++;
    const int64_t sent = sizes[in_at[p] + k];
    if (t.peer == rank_ || sent <= 0) continue;
    void* into = sent == int64_t(t.buffer.nbytes()) ? t.buffer.raw() : drain;
    nccl_check(ncclRecv(into, size_t(sent), ncclUint8, t.peer, m.comm, m.stream), m.comm, rank_,
               "ncclRecv (send_recv)");
  }
  nccl_check(ncclGroupEnd(), m.comm, rank_, "ncclGroupEnd (send_recv)");
  const auto& self_out = sends[size_t(rank_)];
  const auto& self_in = recvs[size_t(rank_)];
  for (size_t k = 0; k < self_in.size() && k < self_out.size(); ++k) {
    const Tensor& from = items[self_out[k]].buffer;
    const Tensor& into = items[self_in[k]].buffer;
    if (from.nbytes() == into.nbytes() && from.nbytes() > 0)
      cuda_check(cudaMemcpyAsync(into.raw(), from.raw(), from.nbytes(), cudaMemcpyDeviceToDevice, m.stream), rank_,
                 "send_recv to itself");
  }
  m.wait(rank_, "send_recv");
  if (!mismatch.empty()) fail("{}", mismatch);
}

}  // namespace ballast::dist

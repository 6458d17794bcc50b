#include "ballast/runtime/staged_data_plane.h"

#include <numeric>

namespace ballast::runtime {

Tensor StagedDataPlane::host_like(const Tensor& t, size_t i) {
  if (staging_.size() <= i) staging_.resize(i + 1);
  auto& buf = staging_[i];
  if (buf.size() < t.nbytes()) buf.resize(t.nbytes());
  return Tensor::borrow(buf.data(), t.shape(), t.dtype());
}

Tensor StagedDataPlane::to_host(const Tensor& t, size_t i) {
  Tensor h = host_like(t, i);
  be_.download(t, h.raw());
  ++downloads_;
  return h;
}

void StagedDataPlane::all_to_all_v(const Tensor& send, const Tensor& send_counts, Tensor& recv, Tensor& recv_counts) {
  if (inner_.moves(send.device())) {
    inner_.all_to_all_v(send, send_counts, recv, recv_counts);
    last_received_ = inner_.received_rows_at_most();
    return;
  }
  // Only the rows sent (and received) travel through the host, not the buffers' capacity.
  Tensor counts = to_host(send_counts, 0);
  int64_t rows = 0;
  for (int64_t i = 0; i < counts.numel(); ++i) rows += std::max(0, counts.data<int32_t>()[i]);
  Tensor host_send = host_like(send, 1);
  if (rows > 0 && rows <= send.dim(0)) {
    be_.download(send.rows(0, rows), host_send.raw());
    ++downloads_;
  }
  Tensor host_recv = host_like(recv, 2), host_recv_counts = host_like(recv_counts, 3);
  inner_.all_to_all_v(host_send, counts, host_recv, host_recv_counts);
  int64_t got = 0;
  for (int64_t i = 0; i < host_recv_counts.numel(); ++i) got += host_recv_counts.data<int32_t>()[i];
  last_received_ = got;
  Tensor received = recv.rows(0, got);
  be_.upload(host_recv.raw(), received);
  be_.upload(host_recv_counts.raw(), recv_counts);
}

void StagedDataPlane::all_gather(const Tensor& mine, Tensor& all) {
  if (inner_.moves(mine.device())) return inner_.all_gather(mine, all);
  Tensor host_all = host_like(all, 1);
  inner_.all_gather(to_host(mine, 0), host_all);
  be_.upload(host_all.raw(), all);
}

void StagedDataPlane::all_reduce_sum(Tensor& data) {
  if (inner_.moves(data.device())) return inner_.all_reduce_sum(data);
  Tensor host = to_host(data, 0);
  inner_.all_reduce_sum(host);
  be_.upload(host.raw(), data);
}

void StagedDataPlane::send_recv(std::span<const Transfer> items) {
  std::vector<Transfer> staged(items.begin(), items.end());
  for (size_t i = 0; i < staged.size(); ++i) {
    Transfer& t = staged[i];
    if (inner_.moves(t.buffer.device())) continue;
    t.buffer = t.kind == Transfer::send ? to_host(t.buffer, 4 + i) : host_like(t.buffer, 4 + i);
  }
  inner_.send_recv(staged);
  for (size_t i = 0; i < staged.size(); ++i)
    if (items[i].kind == Transfer::recv && staged[i].buffer.raw() != items[i].buffer.raw()) {
      Tensor dst = items[i].buffer;
      be_.upload(staged[i].buffer.raw(), dst);
    }
}

}  // namespace ballast::runtime

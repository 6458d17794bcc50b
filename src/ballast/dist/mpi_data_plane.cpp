#include "ballast/dist/mpi_data_plane.h"

#include <fmt/format.h>

// The C API only: keep Open MPI's and MPICH's deprecated C++ bindings (and their library) out.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "ballast/core/error.h"
#include "ballast/dist/data_plane_checks.h"
#include "ballast/dist/mpi_errors.h"

namespace ballast::dist {

namespace {

using detail::kMpiMaxCount;
using detail::mpi_check;

constexpr std::string_view kMpiPlane = "MPI";
// send_recv's one tag: MPI does not let messages of one (sender, tag, communicator) overtake
// each other, which is the FIFO order per pair the interface promises.
constexpr int kTag = 0;

// Every rank calls this before a collective moves data, with its own verdict on its arguments
// (`error`) and what it passes (`mine`): returns on every rank when all are good and alike,
// throws on every rank otherwise. The common case costs one MPI_Allreduce of five integers.
void agree(MPI_Comm comm, int rank, int size, std::string_view call, const std::optional<std::string>& error,
           detail::Layout mine, bool rows) {
  const auto dtype = int64_t(mine.dtype);
  int64_t v[5] = {error ? 1 : 0, mine.size, -mine.size, dtype, -dtype};
  mpi_check(MPI_Allreduce(MPI_IN_PLACE, v, 5, MPI_INT64_T, MPI_MAX, comm), "MPI_Allreduce", rank,
            fmt::format("{} agreement", call));
  if (v[0] == 0 && v[1] == -v[2] && v[3] == -v[4]) return;

  // Something is wrong somewhere: learn what from every rank, so that all throw alike.
  const detail::Statement s(error, mine);
  std::vector<detail::Statement> all(size);
  mpi_check(MPI_Allgather(&s, sizeof s, MPI_BYTE, all.data(), sizeof s, MPI_BYTE, comm), "MPI_Allgather", rank,
            fmt::format("{} agreement", call));
  detail::throw_verdict(call, rank, all, error, rows);
  fail("{}: the ranks disagree on their arguments", call);  // not reached: the check above names it
}

}  // namespace

struct MpiDataPlane::Impl {
  MPI_Comm comm = MPI_COMM_NULL;
};

MpiDataPlane::MpiDataPlane(Watchdog* watchdog) : impl_(std::make_unique<Impl>()), watchdog_(watchdog) {
  check(detail::mpi_running(), "MpiDataPlane: MPI is not initialised (create an MpiSession first)");
  int world_rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  {
    Watchdog::Scope watch(watchdog_, "MPI_Comm_dup (data plane)");
    mpi_check(MPI_Comm_dup(MPI_COMM_WORLD, &impl_->comm), "MPI_Comm_dup", world_rank, "data plane");
  }
  MPI_Comm_set_errhandler(impl_->comm, MPI_ERRORS_RETURN);
  MPI_Comm_rank(impl_->comm, &rank_);
  MPI_Comm_size(impl_->comm, &size_);
}

MpiDataPlane::~MpiDataPlane() {
  if (impl_ && impl_->comm != MPI_COMM_NULL && detail::mpi_running()) MPI_Comm_free(&impl_->comm);
}

void MpiDataPlane::all_to_all_v(const Tensor& send, const Tensor& send_counts, Tensor& recv, Tensor& recv_counts) {
  Watchdog::Scope watch(watchdog_, "all_to_all_v (data plane)");
  const int G = size_;
  detail::RowArgs a;
  auto error = detail::check_all_to_all_v(rank_, G, send, send_counts, recv, recv_counts, kMpiPlane, &a);
  // Row counts first; a rank with bad arguments sends zeros (it is about to fail with everyone).
  std::vector<int> rows_out(G, 0), rows_in(G, 0);
  if (!error)
    for (int g = 0; g < G; ++g) rows_out[g] = int(a.send_counts[g]);
  mpi_check(MPI_Alltoall(rows_out.data(), 1, MPI_INT, rows_in.data(), 1, MPI_INT, impl_->comm), "MPI_Alltoall",
            rank_, "all_to_all_v counts");
  int64_t total_in = 0;
  for (int n : rows_in) total_in += n;
  if (!error) error = detail::check_recv_room(rank_, std::vector<int64_t>(rows_in.begin(), rows_in.end()), a.recv_rows);
  const int64_t rb = int64_t(a.row_bytes);
  if (!error && (a.rows_out * rb > kMpiMaxCount || total_in * rb > kMpiMaxCount))
    error = fmt::format("all_to_all_v: rank {} sends {} and receives {} bytes, over MPI's limit of {} bytes per call",
                        rank_, a.rows_out * rb, total_in * rb, kMpiMaxCount);
  agree(impl_->comm, rank_, G, "all_to_all_v", error, {rb, a.dtype}, true);

  std::vector<int> send_bytes(G), send_at(G), recv_bytes(G), recv_at(G);
  int64_t out = 0, in = 0;
  for (int g = 0; g < G; ++g) {
    send_bytes[g] = int(rows_out[g] * rb);
    send_at[g] = int(out);
    out += send_bytes[g];
    recv_bytes[g] = int(rows_in[g] * rb);
    recv_at[g] = int(in);
    in += recv_bytes[g];
  }
  mpi_check(MPI_Alltoallv(send.raw(), send_bytes.data(), send_at.data(), MPI_BYTE, recv.raw(), recv_bytes.data(),
                          recv_at.data(), MPI_BYTE, impl_->comm),
            "MPI_Alltoallv", rank_, "all_to_all_v rows");
  std::copy(rows_in.begin(), rows_in.end(), recv_counts.data<int32_t>());
  last_received_ = total_in;
}

void MpiDataPlane::all_gather(const Tensor& mine, Tensor& all) {
  Watchdog::Scope watch(watchdog_, "all_gather (data plane)");
  const int G = size_;
  auto error = detail::check_all_gather(rank_, G, mine, all, kMpiPlane);
  const int64_t bytes = int64_t(mine.nbytes());
  if (!error && bytes * G > kMpiMaxCount)
    error = fmt::format("all_gather: rank {} gathers {} bytes, over MPI's limit of {} bytes per call", rank_,
                        bytes * G, kMpiMaxCount);
  agree(impl_->comm, rank_, G, "all_gather", error, {mine.numel(), mine.dtype()}, false);
  if (bytes == 0) return;
  auto* out = static_cast<std::byte*>(all.raw());
  // MPI_IN_PLACE would have to be used by every rank or none, and MPI buffers may not overlap:
  // a rank whose mine is its own slot of all sends a copy.
  const void* from = mine.raw();
  std::vector<std::byte> copy;
  if (from == out + rank_ * bytes) {
    copy.assign(out + rank_ * bytes, out + (rank_ + 1) * bytes);
    from = copy.data();
  }
  mpi_check(MPI_Allgather(from, int(bytes), MPI_BYTE, out, int(bytes), MPI_BYTE, impl_->comm), "MPI_Allgather", rank_,
            "all_gather");
}

void MpiDataPlane::all_reduce_sum(Tensor& data) {
  Watchdog::Scope watch(watchdog_, "all_reduce_sum (data plane)");
  const int G = size_;
  auto error = detail::check_all_reduce(rank_, data, kMpiPlane);
  const int64_t n = data.numel(), bytes = int64_t(data.nbytes());
  // F32 goes through an all-gather (G times the data), integers through MPI_Allreduce.
  const int64_t moved = data.dtype() == DType::F32 ? bytes * G : n;
  if (!error && moved > kMpiMaxCount)
    error = fmt::format("all_reduce_sum: rank {}'s {} {} is over MPI's limit of {} per call", rank_,
                        dtype_name(data.dtype()), data, kMpiMaxCount);
  agree(impl_->comm, rank_, G, "all_reduce_sum", error, {n, data.dtype()}, false);
  if (n == 0) return;
  if (data.dtype() != DType::F32) {
    const MPI_Datatype t = data.dtype() == DType::I32 ? MPI_INT32_T : MPI_INT64_T;
    mpi_check(MPI_Allreduce(MPI_IN_PLACE, data.raw(), int(n), t, MPI_SUM, impl_->comm), "MPI_Allreduce", rank_,
              "all_reduce_sum");
    return;
  }
  // MPI may add floats in any order, and differently on each rank: gather, then add in rank order.
  std::vector<std::byte> all(size_t(bytes) * G);
  mpi_check(MPI_Allgather(data.raw(), int(bytes), MPI_BYTE, all.data(), int(bytes), MPI_BYTE, impl_->comm),
            "MPI_Allgather", rank_, "all_reduce_sum(F32)");
  std::memcpy(data.raw(), all.data(), size_t(bytes));
  for (int r = 1; r < G; ++r) detail::add_into(DType::F32, data.raw(), all.data() + size_t(r) * bytes, size_t(n));
}

void MpiDataPlane::send_recv(std::span<const Transfer> items) {
  Watchdog::Scope watch(watchdog_, "send_recv (data plane)");
  const int G = size_;
  if (auto bad = detail::check_transfers(rank_, G, items, kMpiPlane)) fail("{}", *bad);
  auto describe = [&](size_t i) {
    const Transfer& t = items[i];
    return t.kind == Transfer::send ? fmt::format("send of {} bytes to rank {}", t.buffer.nbytes(), t.peer)
                                    : fmt::format("receive of {} bytes from rank {}", t.buffer.nbytes(), t.peer);
  };
  for (size_t i = 0; i < items.size(); ++i)
    check(int64_t(items[i].buffer.nbytes()) <= kMpiMaxCount, "send_recv: rank {}'s {} is over MPI's limit of {} bytes",
          rank_, describe(i), kMpiMaxCount);

  const size_t n = items.size();
  std::vector<MPI_Request> reqs(n, MPI_REQUEST_NULL);
  std::vector<std::vector<size_t>> wanted(G);  // receive items by peer, in order
  size_t left = 0;
  // Every send is posted before any receive waits, so no order of items can deadlock.
  for (size_t i = 0; i < n; ++i) {
    const Transfer& t = items[i];
    if (t.kind == Transfer::recv) {
      wanted[t.peer].push_back(i);
      ++left;
      continue;
    }
    mpi_check(MPI_Isend(t.buffer.raw(), int(t.buffer.nbytes()), MPI_BYTE, t.peer, kTag, impl_->comm, &reqs[i]),
              "MPI_Isend", rank_, describe(i));
  }
  // Each receive matches its peer's next message (MPI_Improbe, in arrival order across peers, so
  // that a slow peer holds up only its own) and checks its size before receiving it: a message
  // of the wrong size is drained into scratch space and reported after everything completes, so
  // the sender is never left waiting and MPI never truncates (Open MPI 4.1 sometimes hangs in
  // MPI_Waitall on a truncated receive).
  std::vector<size_t> next(G, 0);
  std::string mismatch;
  std::deque<std::vector<std::byte>> scratch;
  auto take = [&](int peer, MPI_Message& msg, MPI_Status& st) {
    const size_t i = wanted[peer][next[peer]++];
    --left;
    int count = 0;
    mpi_check(MPI_Get_count(&st, MPI_BYTE, &count), "MPI_Get_count", rank_, describe(i));
    void* into = items[i].buffer.raw();
    if (size_t(count) != items[i].buffer.nbytes()) {
      if (mismatch.empty())
        mismatch = detail::transfer_size_mismatch(rank_, int64_t(items[i].buffer.nbytes()), peer, count);
      into = scratch.emplace_back(size_t(count)).data();
    }
    mpi_check(MPI_Imrecv(into, count, MPI_BYTE, &msg, &reqs[i]), "MPI_Imrecv", rank_, describe(i));
  };
  while (left > 0) {
    int pending = 0, only = -1;
    for (int q = 0; q < G; ++q) {
      if (next[q] < wanted[q].size()) {
        ++pending;
        only = q;
      }
    }
    MPI_Message msg = MPI_MESSAGE_NULL;
    MPI_Status st;
    if (pending == 1) {  // one peer left: wait for it without spinning
      mpi_check(MPI_Mprobe(only, kTag, impl_->comm, &msg, &st), "MPI_Mprobe", rank_, describe(wanted[only][next[only]]));
      take(only, msg, st);
      continue;
    }
    bool progress = false;
    for (int q = 0; q < G; ++q) {
      while (next[q] < wanted[q].size()) {
        int found = 0;
        mpi_check(MPI_Improbe(q, kTag, impl_->comm, &found, &msg, &st), "MPI_Improbe", rank_,
                  describe(wanted[q][next[q]]));
        if (!found) break;
        take(q, msg, st);
        progress = true;
      }
    }
    if (!progress) std::this_thread::yield();
  }
  std::vector<MPI_Status> statuses(n);
  const int rc = MPI_Waitall(int(n), reqs.data(), statuses.data());
  if (rc == MPI_ERR_IN_STATUS) {
    for (size_t i = 0; i < n; ++i) {
      const int e = statuses[i].MPI_ERROR;
      if (e != MPI_SUCCESS && e != MPI_ERR_PENDING)
        fail("MPI_Waitall failed on rank {} ({}): {}", rank_, describe(i), detail::mpi_error_string(e));
    }
  }
  mpi_check(rc, "MPI_Waitall", rank_, "send_recv");
  if (!mismatch.empty()) fail("{}", mismatch);
}

}  // namespace ballast::dist

#include "ballast/dist/mpi_communicator.h"

#include <fmt/format.h>

// The C API only: keep Open MPI's and MPICH's deprecated C++ bindings (and their library) out.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include <climits>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>

#include "ballast/core/error.h"

namespace ballast::dist {

namespace {

std::string mpi_error_string(int rc) {
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(rc, buf, &len) != MPI_SUCCESS) return fmt::format("MPI error {}", rc);
  return std::string(buf, static_cast<size_t>(len));
}

// Throws Error naming the call (and what it was for) when rc is not MPI_SUCCESS.
void mpi_check(int rc, std::string_view call, int rank, std::string_view what = {}) {
  if (rc == MPI_SUCCESS) return;
  if (what.empty()) fail("{} failed on rank {}: {}", call, rank, mpi_error_string(rc));
  fail("{} failed on rank {} ({}): {}", call, rank, what, mpi_error_string(rc));
}

bool finalized() {
  int done = 0;
  MPI_Finalized(&done);
  return done != 0;
}

constexpr int64_t kMaxCount = INT_MAX;

// The per-rank pieces of a flat buffer laid out by counts and displacements.
std::vector<Bytes> split_flat(const Bytes& flat, const std::vector<int>& counts, const std::vector<int>& displs) {
  std::vector<Bytes> out(counts.size());
  for (size_t r = 0; r < counts.size(); ++r) {
    auto first = flat.begin() + displs[r];
    out[r].assign(first, first + counts[r]);
  }
  return out;
}

}  // namespace

bool mpi_launched() {
  // Open MPI's mpirun, MPICH/Hydra and Intel MPI (PMI), PMIx launchers (srun --mpi=pmix, prterun),
  // MVAPICH.
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK",
                          "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS"}) {
    if (std::getenv(var) != nullptr) return true;
  }
  return false;
}

MpiSession::MpiSession(int* argc, char*** argv) {
  int inited = 0;
  MPI_Initialized(&inited);
  check(!finalized(), "MpiSession: MPI was already finalised in this process");
  if (!inited) {
    int provided = 0;
    const int rc = MPI_Init_thread(argc, argv, MPI_THREAD_SERIALIZED, &provided);
    check(rc == MPI_SUCCESS, "MPI_Init_thread failed: {}", mpi_error_string(rc));
    owns_ = true;
    if (provided < MPI_THREAD_FUNNELED) {
      MPI_Finalize();
      fail("MPI_Init_thread: the MPI library provides thread level {}, ballast needs at least "
           "MPI_THREAD_FUNNELED",
           provided);
    }
    thread_level_ = provided;
  } else {
    MPI_Query_thread(&thread_level_);
  }
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &size_);
}

MpiSession::~MpiSession() {
  if (owns_ && !finalized()) MPI_Finalize();
}

void MpiSession::abort(int code) {
  MPI_Abort(MPI_COMM_WORLD, code);
  std::abort();  // MPI_Abort does not return; if MPI is not running, neither do we
}

struct MpiCommunicator::Impl {
  MPI_Comm comm = MPI_COMM_NULL;
  int tag_ub = 32767;
};

MpiCommunicator::MpiCommunicator() : impl_(std::make_unique<Impl>()) {
  int inited = 0;
  MPI_Initialized(&inited);
  check(inited && !finalized(), "MpiCommunicator: MPI is not initialised (create an MpiSession first)");
  int world_rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  mpi_check(MPI_Comm_dup(MPI_COMM_WORLD, &impl_->comm), "MPI_Comm_dup", world_rank);
  MPI_Comm_set_errhandler(impl_->comm, MPI_ERRORS_RETURN);
  MPI_Comm_rank(impl_->comm, &rank_);
  MPI_Comm_size(impl_->comm, &size_);
  int* ub = nullptr;
  int flag = 0;
  MPI_Comm_get_attr(MPI_COMM_WORLD, MPI_TAG_UB, &ub, &flag);
  if (flag && ub) impl_->tag_ub = *ub;
}

MpiCommunicator::~MpiCommunicator() {
  if (impl_ && impl_->comm != MPI_COMM_NULL && !finalized()) MPI_Comm_free(&impl_->comm);
}

void MpiCommunicator::barrier() { mpi_check(MPI_Barrier(impl_->comm), "MPI_Barrier", rank_); }

void MpiCommunicator::all_reduce_sum(std::span<int64_t> data) {
  check(static_cast<int64_t>(data.size()) <= kMaxCount,
        "all_reduce_sum: {} elements, over MPI's limit of {}", data.size(), kMaxCount);
  mpi_check(MPI_Allreduce(MPI_IN_PLACE, data.data(), static_cast<int>(data.size()), MPI_INT64_T,
                          MPI_SUM, impl_->comm),
            "MPI_Allreduce", rank_, "int64 sum");
}

void MpiCommunicator::all_reduce_sum(std::span<double> data) {
  check(static_cast<int64_t>(data.size()) <= kMaxCount,
        "all_reduce_sum: {} elements, over MPI's limit of {}", data.size(), kMaxCount);
  mpi_check(MPI_Allreduce(MPI_IN_PLACE, data.data(), static_cast<int>(data.size()), MPI_DOUBLE,
                          MPI_SUM, impl_->comm),
            "MPI_Allreduce", rank_, "double sum");
}

bool MpiCommunicator::all_reduce_or(bool flag) {
  int v = flag ? 1 : 0;
  mpi_check(MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_INT, MPI_LOR, impl_->comm), "MPI_Allreduce",
            rank_, "or");
  return v != 0;
}

std::vector<Bytes> MpiCommunicator::all_to_all(const std::vector<Bytes>& send) {
  const int G = size_;
  check(static_cast<int>(send.size()) == G, "all_to_all: rank {} passed {} send buffers for {} ranks",
        rank_, send.size(), G);
  // Every rank learns the whole G x G size matrix (not just its column), so that all of them
  // reach the same verdict on MPI's int limits and fail together instead of some hanging.
  std::vector<int64_t> row(G), matrix(static_cast<size_t>(G) * G);
  for (int r = 0; r < G; ++r) row[r] = static_cast<int64_t>(send[r].size());
  mpi_check(MPI_Allgather(row.data(), G, MPI_INT64_T, matrix.data(), G, MPI_INT64_T, impl_->comm),
            "MPI_Allgather", rank_, "all_to_all sizes");
  auto at = [&](int src, int dst) { return matrix[static_cast<size_t>(src) * G + dst]; };
  for (int r = 0; r < G; ++r) {
    int64_t out = 0, in = 0;
    for (int q = 0; q < G; ++q) {
      out += at(r, q);
      in += at(q, r);
    }
    check(out <= kMaxCount && in <= kMaxCount,
          "all_to_all: rank {} sends {} and receives {} bytes in total, over MPI's limit of {}", r,
          out, in, kMaxCount);
  }
  std::vector<int> send_counts(G), send_displs(G), recv_counts(G), recv_displs(G);
  int send_total = 0, recv_total = 0;
  for (int r = 0; r < G; ++r) {
    send_counts[r] = static_cast<int>(at(rank_, r));
    send_displs[r] = send_total;
    send_total += send_counts[r];
    recv_counts[r] = static_cast<int>(at(r, rank_));
    recv_displs[r] = recv_total;
    recv_total += recv_counts[r];
  }
  Bytes packed(static_cast<size_t>(send_total)), unpacked(static_cast<size_t>(recv_total));
  for (int r = 0; r < G; ++r)
    if (!send[r].empty()) std::memcpy(packed.data() + send_displs[r], send[r].data(), send[r].size());
  mpi_check(MPI_Alltoallv(packed.data(), send_counts.data(), send_displs.data(), MPI_BYTE,
                          unpacked.data(), recv_counts.data(), recv_displs.data(), MPI_BYTE,
                          impl_->comm),
            "MPI_Alltoallv", rank_);
  return split_flat(unpacked, recv_counts, recv_displs);
}

std::vector<Bytes> MpiCommunicator::all_gather(const Bytes& mine) {
  const int G = size_;
  int64_t n = static_cast<int64_t>(mine.size());
  std::vector<int64_t> sizes(G);
  mpi_check(MPI_Allgather(&n, 1, MPI_INT64_T, sizes.data(), 1, MPI_INT64_T, impl_->comm),
            "MPI_Allgather", rank_, "all_gather sizes");
  int64_t total = 0;
  for (auto s : sizes) total += s;
  check(total <= kMaxCount, "all_gather: {} bytes in total from {} ranks, over MPI's limit of {}",
        total, G, kMaxCount);
  std::vector<int> counts(G), displs(G);
  int at = 0;
  for (int r = 0; r < G; ++r) {
    counts[r] = static_cast<int>(sizes[r]);
    displs[r] = at;
    at += counts[r];
  }
  Bytes flat(static_cast<size_t>(total));
  mpi_check(MPI_Allgatherv(mine.data(), static_cast<int>(n), MPI_BYTE, flat.data(), counts.data(),
                           displs.data(), MPI_BYTE, impl_->comm),
            "MPI_Allgatherv", rank_);
  return split_flat(flat, counts, displs);
}

void MpiCommunicator::exchange(std::span<const SendItem> sends, std::span<const RecvItem> recvs) {
  auto validate = [&](int peer, int tag, size_t bytes, const char* dir) {
    check(peer >= 0 && peer < size_, "exchange: rank {} {} rank {} of {}", rank_, dir, peer, size_);
    check(tag >= 0 && tag <= impl_->tag_ub, "exchange: rank {} {} rank {} with tag {}, outside [0, {}]",
          rank_, dir, peer, tag, impl_->tag_ub);
    check(static_cast<int64_t>(bytes) <= kMaxCount,
          "exchange: rank {} {} rank {} {} bytes (tag {}), over MPI's limit of {}", rank_, dir, peer,
          bytes, tag, kMaxCount);
  };
  for (auto& it : sends) validate(it.peer, it.tag, it.data.size(), "sends to");
  for (auto& it : recvs) validate(it.peer, it.tag, it.data.size(), "receives from");

  const size_t n = recvs.size() + sends.size();
  std::vector<MPI_Request> reqs(n, MPI_REQUEST_NULL);
  std::vector<MPI_Status> statuses(n);
  auto describe = [&](size_t i) {
    if (i < recvs.size())
      return fmt::format("receive of {} bytes from rank {} tag {}", recvs[i].data.size(),
                         recvs[i].peer, recvs[i].tag);
    auto& s = sends[i - recvs.size()];
    return fmt::format("send of {} bytes to rank {} tag {}", s.data.size(), s.peer, s.tag);
  };
  // Every send is posted before any receive waits, so no order of transfers can deadlock. Each
  // receive then matches its message with MPI_Mprobe, in list order (same (peer, tag) pairs
  // match in the order sent: MPI messages do not overtake each other), and checks its size
  // before receiving it: a message of the wrong size is drained into scratch space and reported
  // after everything completes, so the sender is never left waiting and MPI never truncates
  // (Open MPI 4.1 sometimes hangs in MPI_Waitall on a truncated receive).
  for (size_t j = 0; j < sends.size(); ++j) {
    auto& s = sends[j];
    const size_t i = recvs.size() + j;
    // MPI takes a non-const buffer in old headers; it is only read.
    mpi_check(MPI_Isend(const_cast<std::byte*>(s.data.data()), static_cast<int>(s.data.size()),
                        MPI_BYTE, s.peer, s.tag, impl_->comm, &reqs[i]),
              "MPI_Isend", rank_, describe(i));
  }
  std::string mismatch;
  std::vector<Bytes> scratch;
  scratch.reserve(recvs.size());
  for (size_t i = 0; i < recvs.size(); ++i) {
    auto& r = recvs[i];
    MPI_Message msg = MPI_MESSAGE_NULL;
    MPI_Status st;
    mpi_check(MPI_Mprobe(r.peer, r.tag, impl_->comm, &msg, &st), "MPI_Mprobe", rank_, describe(i));
    int count = 0;
    mpi_check(MPI_Get_count(&st, MPI_BYTE, &count), "MPI_Get_count", rank_, describe(i));
    void* into = r.data.data();
    if (static_cast<size_t>(count) != r.data.size()) {
      if (mismatch.empty())
        mismatch = fmt::format("exchange: rank {} expected {} bytes from rank {} tag {}, the sender sent {}",
                               rank_, r.data.size(), r.peer, r.tag, count);
      into = scratch.emplace_back(static_cast<size_t>(count)).data();
    }
    mpi_check(MPI_Imrecv(into, count, MPI_BYTE, &msg, &reqs[i]), "MPI_Imrecv", rank_, describe(i));
  }
  const int rc = MPI_Waitall(static_cast<int>(n), reqs.data(), statuses.data());
  if (rc == MPI_ERR_IN_STATUS) {
    for (size_t i = 0; i < n; ++i) {
      const int e = statuses[i].MPI_ERROR;
      if (e != MPI_SUCCESS && e != MPI_ERR_PENDING)
        fail("MPI_Waitall failed on rank {} ({}): {}", rank_, describe(i), mpi_error_string(e));
    }
  }
  mpi_check(rc, "MPI_Waitall", rank_, "exchange");
  if (!mismatch.empty()) fail("{}", mismatch);
}

}  // namespace ballast::dist

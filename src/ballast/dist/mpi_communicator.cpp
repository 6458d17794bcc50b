#include "ballast/dist/mpi_communicator.h"

#include <fmt/format.h>

// The C API only: keep Open MPI's and MPICH's deprecated C++ bindings (and their library) out.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>

#include "ballast/core/error.h"
#include "ballast/dist/mpi_errors.h"

namespace ballast::dist {

namespace {

using detail::mpi_check;
using detail::mpi_error_string;

bool finalized() {
  int done = 0;
  MPI_Finalized(&done);
  return done != 0;
}

constexpr int64_t kMaxCount = detail::kMpiMaxCount;

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
};

MpiCommunicator::MpiCommunicator(Watchdog* watchdog) : impl_(std::make_unique<Impl>()), watchdog_(watchdog) {
  int inited = 0;
  MPI_Initialized(&inited);
  check(inited && !finalized(), "MpiCommunicator: MPI is not initialised (create an MpiSession first)");
  int world_rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  {
    Watchdog::Scope watch(watchdog_, "MPI_Comm_dup");
    mpi_check(MPI_Comm_dup(MPI_COMM_WORLD, &impl_->comm), "MPI_Comm_dup", world_rank);
  }
  MPI_Comm_set_errhandler(impl_->comm, MPI_ERRORS_RETURN);
  MPI_Comm_rank(impl_->comm, &rank_);
  MPI_Comm_size(impl_->comm, &size_);
  MPI_Comm host = MPI_COMM_NULL;
  {
    Watchdog::Scope watch(watchdog_, "MPI_Comm_split_type");
    mpi_check(MPI_Comm_split_type(impl_->comm, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &host),
              "MPI_Comm_split_type", rank_);
  }
  MPI_Comm_rank(host, &local_rank_);
  MPI_Comm_size(host, &local_size_);
  MPI_Comm_free(&host);
}

MpiCommunicator::~MpiCommunicator() {
  if (impl_ && impl_->comm != MPI_COMM_NULL && !finalized()) MPI_Comm_free(&impl_->comm);
}

void MpiCommunicator::barrier() {
  Watchdog::Scope watch(watchdog_, "MPI_Barrier");
  mpi_check(MPI_Barrier(impl_->comm), "MPI_Barrier", rank_);
}

void MpiCommunicator::all_reduce_sum(std::span<int64_t> data) {
  Watchdog::Scope watch(watchdog_, "MPI_Allreduce (int64 sum)");
  check(static_cast<int64_t>(data.size()) <= kMaxCount,
        "all_reduce_sum: {} elements, over MPI's limit of {}", data.size(), kMaxCount);
  mpi_check(MPI_Allreduce(MPI_IN_PLACE, data.data(), static_cast<int>(data.size()), MPI_INT64_T,
                          MPI_SUM, impl_->comm),
            "MPI_Allreduce", rank_, "int64 sum");
}

void MpiCommunicator::all_reduce_sum(std::span<double> data) {
  Watchdog::Scope watch(watchdog_, "MPI_Allreduce (double sum)");
  check(static_cast<int64_t>(data.size()) <= kMaxCount,
        "all_reduce_sum: {} elements, over MPI's limit of {}", data.size(), kMaxCount);
  mpi_check(MPI_Allreduce(MPI_IN_PLACE, data.data(), static_cast<int>(data.size()), MPI_DOUBLE,
                          MPI_SUM, impl_->comm),
            "MPI_Allreduce", rank_, "double sum");
}

bool MpiCommunicator::all_reduce_or(bool flag) {
  Watchdog::Scope watch(watchdog_, "MPI_Allreduce (or)");
  int v = flag ? 1 : 0;
  mpi_check(MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_INT, MPI_LOR, impl_->comm), "MPI_Allreduce",
            rank_, "or");
  return v != 0;
}

std::vector<Bytes> MpiCommunicator::all_gather(const Bytes& mine) {
  Watchdog::Scope watch(watchdog_, "MPI_Allgather");
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

}  // namespace ballast::dist

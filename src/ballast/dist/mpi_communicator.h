#pragma once
// Ranks as MPI processes (`mpirun -np G ballast ...`), over the MPI C API. mpi.h stays out of
// this header: nothing above the Communicator interface needs to know MPI is there.
//
//   int main(int argc, char** argv) {
//     std::optional<MpiSession> mpi;
//     if (mpi_launched()) mpi.emplace(&argc, &argv);
//     ...  MpiCommunicator comm; MpiDataPlane data;  (mpi_data_plane.h; all destroyed before `mpi`)
//   }
#include <memory>

#include "ballast/dist/communicator.h"
#include "ballast/dist/watchdog.h"

namespace ballast::dist {

// Whether this process was started by an MPI launcher (mpirun/mpiexec of Open MPI or MPICH,
// srun with PMI/PMIx), judged from the environment the launcher sets; MPI itself is not touched.
bool mpi_launched();

// MPI_Init_thread on construction, MPI_Finalize on destruction; one per process, owned by main.
// Asks for MPI_THREAD_SERIALIZED (any one thread at a time may call MPI) and fails if the library
// gives less than MPI_THREAD_FUNNELED. If MPI was already initialised, it neither initialises nor
// finalises. Errors on MPI_COMM_WORLD are made to return (and become ballast::Error) rather than
// abort the job.
class MpiSession {
 public:
  MpiSession(int* argc = nullptr, char*** argv = nullptr);
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  // The thread level MPI provided (MPI_THREAD_* value).
  int thread_level() const { return thread_level_; }

  // Ends every rank of the job (MPI_Abort): for a rank that failed while others may be waiting
  // for it in a collective.
  [[noreturn]] static void abort(int code);

 private:
  bool owns_ = false;
  int rank_ = 0, size_ = 1, thread_level_ = 0;
};

class MpiCommunicator final : public Communicator {
 public:
  // A duplicate of MPI_COMM_WORLD (its own message space), errors returned not fatal. Collective
  // over the world; MPI must be initialised (an MpiSession alive) and outlive this. With a
  // watchdog (which must outlive this), every call runs inside its Scope.
  explicit MpiCommunicator(Watchdog* watchdog = nullptr);
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  // This rank among the ranks on its host (MPI_COMM_TYPE_SHARED, in world-rank order), and how
  // many those are: what picks a rank's GPU (local_gpu.h).
  int local_rank() const { return local_rank_; }
  int local_size() const { return local_size_; }
  Watchdog* watchdog() const { return watchdog_; }  // the one given (may be null)

  void barrier() override;
  void all_reduce_sum(std::span<int64_t> data) override;
  void all_reduce_sum(std::span<double> data) override;
  bool all_reduce_or(bool flag) override;
  // The total gathered must be under 2 GiB (MPI int counts).
  std::vector<Bytes> all_gather(const Bytes& mine) override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  Watchdog* watchdog_;
  int rank_ = 0, size_ = 1;
  int local_rank_ = 0, local_size_ = 1;
};

}  // namespace ballast::dist

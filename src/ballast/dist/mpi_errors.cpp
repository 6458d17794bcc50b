#include "ballast/dist/mpi_errors.h"

#include <fmt/format.h>

// The C API only: keep Open MPI's and MPICH's deprecated C++ bindings (and their library) out.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include "ballast/core/error.h"

namespace ballast::dist::detail {

std::string mpi_error_string(int rc) {
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(rc, buf, &len) != MPI_SUCCESS) return fmt::format("MPI error {}", rc);
  return std::string(buf, static_cast<size_t>(len));
}

void mpi_check(int rc, std::string_view call, int rank, std::string_view what) {
  if (rc == MPI_SUCCESS) return;
  if (what.empty()) fail("{} failed on rank {}: {}", call, rank, mpi_error_string(rc));
  fail("{} failed on rank {} ({}): {}", call, rank, what, mpi_error_string(rc));
}

bool mpi_running() {
  int inited = 0, done = 0;
  MPI_Initialized(&inited);
  MPI_Finalized(&done);
  return inited && !done;
}

}  // namespace ballast::dist::detail

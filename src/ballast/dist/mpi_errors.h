#pragma once
// MPI return codes as ballast::Error, for the MPI implementations in dist/ (internal; mpi.h stays
// out of this header too).
#include <cstdint>
#include <string>
#include <string_view>

namespace ballast::dist::detail {

// MPI's int counts: a buffer of more bytes cannot be passed as MPI_BYTE.
constexpr int64_t kMpiMaxCount = 2147483647;

std::string mpi_error_string(int rc);
// Throws Error naming the call (and what it was for) when rc is not MPI_SUCCESS.
void mpi_check(int rc, std::string_view call, int rank, std::string_view what = {});
// MPI_Initialized and not yet MPI_Finalized.
bool mpi_running();

}  // namespace ballast::dist::detail

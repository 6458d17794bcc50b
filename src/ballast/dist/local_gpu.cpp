#include "ballast/dist/local_gpu.h"

#include "ballast/core/error.h"

namespace ballast::dist {

int local_gpu(int local_rank, int local_size, int devices) {
  check(local_size >= 1 && local_rank >= 0 && local_rank < local_size, "local rank {} of {}: not a rank of its host",
        local_rank, local_size);
  check(devices >= local_size,
        "{} ranks run on this host but it has {} GPU{}: one GPU a rank (start at most {} rank{} a host, e.g. "
        "mpirun -np {} on one host)",
        local_size, devices, devices == 1 ? "" : "s", devices, devices == 1 ? "" : "s", devices);
  return local_rank;
}

}  // namespace ballast::dist

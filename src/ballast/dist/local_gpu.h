#pragma once
// Which GPU a rank takes: one GPU a process, the processes of one host in their local-rank order
// (mpirun -np N on a host of N GPUs: rank r takes GPU r; across hosts, each host's ranks from 0).

namespace ballast::dist {

// The GPU of the process with `local_rank` among `local_size` processes of its host, which has
// `devices` GPUs. Throws ballast::Error naming the counts when the host has fewer GPUs than
// processes (two processes on one GPU would split its memory and serialise its kernels).
int local_gpu(int local_rank, int local_size, int devices);

}  // namespace ballast::dist

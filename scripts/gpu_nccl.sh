#!/usr/bin/env bash
# gpu_check.sh's nccl step (on the GPU machine): the NCCL data plane's conformance (one rank a
# visible GPU), its latency and bandwidth (bench_dist nccl), the engine's expert parallelism over
# it, and, where mpirun exists, `ballast generate` as one MPI rank (its rows over NCCL) against
# the same command without MPI.
#   bash scripts/gpu_nccl.sh BIN_DIR
set -uo pipefail
BIN=$1
nvidia-smi -L
"$BIN/test_dist_nccl" --gtest_brief=1 || exit 1
BALLAST_TEST_DEVICE=cuda "$BIN/test_runtime" --gtest_brief=1 --gtest_filter='*OverNccl*' || exit 1
# Latency and bandwidth of the plane, one rank a visible GPU (at one rank: the cost of a collective's
# header round trip, no bytes between GPUs).
"$BIN/bench_dist" nccl || exit 1
if ! command -v mpirun >/dev/null; then
  echo "no mpirun on this machine: the MPI-launched run is left out"
  exit 0
fi
ARGS=(generate --device cuda --model tests/fixtures/qwen3_next_a --prompt-ids 1,2,3 --max-new-tokens 12 --json)
"$BIN/ballast" "${ARGS[@]}" > /tmp/one.json || exit 1
mpirun --allow-run-as-root -np 1 "$BIN/ballast" "${ARGS[@]}" > /tmp/mpi.json || exit 1
one=$(grep -o '"output_ids":\[[^]]*' /tmp/one.json) mpi=$(grep -o '"output_ids":\[[^]]*' /tmp/mpi.json)
echo "one GPU:          $one"
echo "mpirun -np 1:     $mpi"
[ -n "$one" ] && [ "$one" = "$mpi" ] && echo "equal"

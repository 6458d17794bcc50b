# Sourced by the GPU machine's scripts (gpu_check.sh, gpu_ab.sh, gpu_multi.sh), from the repository
# root: unpacks what scripts/gpu_pack.sh built (always: a warm machine keeps an older unpacked
# build beside a newly carried pack) and sets BIN and the library
# path: the pack's own libraries, then cuBLAS 13 and NCCL (libnccl.so.2) from the CUDA toolkit, or
# from wherever else the machine has them (the Python wheels beside torch). CUBLAS and NCCL name
# the folders found.
tar -C .carry -xJf .carry/gpu.tar.xz
BIN=$PWD/.carry/gpu/bin
lib_dir() { dirname "$( (ls "/usr/local/cuda/lib64/$1" 2>/dev/null; find / -name "$1" 2>/dev/null) | head -1)"; }
CUBLAS=$(lib_dir libcublas.so.13)
NCCL=$(lib_dir libnccl.so.2)
export LD_LIBRARY_PATH=$PWD/.carry/gpu/lib:$CUBLAS:$NCCL:${LD_LIBRARY_PATH:-}

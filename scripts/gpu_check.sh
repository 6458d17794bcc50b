#!/usr/bin/env bash
# On the GPU machine (device tool, repository root, .carry/gpu.tar.xz carried): unpacks what
# scripts/gpu_pack.sh built, then runs the CUDA checks and figures, writing logs and
# summary.json under $OUT. Each step runs even when an earlier one fails; the summary says which.
# STEP_TIMEOUT (seconds, default none) cuts each step there, so that one slow step leaves the call's
# time to the steps after it (the device tool runs a command at most 600 s).
# The device tool brings back at most 8 files from $OUT (a log a step, the summary, the JSON and CSV
# of some steps): run at most ~5 steps a call, or point OUT elsewhere and print what matters.
# The device tool takes 64 MiB in all: the tracked tree is ~50 MB (the default model 36 MB) and a
# pack of everything ~10.8 MB (xz -9e, sm_90a code without PTX: two ballasts, the one-GPU tests, the
# delta-rule bench before and after; scripts/gpu_pack.sh), so .carry/fla (~1.5 MB, pruned to what
# chunk_gated_delta_rule imports) fits beside it.
#   STEPS="conformance nccl runtime demo serve sanitizer bench scale fp8 pdl ep ep-mtp kernels kernel-ab prices prefill-kernels prefill-source decode-kernels mtp deltanet" bash scripts/gpu_check.sh
# scale: the published model sizes (synthetic weights) with per-op profiles; fp8: the 80B shape in
# block-scaled FP8 at its full depth (LAYERS_FP8, default 48) on one GPU; kernels: every kernel
# of one decode step of the 80B shape as replayed in its graph (Nsight Compute); kernel-ab: one kernel
# (NCU_KERNEL, a regex; default moe_routed) alone in each build (AB_VARIANTS, default "ballast-old
# ballast": gpu_pack.sh's BALLAST_BEFORE), its launches 21-24 of an eager batch-1 FP8 decode of the
# 80B shape (4 layers), timed by Nsight Compute; prices: what each kind of small kernel costs inside
# the batch-1 graph (80B FP8, 24 layers), by leaving it out (BALLAST_CUDA_SKIP_KERNELS; PRICE_KERNELS,
# substrings of the mangled names: NormE1E the residual norms, NormE2E the gated one), two rounds
# against the whole step; the outputs are wrong, the step's time is what is read; mtp: speculation on
# the demo model; serve: `ballast serve` on the GPU with its defaults (the KV cache from
# --mem-fraction-static 0.85), a completion, SIGTERM (scripts/gpu_serve_check.py); pdl: the 80B
# shape's decode with and without overlapped launches
# (BALLAST_CUDA_PDL=0), alternated twice; prefill-kernels: Nsight Compute's sections for the top
# kernels (NCU_KERNELS, a regex) of the first pass, an 8k prompt of the 80B shape in FP8 (4 layers:
# 3 x 2 delta rule kernels, 4 x 2 expert tile kernels, 1 attention = 15 launches); prefill-source: where
# one of those kernels' warps wait, by SASS line (NCU_KERNELS, NCU_SKIP launches skipped first;
# scripts/ncu_source_summary.py); decode-kernels: the same
# sections for the few-row products and small expert tiles (NCU_DECODE_KERNELS) of a batch-1 FP8 decode step; ep: the 80B shape with in-process expert parallelism
# G = 1 and 4, each with graphs (G = 4: one graph of every rank's pass) and eagerly
# (--disable-cuda-graph), on the one GPU, their JSON in ep.json; ep-mtp: speculation (NEXTN, 1 and 2
# draft steps) on the demo model at G = 1 and 4 (verification and draft passes as group graphs, and
# G = 4 eagerly), batches 4, 8, 32 (at batch 4 a rank has one sequence), their JSON in ep-mtp.json; nccl: the NCCL data plane's conformance, one rank a visible GPU
# (test_dist_nccl); deltanet: the chunked delta rule beside flash-linear-attention's (.carry/fla),
# and beside the build before where gpu_pack.sh packed one (DELTA_RULE_BEFORE); DELTANET_ARGS go to
# bench/deltanet/side_by_side.py (e.g. "--precisions bf16 --cases 0,2" for a shorter call), and
# CONFORMANCE_FILTER picks test_kernels_cuda's tests (a gtest filter, e.g. '*DeltaNet*').
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ballast-gpu}
mkdir -p "$OUT"
STEPS=${STEPS:-"info conformance runtime demo bench"}
. scripts/gpu_env.sh
export BALLAST_FIXTURES_DIR=$PWD/tests/fixtures
declare -A RESULT

step() {  # step NAME COMMAND...: runs it, logs to $OUT/NAME.log, records its exit code (124: cut at STEP_TIMEOUT s)
  local name=$1; shift
  echo "=== $name: $*"
  timeout "${STEP_TIMEOUT:-0}" "$@" > "$OUT/$name.log" 2>&1
  RESULT[$name]=$?
  tail -n 25 "$OUT/$name.log"
}

for s in $STEPS; do
  case $s in
    info) step info bash -c "nvidia-smi; echo cublas: $CUBLAS; $BIN/ballast generate --device cuda --prompt-ids 1,2,3 --max-new-tokens 4 --model tests/fixtures/qwen3_next_a --json" ;;
    conformance) step conformance "$BIN/test_kernels_cuda" --gtest_brief=1 --gtest_filter="${CONFORMANCE_FILTER:-*}" ;;
    nccl) step nccl bash scripts/gpu_nccl.sh "$BIN" ;;
    runtime) step runtime env BALLAST_TEST_DEVICE=cuda "$BIN/test_runtime" --gtest_brief=1 \
               --gtest_filter="${RUNTIME_FILTER:-*}" ;;
    serve) step serve python3 scripts/gpu_serve_check.py "$BIN/ballast" --device cuda ;;
    demo) step demo bash -c "for d in cpu cuda; do $BIN/ballast generate --device \$d --prompt 'def fibonacci(n):' --max-new-tokens 64 --json; $BIN/ballast generate --device \$d --prompt 'def fibonacci(n):' --max-new-tokens 64 --speculative-algorithm NEXTN --speculative-num-steps 2 --json; done" ;;
    # racecheck leaves cuBLAS's kernels out (their TMA / mbarrier pipelines read as hazards to it, and
    # instrumenting them takes minutes), and the tests of cuBLAS's FP8 and bf16 products (racecheck
    # fails with "failed to handle a hardware exception" in them: FP8 since session 15, bf16 in session
    # 16, each alone too; memcheck passes them); --error-exitcode makes a finding fail it.
    sanitizer) step sanitizer bash -c "compute-sanitizer --error-exitcode 1 --tool memcheck $BIN/test_kernels_cuda --gtest_brief=1 && BALLAST_TEST_DEVICE=cuda compute-sanitizer --error-exitcode 1 --tool memcheck $BIN/test_runtime --gtest_brief=1 --gtest_filter='Fixtures/FixtureParity.*/qwen3_next_a:Fixtures/ExpertParallel.OutputsEqual*/qwen3_next_a' && compute-sanitizer --error-exitcode 1 --tool racecheck --kernel-name-exclude kns=nvjet $BIN/test_kernels_cuda --gtest_brief=1 --gtest_filter=${SANITIZER_FILTER:-*-CudaBackend.Fp8MatmulEqualsTheProductOfWhatItMultiplies:CudaBackend.Bf16MatmulEqualsTheProductOfRoundedInputs}" ;;
    bench) step bench bash -c "$BIN/ballast bench --device cuda --prompt-len 256 --decode-steps 64 --batch 1,32 --prefill 256,2048 --profile; $BIN/ballast bench --device cuda --synthetic --prompt-len 256 --decode-steps 64 --batch 1,32 --prefill 256,2048" ;;
    scale) step scale bash -c "for m in 'qwen3-next-80b-a3b --layers ${LAYERS_80B:-8}' 'qwen3.5-397b-a17b --layers ${LAYERS_397B:-4}'; do
             $BIN/ballast bench --device cuda --synthetic \$m --batch ${BATCHES:-1,8,32,128,256} --prompt-len ${CONTEXT:-1024} \
               --decode-steps 32 --prefill ${PREFILLS:-8192,1024,32768} --repeats ${REPEATS:-2} --profile \
               --json-file $OUT/scale-\${m%% *}.json; done" ;;
    fp8) step fp8 bash -c "$BIN/ballast bench --device cuda --synthetic qwen3-next-80b-a3b --dtype fp8 --layers ${LAYERS_FP8:-48} \
               --batch ${FP8_BATCHES:-1,8,32,128} --prompt-len ${CONTEXT:-1024} --decode-steps 32 --prefill ${FP8_PREFILLS:-8192} \
               --repeats ${REPEATS:-1} --profile --json-file $OUT/fp8-80b.json" ;;
    kernels) step kernels bash -c "ncu --profile-from-start off --graph-profiling node --clock-control none --cache-control none --csv \
               --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,launch__grid_size \
               $BIN/ballast bench --device cuda --synthetic qwen3-next-80b-a3b --layers ${LAYERS_80B:-8} --dtype ${KERNELS_DTYPE:-bf16} \
               --batch ${KERNELS_BATCH:-1} --prompt-len 1024 --decode-steps 8 --repeats 1 --profiler-window \
               > $OUT/kernels-decode.csv && python3 scripts/ncu_summary.py $OUT/kernels-decode.csv" ;;
    kernel-ab) step kernel-ab bash -c "for b in ${AB_VARIANTS:-ballast-old ballast}; do echo \"--- \$b\"; \
               ncu --kernel-name 'regex:${NCU_KERNEL:-moe_routed}' --launch-skip 20 --launch-count 4 --clock-control none \
               --csv --metrics gpu__time_duration.sum,dram__bytes_read.sum $BIN/\$b bench --device cuda --synthetic \
               qwen3-next-80b-a3b --dtype fp8 --layers 4 --batch ${KERNELS_BATCH:-1} --prompt-len 1024 --decode-steps 16 \
               --repeats 1 --disable-cuda-graph > /tmp/kernel-ab-\$b.csv && python3 scripts/ncu_summary.py /tmp/kernel-ab-\$b.csv; done" ;;
    prices) step prices bash -c "for r in 1 2; do for skip in '' ${PRICE_KERNELS:-NormE1E qk_norm_rope conv1d_silu_kernel NormE2E delta_gates_kernel}; do \
               echo \"--- round \$r, left out: '\$skip'\"; BALLAST_CUDA_SKIP_KERNELS=\$skip $BIN/ballast bench --device cuda --synthetic \
               qwen3-next-80b-a3b --dtype fp8 --layers 24 --batch 1 --prompt-len 1024 --decode-steps 64 --prefill 128 --repeats 1 2>&1 \
               | grep -E 'left out|^ +1 ' | cut -c 1-160; done; done" ;;
    prefill-kernels) step prefill-kernels bash -c "ncu --kernel-name 'regex:${NCU_KERNELS:-experts_fp8|attention_bf16|delta_rule_(solve|state)}' \
               --launch-count ${NCU_COUNT:-15} --clock-control none --section SpeedOfLight --section Occupancy \
               --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
               $BIN/ballast bench --device cuda --synthetic qwen3-next-80b-a3b --dtype fp8 --layers 4 --batch 1 \
               --prompt-len 8192 --decode-steps 1 --prefill 8192 --repeats 1 > $OUT/prefill-kernels.txt" ;;
    prefill-source) step prefill-source bash -c "ncu --kernel-name 'regex:${NCU_KERNELS:-experts_fp8_kernel}' \
               --launch-skip ${NCU_SKIP:-0} --launch-count 1 --clock-control none --section SourceCounters -f -o /tmp/ballast-source \
               $BIN/ballast bench --device cuda --synthetic qwen3-next-80b-a3b --dtype fp8 --layers 4 --batch 1 \
               --prompt-len 8192 --decode-steps 1 --prefill 8192 --repeats 1 > /dev/null &&
               ncu --import /tmp/ballast-source.ncu-rep --page source --csv --print-source sass > /tmp/ballast-source.csv &&
               python3 scripts/ncu_source_summary.py /tmp/ballast-source.csv --top ${NCU_TOP:-15}" ;;
    decode-kernels) step decode-kernels bash -c "ncu --profile-from-start off --graph-profiling node \
               --kernel-name 'regex:${NCU_DECODE_KERNELS:-few_rows|experts_small}' --launch-count ${NCU_COUNT:-12} \
               --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
               --section SchedulerStats --section MemoryWorkloadAnalysis \
               $BIN/ballast bench --device cuda --synthetic qwen3-next-80b-a3b --dtype fp8 --layers 4 --batch 1 \
               --prompt-len 1024 --decode-steps 4 --repeats 1 --profiler-window > $OUT/decode-kernels.txt" ;;
    pdl) step pdl bash -c "for r in 1 2; do for v in 0 1; do echo \"--- BALLAST_CUDA_PDL=\$v (round \$r)\"; BALLAST_CUDA_PDL=\$v \
               $BIN/ballast bench --device cuda --synthetic qwen3-next-80b-a3b --layers ${LAYERS_80B:-8} --batch 1,8,32 \
               --prompt-len 1024 --decode-steps 32 --prefill 8192 --repeats 1 --json-file $OUT/pdl-\$v-\$r.json; done; done" ;;
    ep) step ep bash -c "for run in '1:1' '1-eager:1 --disable-cuda-graph' '4:4' '4-eager:4 --disable-cuda-graph'; do \
               set -- \${run#*:}; $BIN/ballast bench --device cuda --synthetic qwen3-next-80b-a3b --layers ${LAYERS_80B:-8} \
               --ep \$* --batch ${EP_BATCHES:-32} --prompt-len 1024 --decode-steps 32 --prefill 2048 --repeats 1 \
               --json-file /tmp/ep-\${run%%:*}.json; done; python3 -c 'import json, sys; \
               json.dump({f[8:-5]: json.load(open(f)) for f in sys.argv[1:]}, open(\"$OUT/ep.json\", \"w\"), indent=1)' /tmp/ep-*.json" ;;
    mtp) step mtp "$BIN/ballast" bench --device cuda --batch 1,8 --prompt-len 128 --decode-steps 64 --prefill 128 \
               --speculative-num-steps 1,2,3 ;;
    ep-mtp) step ep-mtp bash -c "for run in '1:1' '4:4' '4-eager:4 --disable-cuda-graph'; do set -- \${run#*:}; \
               $BIN/ballast bench --device cuda --ep \$* --batch ${EP_MTP_BATCHES:-4,8,32} --prompt-len 128 --decode-steps 64 \
               --prefill 128 --speculative-num-steps 1,2 --repeats 1 --json-file /tmp/ep-mtp-\${run%%:*}.json; done; \
               python3 -c 'import json, sys; \
               json.dump({f[12:-5]: json.load(open(f)) for f in sys.argv[1:]}, open(\"$OUT/ep-mtp.json\", \"w\"), indent=1)' /tmp/ep-mtp-*.json" ;;
    deltanet) before=(); [ -x "$BIN/bench_delta_rule_cuda-before" ] && before=(--ballast-before "$BIN/bench_delta_rule_cuda-before")
               step deltanet python3 bench/deltanet/side_by_side.py --ballast "$BIN/bench_delta_rule_cuda" "${before[@]}" \
               --fla .carry/fla --out "$OUT/deltanet" ${DELTANET_ARGS:-} ;;
  esac
done

{
  echo "{"
  first=1
  for k in "${!RESULT[@]}"; do
    [ $first = 1 ] || echo ","
    printf '  "%s": %s' "$k" "${RESULT[$k]}"
    first=0
  done
  echo; echo "}"
} > "$OUT/summary.json"
cat "$OUT/summary.json"

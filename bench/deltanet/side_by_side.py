#!/usr/bin/env python3
"""Gated DeltaNet chunked prefill: ballast's CUDA kernel beside flash-linear-attention's Triton
chunk_gated_delta_rule, on the same inputs, outputs compared and both timed in one run.

Inputs are made here with torch on the GPU: q, k, v normal; g = log-decay in [-3, 0) scaled as a
trained model's gates (-exp(A_log) * softplus(a + dt_bias)); beta = sigmoid(normal). Both kernels
L2-normalise q and k (eps 1e-6) and scale q by dk^-0.5 inside, start from zero states, and use
grouped value heads (Hv = r * Hk, value head h reads key head h // r).

ballast runs through bench_delta_rule_cuda twice: with fp32 products (3xTF32, the parity tests'
mode; fp32 q, k and v rows) and with bf16 products (ballast's default on a GPU: both chunked kernels'
products in bf16, the rows in bf16 as its model gives them there; a build before session 48 took
fp32 rows there too, its bench reports no "rows"); FLA runs on the same values in bf16 (as served)
and in fp32.
Times are the device time of the op alone: ballast's from CUDA events around its op, FLA's from
triton.testing.do_bench (median), taken in --rounds rounds, each round ballast (and the build
before) then FLA in the same dtype; the report keeps each side's median and every round's time.

`--precisions bf16` runs ballast with bf16 products only (FLA runs in both dtypes still: its fp32
output is the error reference). The solve kernel is also timed alone (the state kernel left out by
BALLAST_CUDA_SKIP_KERNELS, bf16 products): the state kernel's time is the op's less that.

With --ballast-before (the same bench from an earlier build), the two builds alternate in those
rounds on the same inputs and the report has both (the medians of their rounds) and how far their
outputs differ: an A/B of a change inside one run (FLA's bf16 times move between runs).

  python3 bench/deltanet/side_by_side.py --ballast BUILD/bench/kernels/bench_delta_rule_cuda \
      [--ballast-before OLD/bench_delta_rule_cuda] --fla PATH_TO_FLA_CHECKOUT --out DIR
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch

CASES = [  # (model, Hk, Hv, dk, dv), (sequence lengths)
    (("qwen3-next-80b-a3b", 16, 32, 128, 128), [8192]),
    (("qwen3-next-80b-a3b", 16, 32, 128, 128), [4096] * 4),
    (("qwen3.5-397b-a17b", 16, 64, 128, 128), [8192]),
    (("qwen3.5-397b-a17b", 16, 64, 128, 128), [4096] * 4),
]


def make_inputs(T, Hk, Hv, dk, dv, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(T, Hk, dk, device="cuda", generator=gen)
    k = torch.randn(T, Hk, dk, device="cuda", generator=gen)
    v = torch.randn(T, Hv, dv, device="cuda", generator=gen)
    a = torch.randn(T, Hv, device="cuda", generator=gen)
    A_log = torch.rand(Hv, device="cuda", generator=gen) * 2 - 1
    dt_bias = torch.rand(Hv, device="cuda", generator=gen) - 0.5
    g = -torch.exp(A_log) * torch.nn.functional.softplus(a + dt_bias)
    beta = torch.sigmoid(torch.randn(T, Hv, device="cuda", generator=gen))
    return q, k, v, g, beta


def run_case(args, model, Hk, Hv, dk, dv, lens, seed):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    import triton.testing

    T = sum(lens)
    q, k, v, g, beta = make_inputs(T, Hk, Hv, dk, dv, seed)
    # The inputs and outputs go to a scratch folder removed with the case (up to ~0.8 GB at 397B 4 x
    # 4096): --out keeps the report alone, small enough to bring back from the GPU machine.
    work = tempfile.mkdtemp(prefix="deltanet-case-")
    qkv = torch.cat([q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)], dim=1)
    for name, t in (("qkv", qkv), ("g", g), ("beta", beta)):
        t.float().contiguous().cpu().numpy().tofile(os.path.join(work, name + ".f32"))
    with open(os.path.join(work, "meta.json"), "w") as f:
        json.dump({"seqs": lens, "Hk": Hk, "Hv": Hv, "dk": dk, "dv": dv}, f)
    res = {"model": model, "seqs": lens, "tokens": T, "Hk": Hk, "Hv": Hv, "dk": dk, "dv": dv}

    def ballast(binary, precision, skip=None):  # (median ms of the op, its output)
        env = dict(os.environ, BALLAST_CUDA_SKIP_KERNELS=skip) if skip else None
        r = subprocess.run([binary, work, str(args.runs), precision], capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"{binary} failed: {r.stderr.strip()}")
        ours = json.loads(r.stdout.strip().splitlines()[-1])
        res[f"rows_{precision}{'_before' if binary == args.ballast_before else ''}"] = ours.get("rows", "F32")
        out = torch.from_numpy(np.fromfile(os.path.join(work, "out.f32"), dtype=np.float32)).cuda()
        return ours["median_ms"], out.reshape(T, Hv, dv)

    # FLA on the same values in bf16 (as served) and fp32 (the error reference). Its times are taken
    # in the rounds beside ballast's (a do_bench each round, the median kept): one do_bench a case
    # read 0.66-1.57 ms at 80B 1 x 8192 in different runs (sessions 48-49), which a single sample
    # of either side turns into the ratio.
    cu = torch.tensor([0] + list(np.cumsum(lens)), dtype=torch.long, device="cuda")
    fla, fla_out = {}, {}
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        args_fla = [x.unsqueeze(0).to(dtype) for x in (q, k, v, g, beta)]
        fla[name] = lambda a=args_fla: chunk_gated_delta_rule(*a, scale=dk ** -0.5, use_qk_l2norm_in_kernel=True,
                                                              cu_seqlens=cu)[0]
        fla_out[name] = fla[name]()[0].float()  # (its first call: the autotuning, outside the timings)
    fla_times = {"bf16": [], "fp32": []}

    def time_fla(name):
        fla_times[name].append(triton.testing.do_bench(fla[name], warmup=25, rep=200, return_mode="median"))

    outs = {}
    for precision in args.precisions.split(","):
        key = "ballast_ms" if precision == "fp32" else "ballast_bf16_ms"
        times, before = [], []
        for _ in range(args.rounds):
            ms, outs[precision] = ballast(args.ballast, precision)
            times.append(ms)
            if args.ballast_before:
                ms_b, out_b = ballast(args.ballast_before, precision)
                before.append(ms_b)
            time_fla(precision)
        res[key] = float(np.median(times))
        res[key.replace("_ms", "_rounds_ms")] = {"this": times}
        if args.ballast_before:
            res[key.replace("ballast", "ballast_before")] = float(np.median(before))
            res[key.replace("_ms", "_rounds_ms")]["before"] = before
            res[key.replace("_ms", "_rel_l2_diff_vs_before")] = \
                ((outs[precision] - out_b).norm() / out_b.norm()).item()
    # The solve kernel alone (the state kernel left out: BALLAST_CUDA_SKIP_KERNELS), bf16 products;
    # the state kernel's share is the difference.
    if "bf16" in outs:
        res["ballast_bf16_solve_ms"] = ballast(args.ballast, "bf16", "delta_rule_state_kernel")[0]
        if args.ballast_before:
            res["ballast_before_bf16_solve_ms"] = ballast(args.ballast_before, "bf16", "delta_rule_state_kernel")[0]
    out_ballast = outs.get("fp32")
    shutil.rmtree(work, ignore_errors=True)

    for name in ("bf16", "fp32"):
        if not fla_times[name]:
            time_fla(name)  # (a precision ballast did not run: FLA's time once)
        res[f"fla_{name}_ms"] = float(np.median(fla_times[name]))
        res[f"fla_{name}_rounds_ms"] = fla_times[name]
        out = fla_out[name]
        if out_ballast is not None:
            diff = (out - out_ballast).abs()
            res[f"max_abs_diff_vs_fla_{name}"] = diff.max().item()
            res[f"rel_l2_diff_vs_fla_{name}"] = (diff.norm() / out.norm()).item()
        if name == "fp32" and "bf16" in outs:
            res["bf16_products_rel_l2_diff_vs_fla_fp32"] = ((out - outs["bf16"]).norm() / out.norm()).item()
    if "fp32" in outs:
        res["speedup_vs_fla_bf16"] = res["fla_bf16_ms"] / res["ballast_ms"]
        res["speedup_vs_fla_fp32"] = res["fla_fp32_ms"] / res["ballast_ms"]
    if "bf16" in outs:
        res["bf16_products_speedup_vs_fla_bf16"] = res["fla_bf16_ms"] / res["ballast_bf16_ms"]
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ballast", required=True, help="the bench_delta_rule_cuda executable")
    p.add_argument("--fla", required=True, help="a flash-linear-attention checkout (its fla/ package)")
    p.add_argument("--out", required=True, help="directory for the JSON report")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--ballast-before", help="the same bench from an earlier build, for an A/B in this run")
    p.add_argument("--rounds", type=int, default=2, help="rounds of ballast's builds and FLA, alternated (each side's median reported)")
    p.add_argument("--precisions", default="fp32,bf16", help="ballast's products to run: fp32, bf16 or both")
    p.add_argument("--cases", help="which of the four shapes to run, as indices into CASES (e.g. 0,2); all by default")
    args = p.parse_args()
    sys.path.insert(0, args.fla)
    os.makedirs(args.out, exist_ok=True)
    results = []
    chosen = [int(c) for c in args.cases.split(",")] if args.cases else range(len(CASES))
    for i in chosen:
        (model, Hk, Hv, dk, dv), lens = CASES[i]
        r = run_case(args, model, Hk, Hv, dk, dv, lens, seed=100 + i)
        results.append(r)
        # Written after every case: a run cut short (a device call's time limit) keeps the cases it
        # finished, whatever buffers its printed lines on their way out.
        with open(os.path.join(args.out, "deltanet_side_by_side.json"), "w") as f:
            json.dump(results, f, indent=1)
        spread = lambda name: "/".join(f"{t:.3f}" for t in r[f"fla_{name}_rounds_ms"])
        print(f"{model:20s} {len(lens)} x {lens[0]:5d}: FLA bf16 {r['fla_bf16_ms']:8.3f} ms ({spread('bf16')}), "
              f"FLA fp32 {r['fla_fp32_ms']:8.3f} ms ({spread('fp32')})", flush=True)
        for key, dtype in (("ballast_ms", "fp32"), ("ballast_bf16_ms", "bf16")):  # each beside FLA's same dtype
            if key not in r:
                continue
            line = (f"{'':20s} ballast, {dtype} products: {r[key]:8.3f} ms "
                    f"({r[f'fla_{dtype}_ms'] / r[key]:.2f}x FLA's {dtype})")
            if args.ballast_before:
                b = key.replace("ballast", "ballast_before")
                line += (f"; before {r[b]:8.3f} ms (this / before {r[key] / r[b]:.3f}, outputs differ by "
                         f"{r[key.replace('_ms', '_rel_l2_diff_vs_before')]:.2e})")
            print(line, flush=True)
        if "ballast_bf16_solve_ms" in r:
            before = f" (before {r['ballast_before_bf16_solve_ms']:.3f} ms)" if args.ballast_before else ""
            print(f"{'':20s} bf16 products: solve kernel {r['ballast_bf16_solve_ms']:.3f} ms{before}, state kernel "
                  f"{r['ballast_bf16_ms'] - r['ballast_bf16_solve_ms']:.3f} ms (the op less the solve)", flush=True)
        for key in ("rel_l2_diff_vs_fla_fp32", "bf16_products_rel_l2_diff_vs_fla_fp32"):
            if key in r:
                print(f"{'':20s} {key}: {r[key]:.2e}", flush=True)


if __name__ == "__main__":
    main()

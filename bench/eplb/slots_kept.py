#!/usr/bin/env python3
"""Slots kept across a rebalance with vLLM's policy interface: vLLM's DefaultEplbPolicy
(deepseek-ai/EPLB, then its preserve-intra-GPU-slots post-pass; ballast_eplb.DeepseekPolicy) against
ballast's migration-aware planner behind the same interface (ballast_eplb.BallastPolicy), on a trace
written by `ballast eplb synth`: the old placement is vLLM's plan for the first window, both plan the
second window from it.

  PYTHONPATH=build/python python3 bench/eplb/slots_kept.py TRACE.safetensors --ranks 64 --redundant 64
"""
import argparse
import json
import struct

import numpy as np

import ballast_eplb as eplb


def read_trace(path):
    """The minimal safetensors file of `eplb synth`: one I32 tensor logical_count [T, L, E]."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        meta = json.loads(f.read(n))["logical_count"]
        data = np.frombuffer(f.read(), dtype=np.int32)
    start, end = meta["data_offsets"]
    return data[start // 4:end // 4].reshape(meta["shape"]).astype(np.int64)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--ranks", type=int, default=64)
    ap.add_argument("--redundant", type=int, default=64)
    ap.add_argument("--window", type=int, default=0, help="passes per window (default: half the trace)")
    args = ap.parse_args()
    t = read_trace(args.trace)
    T, L, E = t.shape
    W = args.window or T // 2
    P, G = E + args.redundant, args.ranks
    first, second, later = t[:W].sum(0), t[W:2 * W].sum(0), t[W:2 * W]
    old = eplb.DeepseekPolicy.rebalance_experts(first, P, 1, 1, G)
    print(f"{L} layers x {E} experts, {P} slots on {G} ranks, windows of {W} passes")
    print("| policy | slots kept (of %d) | experts moved between ranks | balancedness, window sum | per pass, static |" % (L * P))
    print("|---|---|---|---|---|")
    for name, policy in (("vLLM DefaultEplbPolicy (deepseek + post-pass)", eplb.DeepseekPolicy),
                         ("ballast BallastPolicy (migration weight 0.05)", eplb.BallastPolicy)):
        new = policy.rebalance_experts(second, P, 1, 1, G, old_global_expert_indices=old)
        kept = int(eplb.slots_kept(old, new).sum())
        k = P // G
        moved = sum(len(set(new[l, g * k:(g + 1) * k].tolist()) - set(old[l, g * k:(g + 1) * k].tolist()))
                    for l in range(L) for g in range(G))
        even = eplb.balancedness(new, second, G).mean()
        static = eplb.evaluate_passes(new, later, G, dispatch="static").mean()
        print(f"| {name} | {kept} ({kept / (L * P):.1%}) | {moved} | {even:.4f} | {static:.4f} |")


if __name__ == "__main__":
    main()

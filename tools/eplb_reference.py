#!/usr/bin/env python3
"""Reference outputs of the ORIGINAL deepseek-ai/EPLB for ballast's parity tests, and its speed.

The original eplb.py is not part of this repository: fetch it yourself (github.com/deepseek-ai/EPLB)
and pass its path with --eplb. This script needs torch and runs where torch is installed.

  python3 tools/eplb_reference.py --eplb PATH/eplb.py --out tests/eplb/fixtures/deepseek_reference.json
  python3 tools/eplb_reference.py --eplb PATH/eplb.py --time --weights-out W.txt --timing-out T.json

Cases: the README example, then random cases over shapes (layers, experts, groups, nodes, GPUs,
redundant slots) taking both the hierarchical and the global policy, with weights chosen to make
ties common (small integers, constants, zeros) and some wide-range integers and dyadic fractions
(exact in float32, so group sums do not depend on summation order).
"""
import argparse
import importlib.util
import json
import random
import time


def load_eplb(path):
    spec = importlib.util.spec_from_file_location("eplb_original", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def random_case(rng):
    num_nodes = rng.choice([1, 1, 2, 2, 4])
    gpus_per_node = rng.choice([1, 2, 3, 4])
    num_gpus = num_nodes * gpus_per_node
    # groups: usually a multiple of nodes (hierarchical), sometimes not (global policy)
    if rng.random() < 0.75:
        num_groups = num_nodes * rng.choice([1, 2, 3])
    else:
        num_groups = rng.choice([1, 3, 5, 6]) if num_nodes > 1 else rng.choice([1, 2, 4])
    group_size = rng.choice([1, 2, 3, 4, 6, 8])
    num_logical = num_groups * group_size
    # physical slots: a multiple of num_gpus, >= num_logical, a few redundant
    per_gpu_min = -(-num_logical // num_gpus)
    per_gpu = per_gpu_min + rng.choice([0, 0, 1, 1, 2, 3])
    num_phy = per_gpu * num_gpus
    if num_groups % num_nodes == 0 and (num_phy // num_nodes) < num_logical // num_nodes:
        num_phy += num_gpus
    layers = rng.choice([1, 1, 2, 3])
    kind = rng.choice(["small_int", "small_int", "tiny_int", "wide_int", "const", "zeros_some", "dyadic"])
    w = []
    for _ in range(layers):
        if kind == "small_int":
            row = [rng.randint(0, 9) for _ in range(num_logical)]
        elif kind == "tiny_int":
            row = [rng.randint(0, 2) for _ in range(num_logical)]
        elif kind == "wide_int":
            row = [int(rng.lognormvariate(4, 1.5)) for _ in range(num_logical)]
        elif kind == "const":
            c = rng.randint(0, 5)
            row = [c] * num_logical
        elif kind == "zeros_some":
            row = [rng.choice([0, 0, 0, rng.randint(1, 50)]) for _ in range(num_logical)]
        else:
            row = [rng.randint(0, 64) / 8.0 for _ in range(num_logical)]
        w.append(row)
    return dict(weight=w, num_replicas=num_phy, num_groups=num_groups, num_nodes=num_nodes, num_gpus=num_gpus,
                kind=kind)


def distinct_case(rng):
    """A case whose weights are distinct integers (ties in the packing sorts become rare: only
    between per-replica loads w/c of different experts, or replicas of one expert)."""
    case = random_case(rng)
    L, E = len(case["weight"]), len(case["weight"][0])
    hi = rng.choice([1000, 100000, 10**7])
    case["weight"] = [rng.sample(range(1, hi), E) for _ in range(L)]
    case["kind"] = "distinct"
    return case


def platform_info(torch):
    import platform
    info = dict(torch=torch.__version__, machine=platform.machine())
    try:
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:  # torch < 2.0
        info["cpu_capability"] = "unknown (torch has no torch.backends.cpu.get_cpu_capability)"
    try:
        flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].split()
        info["cpu_flags"] = [f for f in ("avx2", "avx512f", "avx512dq") if f in flags]
    except Exception:
        pass
    return info


def run_case(eplb, torch, case):
    weight = torch.tensor(case["weight"], dtype=torch.float64)
    phy2log, log2phy, logcnt = eplb.rebalance_experts(weight, case["num_replicas"], case["num_groups"],
                                                      case["num_nodes"], case["num_gpus"])
    out = dict(case)
    out["phy2log"] = phy2log.tolist()
    out["log2phy"] = log2phy.tolist()
    out["logcnt"] = logcnt.tolist()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--eplb", required=True, help="path of the original eplb.py")
    ap.add_argument("--out", help="fixture JSON to write")
    ap.add_argument("--cases", type=int, default=240)
    ap.add_argument("--seed", type=int, default=20240)
    ap.add_argument("--distinct", action="store_true", help="cases with distinct integer weights (no README case)")
    ap.add_argument("--time", action="store_true", help="time 48 x 512 experts, 64 GPUs, 64 redundant")
    ap.add_argument("--weights-out", help="write the timed weights (text) for the C++ side")
    ap.add_argument("--timing-out", help="write timings JSON")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    eplb = load_eplb(args.eplb)

    if args.out:
        cases = [dict(weight=[[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                              [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]],
                      num_replicas=16, num_groups=4, num_nodes=2, num_gpus=8, kind="readme")]
        rng = random.Random(args.seed)
        out = [] if args.distinct else [run_case(eplb, torch, cases[0])]
        make = distinct_case if args.distinct else random_case
        while len(out) < args.cases:
            try:
                out.append(run_case(eplb, torch, make(rng)))
            except (AssertionError, RuntimeError):
                pass  # a shape the original refuses is no parity case
        doc = dict(source="deepseek-ai/EPLB eplb.py", torch=torch.__version__, platform=platform_info(torch),
                   seed=args.seed, cases=out)
        with open(args.out, "w") as f:
            json.dump(doc, f, separators=(",", ":"))
        print(f"wrote {len(out)} cases to {args.out}")

    if args.time:
        rng = random.Random(7)
        L, E, G, R = 48, 512, 64, 64
        weight_rows = []
        for _ in range(L):
            weight_rows.append([int(rng.lognormvariate(6, 1.0)) for _ in range(E)])
        weight = torch.tensor(weight_rows, dtype=torch.float64)
        res = {}
        for name, groups, nodes in [("global", 1, 1), ("hierarchical_8x8", 8, 8)]:
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                phy2log, _, _ = eplb.rebalance_experts(weight, E + R, groups, nodes, G)
                times.append(time.perf_counter() - t0)
            res[name] = dict(seconds=sorted(times), min_ms=min(times) * 1e3, groups=groups, nodes=nodes)
            res[name]["phy2log"] = phy2log.tolist()
            print(f"original python rebalance_experts {name}: min {min(times)*1e3:.1f} ms over {args.repeat}")
        if args.weights_out:
            with open(args.weights_out, "w") as f:
                f.write(f"{L} {E} {G} {R}\n")
                for row in weight_rows:
                    f.write(" ".join(map(str, row)) + "\n")
                for name in ["global", "hierarchical_8x8"]:
                    for row in res[name]["phy2log"]:
                        f.write(" ".join(map(str, row)) + "\n")
        if args.timing_out:
            for v in res.values():
                v.pop("phy2log")
            res["torch"] = torch.__version__
            res["threads"] = torch.get_num_threads()
            with open(args.timing_out, "w") as f:
                json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""ballast beside llama.cpp on the CPU, same machine, same checkpoint, same thread counts.

Prompt processing of 128 and 512 tokens and generation of 128 tokens, as llama-bench's pp128, pp512
and tg128 (generation from an empty context: ballast decodes with a 1-token prompt). The engines
alternate, round by round, so that both see the same machine state; each figure is the median of
its rounds. Both warm up first (llama-bench runs a warm-up pass; ballast reports the better of two
runs, the first of a fresh process paying the weights' page faults). The GGUF must be made from the ballast model directory given (bench/cpu/convert_gguf.py;
`ballast bench --synthetic NAME --save DIR` makes a checkpoint of a published shape).

  python3 bench/cpu/vs_llama_cpp.py --ballast BUILD/ballast --model DIR \\
      --llama-bench LLAMA_BUILD/bin/llama-bench --gguf M.gguf --threads 1,2 --rounds 5
"""
import argparse
import json
import statistics
import subprocess
import sys

TESTS = (("pp128", 128, 0), ("pp512", 512, 0), ("tg128", 0, 128))


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"vs_llama_cpp: {' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    return p.stdout


def llama_round(a, threads):
    out = json.loads(run([a.llama_bench, "-m", a.gguf, "-t", str(threads), "-p", "128,512", "-n", "128",
                          "-r", "1", "-o", "json", *a.llama_bench_arg]))
    got, commit = {}, ""
    for e in out:
        commit = e.get("build_commit", commit)
        for name, p, n in TESTS:
            if e["n_prompt"] == p and e["n_gen"] == n:
                got[name] = e["avg_ts"]
    return got, commit


def ballast_round(a, threads):
    j = json.loads(run([a.ballast, "bench", "--device", "cpu", "--threads", str(threads), "--model", a.model,
                        "--prefill", "128,512", "--batch", "1", "--prompt-len", "1", "--decode-steps", "128",
                        "--repeats", "2", "--json"] + a.ballast_arg))
    pre = {p["tokens"]: p["tokens_per_s"] for p in j["prefill"]}
    return {"pp128": pre[128], "pp512": pre[512], "tg128": j["decode"][0]["tokens_per_s"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ballast", required=True)
    p.add_argument("--model", required=True, help="the ballast model directory the GGUF was made from")
    p.add_argument("--llama-bench", required=True)
    p.add_argument("--gguf", required=True)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--llama-cpp-commit", help="the llama.cpp commit, where llama-bench reports none (a build "
                                              "from a source archive)")
    p.add_argument("--llama-bench-arg", action="append", default=[],
                   help="one more llama-bench argument (repeat it: --llama-bench-arg=-lm --llama-bench-arg=none, "
                        "or -mmp 0 in llama-bench before its --load-mode, loads the weights into llama.cpp's own "
                        "memory, as ballast does by default)")
    p.add_argument("--ballast-arg", action="append", default=[],
                   help="one more ballast bench argument (--ballast-arg=--quantization --ballast-arg=fp8: its 8-bit "
                        "weights beside a q8_0 GGUF)")
    p.add_argument("--json", help="also write every round's figures here")
    a = p.parse_args()
    rows, commit, raw = [], "", {}
    for t in [int(x) for x in a.threads.split(",")]:
        ours, theirs = {k: [] for k, _, _ in TESTS}, {k: [] for k, _, _ in TESTS}
        for r in range(a.rounds):
            # Alternate which engine goes first.
            order = (ballast_round, llama_round) if r % 2 == 0 else (llama_round, ballast_round)
            for fn in order:
                res = fn(a, t)
                if fn is llama_round:
                    res, commit = res
                    for k in theirs:
                        theirs[k].append(res[k])
                else:
                    for k in ours:
                        ours[k].append(res[k])
        raw[t] = {"ballast": ours, "llama.cpp": theirs}
        rows.append((t, {k: statistics.median(ours[k]) for k in ours}, {k: statistics.median(theirs[k]) for k in theirs}))
    if a.llama_cpp_commit and commit in ("", "unknown"):
        commit = a.llama_cpp_commit
    extra = f" (llama-bench {' '.join(a.llama_bench_arg)})" if a.llama_bench_arg else ""
    if a.ballast_arg:
        extra += f" (ballast {' '.join(a.ballast_arg)})"
    print(f"ballast {a.model} vs llama.cpp {commit} ({a.gguf}){extra}, median of {a.rounds} alternating rounds, "
          "tokens/s")
    print("| threads | test | ballast | llama.cpp | ballast / llama.cpp |")
    print("|---|---|---|---|---|")
    for t, ours, theirs in rows:
        for k, _, _ in TESTS:
            print(f"| {t} | {k} | {ours[k]:.1f} | {theirs[k]:.1f} | {ours[k] / theirs[k]:.2f}x |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"llama_cpp_commit": commit, "model": a.model, "gguf": a.gguf, "rounds": raw}, f, indent=1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""End-to-end checks of the ballast binary, one per CTest test: `cli_checks.py CHECK --ballast BIN ...`.

Each check runs the real CLI on committed fixtures and compares against transformers' references
(tests/fixtures/*/reference.json) or against the single-rank run."""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "tests", "fixtures")


def run(cmd, expect_rc=0):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if p.returncode != expect_rc:
        sys.exit(f"command {cmd} exited {p.returncode} (expected {expect_rc})\nstdout: {p.stdout}\nstderr: {p.stderr}")
    return p


def reference(fixture):
    with open(os.path.join(FIX, fixture, "reference.json")) as f:
        return json.load(f)


def prompts_file(tmp, fixture):
    ref = reference(fixture)
    path = os.path.join(tmp, "prompts.txt")
    a, b = ref["prompt_ids"], ref["short_prompt_ids"]
    with open(path, "w") as f:
        for p in (a, b, a[10:50], b[::-1]):
            f.write(",".join(map(str, p)) + "\n")
    return path


def check_generate_matches_transformers(args):
    for fixture in sorted(os.listdir(FIX)):
        if not os.path.exists(os.path.join(FIX, fixture, "reference.json")):
            continue
        ref = reference(fixture)
        out = run([args.ballast, "generate", "--model", os.path.join(FIX, fixture), "--prompt-ids",
                   ",".join(map(str, ref["prompt_ids"])), "--max-new-tokens", "16", "--json"]).stdout
        j = json.loads(out)
        assert j["output_ids"] == ref["continuation"], (fixture, j["output_ids"], ref["continuation"])
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            assert j[key] > 0, (fixture, key)


def ep_run(args, launcher, fixture, extra, tmp):
    cmd = launcher + [args.ballast, "generate", "--model", os.path.join(FIX, fixture), "--prompts-file",
                      prompts_file(tmp, fixture), "--max-new-tokens", "12", "--json"] + extra
    return json.loads(run(cmd).stdout)


def check_ep_threads_and_mpi(args):
    fixture = "qwen3_next_a"  # 8 experts: 2 redundant slots divide over 2 ranks
    with tempfile.TemporaryDirectory() as tmp:
        single = ep_run(args, [], fixture, [], tmp)["output_ids"]
        eplb = ["--ep-num-redundant-experts", "2", "--enable-eplb", "--eplb-rebalance-num-iterations", "2",
                "--eplb-rebalance-layers-per-chunk", "2", "--ep-dispatch-algorithm", "balanced"]
        threads = ep_run(args, [], fixture, ["--ep", "2"] + eplb, tmp)
        assert threads["output_ids"] == single, ("threads", threads["output_ids"], single)
        assert threads["expert_parallel"]["rebalances"], "no rebalance in the threads run"
        # the forecast is on by default: each rebalance says how many layers it planned for a trend
        assert all(e["layers_trending"] >= 0 for e in threads["expert_parallel"]["rebalances"]), threads
        off = ep_run(args, [], fixture, ["--ep", "2", "--no-eplb-forecast"] + eplb, tmp)
        assert off["output_ids"] == single and all(e["layers_trending"] == 0 for e in off["expert_parallel"]["rebalances"])
        if args.mpirun:
            mpi = ep_run(args, args.mpirun.split() + ["-np", "2"], fixture, eplb, tmp)
            assert mpi["output_ids"] == single, ("mpi", mpi["output_ids"], single)
            assert mpi["expert_parallel"]["ranks"] == 2
            assert mpi["expert_parallel"]["rebalances"], "no rebalance in the MPI run"


def check_logits_file(args):
    fixture = "qwen3_next_b"
    ref = reference(fixture)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "logits.safetensors")
        run([args.ballast, "logits", "--model", os.path.join(FIX, fixture), "--prompt-ids",
             ",".join(map(str, ref["short_prompt_ids"])), "--out", out])
        with open(out, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        assert header["logits"]["dtype"] == "F32", header
        with open(os.path.join(FIX, fixture, "config.json")) as f:
            vocab = json.load(f)["vocab_size"]
        assert header["logits"]["shape"] == [len(ref["short_prompt_ids"]), vocab], header


def check_bad_input_errors(args):
    fixture = os.path.join(FIX, "qwen3_next_a")
    with tempfile.TemporaryDirectory() as tmp:
        cases = [
            ([args.ballast, "generate", "--model", tmp, "--prompt-ids", "1,2"], "config.json"),
            ([args.ballast, "generate", "--model", fixture, "--prompt-ids", "1,x"], "invalid token id 'x'"),
            ([args.ballast, "generate", "--model", fixture, "--prompt-ids", "1,99999"], "outside the vocabulary"),
            ([args.ballast, "generate", "--model", fixture, "--prompt-ids", "1", "--ep", "3",
              "--ep-num-redundant-experts", "0"], "not divisible by 3 ranks"),
        ]
        for cmd, needle in cases:
            p = run(cmd, expect_rc=1)
            assert needle in p.stderr and p.stderr.startswith("error: "), (cmd, p.stderr)
            assert p.stderr.count("\n") == 1, ("one line expected", p.stderr)


def check_fp8_refusals(args):
    # An FP8 checkpoint whose config.json lost its quantization_config, or declares one ballast does
    # not implement, is refused in one line naming the cause (before, it loaded and was wrong).
    src = os.path.join(FIX, "qwen3_next_fp8")
    with tempfile.TemporaryDirectory() as tmp:
        for f in os.listdir(src):
            if f.endswith(".safetensors") and not f.startswith(("reference", "mtp_reference")):
                os.symlink(os.path.join(src, f), os.path.join(tmp, f))
        with open(os.path.join(src, "config.json")) as f:
            cfg = json.load(f)
        cases = [(None, "no quantization_config"), ({"quant_method": "gptq", "bits": 4}, "gptq"),
                 (dict(cfg["quantization_config"], activation_scheme="static"), "static")]
        for qc, needle in cases:
            c = dict(cfg)
            if qc is None:
                c.pop("quantization_config")
            else:
                c["quantization_config"] = qc
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(c, f)
            p = run([args.ballast, "generate", "--device", "cpu", "--model", tmp, "--prompt-ids", "1,2,3",
                     "--max-new-tokens", "2"], expect_rc=1)
            assert needle in p.stderr and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1, (needle, p.stderr)


def check_quantization_at_load(args):
    # --quantization fp8 quantizes a bf16 checkpoint's linear weights at load and says so; a
    # synthetic model takes --dtype fp8 instead, and is told so in one line.
    ref = reference("qwen3_next_a")
    p = run([args.ballast, "generate", "--device", "cpu", "--model", os.path.join(FIX, "qwen3_next_a"), "--prompt-ids",
             ",".join(map(str, ref["prompt_ids"])), "--max-new-tokens", "16", "--quantization", "fp8", "--json"])
    assert "quantized" in p.stderr and "linear weights to FP8" in p.stderr, p.stderr
    assert len(json.loads(p.stdout)["output_ids"]) == 16, p.stdout
    p = run([args.ballast, "bench", "--device", "cpu", "--synthetic", "mid-size", "--quantization", "fp8"], expect_rc=1)
    assert "--quantization applies to checkpoints" in p.stderr and p.stderr.count("\n") == 1, p.stderr


def check_text_prompt_and_tokenizer(args):
    # The default model with a text prompt: ids and text agree with the tokenizer's own CLI.
    j = json.loads(run([args.ballast, "generate", "--prompt", "def fibonacci(n):", "--max-new-tokens", "12",
                        "--json"]).stdout)
    assert isinstance(j["text"], str) and len(j["output_ids"]) == 12, j
    tok_dir = os.path.join(ROOT, "models", "default")
    ids = json.loads(run([args.ballast, "tokenize", "--tokenizer", tok_dir, "--json", "def fibonacci(n):"]).stdout)["ids"]
    assert ids and all(isinstance(i, int) for i in ids), ids
    text = run([args.ballast, "detokenize", "--tokenizer", tok_dir, ",".join(map(str, ids))]).stdout
    assert text.rstrip("\n") == "def fibonacci(n):", repr(text)
    # Speculation gives the same tokens and reports its acceptance.
    s = json.loads(run([args.ballast, "generate", "--prompt", "def fibonacci(n):", "--max-new-tokens", "12", "--json",
                        "--speculative-algorithm", "NEXTN", "--speculative-num-steps", "2"]).stdout)
    assert s["output_ids"] == j["output_ids"], (s["output_ids"], j["output_ids"])
    assert 1.0 <= s["acceptance_length"] <= 3.0, s


def check_inspect(args):
    j = json.loads(run([args.ballast, "inspect", "--model", os.path.join(FIX, "qwen3_5_moe_released"), "--json"]).stdout)
    text = json.dumps(j)
    assert "parameters" in text or "params" in text, j
    assert "quantization" not in j, j
    # An FP8 checkpoint: what is quantized (kinds, bytes, scales), what is not, and the parameter
    # count still matching the config (scales are no parameters).
    fp8 = os.path.join(FIX, "qwen3_next_fp8")
    j = json.loads(run([args.ballast, "inspect", "--model", fp8, "--json"]).stdout)
    q = j["quantization"]
    assert q["method"] == "fp8" and q["block"] == [128, 128], q
    assert q["fp8_tensors"] == q["scale_tensors"] > 0 and q["fp8_bytes"] > 100 * q["scale_bytes"] > 0, q
    for kind in ("mlp.experts.gate_proj.weight", "linear_attn.in_proj_qkvz.weight", "self_attn.q_proj.weight",
                 "mlp.shared_expert.down_proj.weight", "mtp.mlp.experts.up_proj.weight"):
        assert kind in q["fp8_kinds"], (kind, q["fp8_kinds"])
    for kind in ("lm_head.weight", "mlp.gate.weight", "linear_attn.in_proj_ba.weight", "mtp.fc.weight"):
        assert q["unquantized_kinds"][kind]["dtype"] == "BF16", (kind, q["unquantized_kinds"])
    assert j["checkpoint"]["trunk_matches_config"] and j["checkpoint"]["mtp_matches_config"], j["checkpoint"]
    text = run([args.ballast, "inspect", "--model", fp8]).stdout
    assert "quantization  fp8" in text and "mlp.experts.gate_proj.weight" in text, text


def check_bench_save(args):
    # bench --synthetic NAME --save DIR writes a checkpoint directory that --model loads: config.json
    # with both layer keys (as Qwen's releases; llama.cpp's converter reads the interval), bf16
    # weights, the shipped tokenizer. Refusals name the option.
    with tempfile.TemporaryDirectory() as tmp:
        d = os.path.join(tmp, "mid")
        run([args.ballast, "bench", "--synthetic", "mid-size", "--layers", "1", "--save", d])
        with open(os.path.join(d, "config.json")) as f:
            cfg = json.load(f)
        assert cfg["full_attention_interval"] == 4 and cfg["layer_types"] == ["linear_attention"], cfg
        assert cfg["num_hidden_layers"] == 1 and cfg["hidden_size"] == 1024 and cfg["max_position_embeddings"] > 0, cfg
        assert os.path.exists(os.path.join(d, "tokenizer.json")), os.listdir(d)
        j = json.loads(run([args.ballast, "bench", "--device", "cpu", "--threads", "2", "--model", d, "--batch", "1",
                            "--prompt-len", "8", "--decode-steps", "2", "--prefill", "8", "--repeats", "1",
                            "--json"]).stdout)
        assert j["params_total"] > 1e8 and j["decode"][0]["tokens_per_s"] > 0, j
        p = run([args.ballast, "bench", "--synthetic", "mid-size", "--layers", "1", "--save", d], expect_rc=1)
        assert "exists and is not empty" in p.stderr, p.stderr
        p = run([args.ballast, "bench", "--synthetic", "--dtype", "fp8", "--save", os.path.join(tmp, "x")], expect_rc=1)
        assert "bf16" in p.stderr, p.stderr
        p = run([args.ballast, "bench", "--save", os.path.join(tmp, "y")], expect_rc=1)
        assert "--synthetic" in p.stderr, p.stderr
        p = run([args.ballast, "bench", "--synthetic", "qwen3.5-397b-a17b", "--save", os.path.join(tmp, "z")], expect_rc=1)
        assert "--layers" in p.stderr and "memory" in p.stderr, p.stderr


def check_bench(args):
    # The sweep on the demo model (CPU): every batch and prefill length reported beside the ceilings,
    # ratios consistent with the figures, op profiles that name the ops, speculation per batch.
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        text = run([args.ballast, "bench", "--device", "cpu", "--threads", "2", "--batch", "1,3", "--prefill", "24,40",
                    "--prompt-len", "16", "--decode-steps", "4", "--repeats", "1", "--profile",
                    "--speculative-num-steps", "1,2", "--json-file", out]).stdout
        with open(out) as f:
            j = json.load(f)
    for head in ("ceilings", "decode at", "prefill of", "decode step, batch 1", "prefill pass, 24 tokens", "NEXTN"):
        assert head in text, (head, text)
    assert j["copy_bandwidth_gb_s"] > 0 and j["gemm_tflop_s"] > 0, j
    m = j["memory"]
    assert m["trunk_weights_gb"] > 0 and m["cache_gb"] > 0 and m["cache_rows"] > 0 and m["workspace_gb"] > 0, m
    assert 0 < m["device_free_gb"] <= m["device_total_gb"], m
    assert "GB of trunk weights" in text, text
    assert "OpenBLAS" in j["gemm"] or "ballast bf16" in j["gemm"], j
    assert [d["batch"] for d in j["decode"]] == [1, 3] and [p["tokens"] for p in j["prefill"]] == [24, 40], j
    for d in j["decode"]:
        assert d["tokens_per_s"] > 0 and abs(d["bandwidth_ratio"] - d["bandwidth_gb_s"] / j["copy_bandwidth_gb_s"]) < 1e-9, d
        assert abs(d["bytes_per_token"] * d["tokens_per_s"] - d["bandwidth_gb_s"] * 1e9) < 1e-3 * d["bandwidth_gb_s"] * 1e9, d
    for p in j["prefill"]:
        assert abs(p["tokens"] / p["seconds"] - p["tokens_per_s"]) < 1e-6 * p["tokens_per_s"], p
        assert abs(p["tflop_s"] / j["gemm_tflop_s"] - p["gemm_ratio"]) < 1e-9, p
    for prof in (j["decode_profile"], j["prefill_profile"]):
        ops = {o["op"]: o for o in prof["ops"]}
        assert "matmul" in ops and "moe_experts" in ops and "rms_norm" in ops, ops
        assert abs(sum(o["share"] for o in prof["ops"]) - 1) < 1e-9, prof
    assert "gated_delta_rule" in {o["op"] for o in j["prefill_profile"]["ops"]}
    assert [(s["batch"], s["num_steps"]) for s in j["speculative"]] == [(1, 1), (1, 2), (3, 1), (3, 2)], j
    assert all(1.0 <= s["acceptance_length"] <= s["num_steps"] + 1 for s in j["speculative"]), j
    for s in j["speculative"]:
        assert abs(s["round_in_plain_steps"] * s["speedup"] - s["acceptance_length"]) < 1e-9, s
    # A synthetic model gets its MTP head (one layer) when speculation is asked for: random drafts
    # are next to never accepted, the cost of a round is what such a run measures.
    text = run([args.ballast, "bench", "--device", "cpu", "--threads", "2", "--synthetic", "mid-size", "--layers", "1",
                "--batch", "1", "--prompt-len", "8", "--decode-steps", "4", "--repeats", "1",
                "--speculative-num-steps", "1"]).stdout
    assert "NEXTN" in text and "round/step" in text, text
    # Under expert parallelism (2 in-process ranks, attention data-parallel) the batch is split
    # over the ranks and every figure is the batch's.
    # Rebalancing as it runs: per-pass balancedness and each rebalance's moves and time in the JSON.
    plain = j
    j = json.loads(run([args.ballast, "bench", "--device", "cpu", "--threads", "1", "--ep", "2", "--batch", "1,3",
                        "--prefill", "24", "--prompt-len", "16", "--decode-steps", "4", "--repeats", "1",
                        "--ep-num-redundant-experts", "2", "--enable-eplb", "--eplb-rebalance-num-iterations", "4",
                        "--json"]).stdout)
    assert j["ranks"] == 2 and [d["batch"] for d in j["decode"]] == [1, 3], j
    assert all(d["tokens_per_s"] > 0 for d in j["decode"]) and j["prefill"][0]["tokens_per_s"] > 0, j
    ep = j["expert_parallel"]
    assert ep["ranks"] == 2 and ep["balancedness"] and all(0 < b <= 1 for b in ep["balancedness"]), ep
    assert ep["transport"] == "by the given data plane", ep  # threads moving host memory: no plane of the engine's
    assert ep["rebalances"] and all(r["total_ms"] >= 0 and r["bytes_moved"] >= 0 for r in ep["rebalances"]), ep
    # The ranks' expert slots hold the trunk's 32 experts and 2 redundant ones a layer (and the MTP
    # layer's), the only copy (the model keeps none under EP); rebalancing stages a chunk (all
    # layers) beside them. The weights counted are the same model's as without EP.
    m = j["memory"]
    assert m["expert_slots_gb"] >= m["routed_experts_gb"] * 34 / 32 > 0, m
    assert m["routed_experts_gb"] == plain["memory"]["routed_experts_gb"], (m, plain["memory"])
    assert m["trunk_weights_gb"] == plain["memory"]["trunk_weights_gb"], (m, plain["memory"])
    assert m["workspace_gb"] > 0, m
    assert m["migration_staging_gb"] > 0, m
    # Synthetic presets: unknown names and depths are refused naming what is known.
    p = run([args.ballast, "bench", "--device", "cpu", "--synthetic", "llama"], expect_rc=1)
    assert "qwen3-next-80b-a3b" in p.stderr, p.stderr
    p = run([args.ballast, "bench", "--device", "cpu", "--synthetic", "qwen3.5-397b-a17b", "--layers", "61"], expect_rc=1)
    assert "--layers 61" in p.stderr and "60 layers" in p.stderr, p.stderr
    p = run([args.ballast, "bench", "--device", "cpu", "--layers", "2"], expect_rc=1)
    assert "--synthetic" in p.stderr, p.stderr


def check_eplb_commands(args):
    # synth -> plan (deepseek, ballast for static and for balanced dispatch, from a current placement)
    # -> report -> replay, and bad input refused with a message naming the fault.
    b = [args.ballast, "eplb"]
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.safetensors")
        run(b + ["synth", "--model", "deepseek-v3", "--popularity", "zipf", "--skew", "0.9", "--layers", "2",
                 "--passes", "300", "--tokens", "4096", "--output", trace])
        plans = {}
        for name, extra in (("deepseek", ["--algorithm", "deepseek"]), ("static", []),
                            ("balanced", ["--dispatch", "balanced"])):
            out = os.path.join(tmp, name + ".json")
            text = run(b + ["plan", "--load", trace, "--ranks", "32", "--redundant", "32", "--output", out] + extra).stdout
            with open(out) as f:
                rows = json.load(f)["physical_to_logical_map"]
            assert len(rows) == 2 and all(len(r) == 288 and sorted(set(r)) == list(range(256)) for r in rows), name
            after = float(text.split("after ")[1].split()[0])
            components = int(text.split("replica graph components")[1].split("after ")[1].split()[0])
            plans[name] = (after, components, out)
        assert plans["static"][0] >= plans["deepseek"][0] - 1e-4, plans
        assert plans["balanced"][1] == 1 and plans["static"][1] > 1, plans
        # the forecast (default): this trace only random-walks, so no layer is planned for a trend;
        # with a steady trend both are, and --no-forecast plans every layer for the window itself.
        assert "forecast: 0 of 2 layers have a significant trend" in text, text
        moving = os.path.join(tmp, "moving.safetensors")
        run(b + ["synth", "--model", "deepseek-v3", "--popularity", "zipf", "--skew", "0.9", "--layers", "2",
                 "--passes", "300", "--tokens", "4096", "--trend", "1", "--output", moving])
        pm = b + ["plan", "--load", moving, "--ranks", "32", "--redundant", "32", "--dispatch", "balanced"]
        assert "forecast: 2 of 2 layers have a significant trend" in run(pm + ["--output", os.path.join(tmp, "m.json")]).stdout
        assert "forecast:" not in run(pm + ["--no-forecast", "--output", os.path.join(tmp, "n.json")]).stdout
        moved = run(b + ["plan", "--load", trace, "--ranks", "32", "--redundant", "32", "--current", plans["balanced"][2],
                         "--dispatch", "balanced", "--migration-weight", "0.5", "--output", os.path.join(tmp, "next.json")]).stdout
        assert "relative to the current placement" in moved, moved
        svg = os.path.join(tmp, "report.svg")
        report = run(b + ["report", "--load", trace, "--after", plans["static"][2], "--ranks", "32", "--svg", svg]).stdout
        assert "layer" in report and open(svg).read().lstrip().startswith("<svg"), report
        svg = os.path.join(tmp, "replay.svg")
        table = run(b + ["replay", "--trace", trace, "--interval", "100", "--ranks", "32", "--redundant", "32",
                         "--svg", svg]).stdout
        rows = {tuple(c.strip() for c in line.split("|")[1:3]): float(line.split("|")[3]) for line in table.splitlines()
                if line.startswith("| ") and line.split("|")[3].strip()[:1].isdigit()}
        assert set(rows) == {(a, d) for a in ("deepseek", "ballast") for d in ("static", "balanced")}, table
        assert rows[("ballast", "balanced")] >= 0.97 and rows[("ballast", "balanced")] > rows[("deepseek", "balanced")], table
        assert open(svg).read().lstrip().startswith("<svg")
        bad = {"ragged.json": ('{"logical_count": [[1,2,3,4],[1,2]]}', "ragged"),
               "negative.json": ('{"logical_count": [[1,-2,3,4]]}', "-2"),
               "broken.json": ('{"logical_count": [[1,2,3,4]]', "not valid JSON")}
        for name, (content, message) in bad.items():
            path = os.path.join(tmp, name)
            with open(path, "w") as f:
                f.write(content)
            err = run(b + ["plan", "--load", path, "--ranks", "2", "--redundant", "0", "--output", path + ".out"], 1).stderr
            assert name in err and message in err, (name, err)
        ok = os.path.join(tmp, "ok.json")
        with open(ok, "w") as f:
            f.write('{"logical_count": [[1,2,3,4]]}')
        for extra, message, rc in ((["--ranks", "3", "--redundant", "0"], "not divisible by 3 ranks", 1),
                                   (["--ranks", "2", "--redundant", "-2"], "--redundant: Value -2 not in range", 2),
                                   (["--ranks", "2", "--redundant", "0", "--dispatch", "fastest"], "unknown dispatch", 1)):
            err = run(b + ["plan", "--load", ok, "--output", ok + ".out"] + extra, rc).stderr
            assert message in err, (extra, err)


def check_signals(args):
    # SIGINT/SIGTERM during generate on in-process ranks: every rank stops at its next step, what was
    # generated is printed (JSON with "stopped"), exit 128 + the signal.
    with tempfile.TemporaryDirectory() as tmp:
        prompts = os.path.join(tmp, "p.txt")
        with open(prompts, "w") as f:
            f.write("1,2,3\n4,5,6\n7,8\n")
        for sig, code, name in ((signal.SIGINT, 130, "Interrupt"), (signal.SIGTERM, 143, "Terminated")):
            p = subprocess.Popen([args.ballast, "generate", "--ep", "2", "--prompts-file", prompts, "--max-new-tokens",
                                  "4000", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(3)
            t0 = time.time()
            p.send_signal(sig)
            out, err = p.communicate(timeout=60)
            assert p.returncode == code, (name, p.returncode, err)
            assert time.time() - t0 < 30, "stopping took too long"
            j = json.loads(out)
            assert j["stopped"] == name and len(j["output_ids"]) == 3, j
            assert all(len(o) < 4000 for o in j["output_ids"]), [len(o) for o in j["output_ids"]]
            assert "stopping at the next step" in err, err


def check_mpi_watchdog(args):
    # Under mpirun, a rank that stops answering (SIGSTOP) ends the job within --dist-timeout and a
    # few seconds, with one error line naming the wait; before, the other rank busy-waited for ever.
    if not args.mpirun:
        print("skipped: no mpirun")
        return
    with tempfile.TemporaryDirectory() as tmp:
        prompts = os.path.join(tmp, "p.txt")
        with open(prompts, "w") as f:
            f.write("1,2,3\n4,5,6\n")
        cmd = args.mpirun.split() + ["-np", "2", args.ballast, "generate", "--prompts-file", prompts,
                                     "--max-new-tokens", "4000", "--dist-timeout", "3"]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        stopped = None
        try:
            # Rank 1's process, once both ranks are generating (the first collectives are done).
            deadline = time.time() + 60
            while stopped is None and time.time() < deadline:
                time.sleep(0.5)
                for pid in os.listdir("/proc"):
                    try:
                        with open(f"/proc/{pid}/environ", "rb") as f:
                            env = f.read().split(b"\0")
                        with open(f"/proc/{pid}/cmdline", "rb") as f:
                            argv = f.read().split(b"\0")
                    except OSError:
                        continue
                    if b"OMPI_COMM_WORLD_RANK=1" in env and argv[0].endswith(b"ballast") and prompts.encode() in argv:
                        stopped = int(pid)
            assert stopped is not None, "rank 1 never started"
            time.sleep(3)
            os.kill(stopped, signal.SIGSTOP)
            t0 = time.time()
            out, err = p.communicate(timeout=90)
            took = time.time() - t0
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            if stopped is not None:
                try:
                    os.kill(stopped, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        assert p.returncode != 0, (p.returncode, out, err)
        assert "(--dist-timeout); ending the job" in err and "for the other ranks" in err, err
        assert took < 60, f"the job took {took:.0f} s to end"


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("check", choices=sorted(CHECKS))
    ap.add_argument("--ballast", required=True)
    ap.add_argument("--mpirun", default="")
    a = ap.parse_args()
    CHECKS[a.check](a)
    print(f"{a.check}: ok")

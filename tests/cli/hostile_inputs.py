#!/usr/bin/env python3
"""Hostile inputs (issue 16), one table: each case makes its files, runs one command and states the
exit code and a part of the one-line error it must give, within a time bound (a hang fails) and,
outside sanitizer builds, a memory bound (an unbounded allocation fails). Every case crashed, hung,
allocated without bound, answered silently wrong or gave an unclear error at commit 28fc4d2.

    hostile_inputs.py --ballast BIN [--sanitized] [--only SUBSTRING]
"""
import argparse
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "tests", "fixtures")
DEMO = os.path.join(ROOT, "models", "default")
TIMEOUT_S = 120           # a hang is a failure, not a stuck CI job
MEMORY_BYTES = 6 << 30    # address space per command (not under ASan, which reserves terabytes)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
    return path


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        return header, f.read()


def write_safetensors(path, header, data):
    h = json.dumps(header).encode()
    h += b" " * (-(8 + len(h)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)
    return path


def load_file(tmp, name, shape, offsets, dtype="I32", data=b""):
    entry = {"shape": shape, "data_offsets": offsets}
    if dtype:
        entry["dtype"] = dtype
    return write_safetensors(os.path.join(tmp, name), {"logical_count": entry}, data)


def model_dir(tmp, name, fixture="qwen3_next_a", config=None, weights=None, extra_files=()):
    """A copy of a fixture model: config edited by `config(c)`, model.safetensors rewritten by
    `weights(header, data) -> (header, data)`, the other files linked."""
    src, d = os.path.join(FIX, fixture), os.path.join(tmp, name)
    os.makedirs(d)
    for f in os.listdir(src):
        if f.startswith(("reference", "mtp_reference")) or f in ("config.json", "model.safetensors"):
            continue
        os.symlink(os.path.join(src, f), os.path.join(d, f))
    with open(os.path.join(src, "config.json")) as f:
        c = json.load(f)
    if config:
        config(c)
    write_json(os.path.join(d, "config.json"), c)
    if weights:
        write_safetensors(os.path.join(d, "model.safetensors"), *weights(*read_safetensors(os.path.join(src, "model.safetensors"))))
    else:
        os.symlink(os.path.join(src, "model.safetensors"), os.path.join(d, "model.safetensors"))
    return d


def raw_config_dir(tmp, name, text):
    """A model directory holding only config.json with `text` in it, as is."""
    d = os.path.join(tmp, name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write(text)
    return d


def tokenizer_dir(tmp, name, tokenizer=None, config=None, generation=None):
    d = os.path.join(tmp, name)
    os.makedirs(d)
    for f, edit in (("tokenizer.json", tokenizer), ("tokenizer_config.json", config),
                    ("generation_config.json", generation)):
        with open(os.path.join(DEMO, f)) as fh:
            j = json.load(fh)
        if edit:
            edit(j)
        write_json(os.path.join(d, f), j)
    return d


def nan_weight(header, data):
    t = header["model.norm.weight"]
    assert t["dtype"] == "F32"
    b = bytearray(data)
    b[t["data_offsets"][0]:t["data_offsets"][0] + 4] = struct.pack("<f", float("nan"))
    return header, bytes(b)


def int_weight(header, data):
    header["model.norm.weight"]["dtype"] = "I32"  # same size: the file stays valid
    return header, data


def extra_tensor(header, data):
    end = len(data)
    header["model.layers.0.mlp.gate.bias"] = {"dtype": "F32", "shape": [1], "data_offsets": [end, end + 4]}
    return header, data + b"\0\0\0\0"


def fp8_without_scales(tmp):
    src, d = os.path.join(FIX, "qwen3_next_fp8"), os.path.join(tmp, "fp8_noscale")
    os.makedirs(d)
    for f in os.listdir(src):
        if f.startswith(("reference", "mtp_reference")):
            continue
        if f == "model.safetensors":
            header, data = read_safetensors(os.path.join(src, f))
            name = next(k for k in sorted(header) if k.endswith("o_proj.weight_scale_inv"))
            header[name[:-len("_scale_inv")] + "_scale_lost"] = header.pop(name)
            write_safetensors(os.path.join(d, f), header, data)
        else:
            os.symlink(os.path.join(src, f), os.path.join(d, f))
    return d


def prompts_file(tmp, name, lines):
    path = os.path.join(tmp, name)
    with open(path, "w") as f:
        for ids in lines:
            f.write(",".join(map(str, ids)) + "\n")
    return path


def cases(b, tmp):
    """(name, argv, exit code, text the error line holds, or for rc 0 a check of stdout)."""
    F = os.path.join(FIX, "qwen3_next_a")
    gen = [b, "generate", "--model", F, "--prompt-ids", "1,2,3", "--max-new-tokens", "2"]
    ok_load = write_json(os.path.join(tmp, "ok.json"), {"logical_count": [[1, 2, 3, 4], [4, 3, 2, 1]]})
    nr4 = write_json(os.path.join(tmp, "nr4.json"), {"physical_to_logical_map": [[0, 1, 2, 3]], "num_ranks": 4})
    plan = [b, "eplb", "plan", "--load", ok_load]
    return [
        # --- crashes and memory errors
        ("load shape [2^62,1,1]", [b, "eplb", "plan", "--load", load_file(tmp, "a.safetensors", [2**62, 1, 1], [0, 0]),
                                  "--ranks", "1", "--redundant", "0"], 1, "beyond the limits"),
        ("load shape [2^62+1,1,1]", [b, "eplb", "report", "--load", load_file(tmp, "b.safetensors", [2**62 + 1, 1, 1], [0, 0]),
                                    "--after", nr4], 1, "beyond the limits"),
        ("load entry without dtype", [b, "eplb", "replay", "--trace",
                                      load_file(tmp, "c.safetensors", [1, 2, 2], [0, 16], None, b"\0" * 16),
                                      "--ranks", "1", "--redundant", "0"], 1, 'no "dtype"'),
        ("load shape [2^40]^3", [b, "eplb", "plan", "--load", load_file(tmp, "d.safetensors", [2**40] * 3, [0, 0]),
                                 "--ranks", "1", "--redundant", "0"], 1, "beyond the limits"),
        ("load offsets past the file", [b, "eplb", "plan", "--load", load_file(tmp, "e.safetensors", [1, 1, 2], [0, 2**63]),
                                        "--ranks", "1", "--redundant", "0"], 1, "holds 9223372036854775808"),
        ("replay --ranks 0", [b, "eplb", "replay", "--trace", ok_load, "--ranks", "0", "--redundant", "0"], 2, "--ranks"),
        ("plan --redundant 2^31-1", plan + ["--ranks", "1", "--redundant", "2147483647"], 2, "--redundant"),
        ("plan --current entry 2^31-1", plan + ["--ranks", "1", "--redundant", "0", "--current",
                                               write_json(os.path.join(tmp, "cur.json"),
                                                          {"physical_to_logical_map": [[0, 1, 2, 2147483647]]})],
         1, "physical_to_logical_map[0][3] is 2147483647"),
        # --- hangs
        ("generate --threads 100000", gen + ["--threads", "100000"], 2, "--threads"),
        ("config.json with a number beyond a double (was: a raw library error)",
         [b, "inspect", "--model", raw_config_dir(tmp, "huge_number", '{"num_hidden_layers": 1e400}')], 1,
         "malformed JSON"),
        ("config num_hidden_layers 2^31-1", [b, "generate", "--model",
                                             model_dir(tmp, "layers", config=lambda c: c.update(num_hidden_layers=2**31 - 1)),
                                             "--prompt-ids", "1,2"], 1, '"num_hidden_layers" is 2147483647'),
        ("plan --redundant 1000000", plan + ["--ranks", "4", "--redundant", "1000000"], 2, "--redundant"),
        ("plan --ranks 1000000", plan + ["--ranks", "1000000", "--redundant", "999996"], 2, "--ranks"),
        ("replay random dispatch of 1e15 tokens",
         [b, "eplb", "replay", "--trace",
          write_json(os.path.join(tmp, "huge.json"), {"logical_count": [[[10**15, 1, 2, 3]], [[10**15, 1, 2, 3]]]}),
          "--ranks", "2", "--redundant", "2", "--dispatch", "random", "--interval", "1"], 0, "| ballast | random |"),
        # --- unbounded memory
        ("a 1M-token prompt", [b, "generate", "--prompts-file", prompts_file(tmp, "long.txt", [[7] * 1000000]),
                               "--max-new-tokens", "2"], 1, "more than --max-total-tokens 65536 (the default)"),
        ("a prompt beyond --max-total-tokens", gen + ["--max-total-tokens", "2"], 1, "--max-total-tokens 2"),
        ("--max-total-tokens 4e9 (past 32-bit slot ids)", gen + ["--max-total-tokens", "4000000000"], 1,
         "32-bit slot ids"),
        ("--mem-fraction-static 1.5", gen + ["--mem-fraction-static", "1.5"], 2, "--mem-fraction-static"),
        ("--mem-fraction-static with --max-total-tokens", gen + ["--mem-fraction-static", "0.5", "--max-total-tokens", "9"],
         2, "excludes"),
        # keeping 99% of the host's memory free leaves no room for a cache
        ("--mem-fraction-static 0.01", gen + ["--mem-fraction-static", "0.01"], 1, "no room for a KV cache"),
        # 70 prompts: at most 64 run at once (their DeltaNet state slots), the cache sized for them
        ("70 prompts, bounded running set", [b, "generate", "--prompts-file",
                                             prompts_file(tmp, "many.txt", [[i + 1, 2, 3] for i in range(70)]),
                                             "--max-new-tokens", "2", "--json"], 0,
         '"cache":{"context_length":1120,"max_running_requests":64,"max_total_tokens":1120}'),
        ("bench --batch 4096 --prompt-len 1048576", [b, "bench", "--device", "cpu", "--batch", "4096", "--prompt-len",
                                                     "1048576", "--decode-steps", "1", "--repeats", "1"],
         1, "cannot be allocated"),
        ("tokenizer vocab id 1e8", [b, "tokenize", "--tokenizer",
                                    tokenizer_dir(tmp, "tok_id", tokenizer=lambda j: j["model"]["vocab"].update(zzzq=10**8)),
                                    "hi"], 1, "vocab['zzzq'] is 100000000"),
        ("tokenizer vocab id 2^30", [b, "tokenize", "--tokenizer",
                                     tokenizer_dir(tmp, "tok_id30", tokenizer=lambda j: j["model"]["vocab"].update(zzzq=2**30)),
                                     "hi"], 1, "not an id"),
        ("--ep-num-redundant-experts 65536", gen + ["--ep", "2", "--ep-num-redundant-experts", "65536"], 1,
         "--ep-num-redundant-experts: 65536 redundant slots"),
        # --- silently wrong output
        ("--temperature nan", gen + ["--temperature", "nan"], 2, "--temperature"),
        ("NaN weights", [b, "generate", "--model", model_dir(tmp, "nan", weights=nan_weight), "--prompt-ids", "1,2"], 1,
         "model.norm.weight' holds a NaN"),
        ("synth --skew nan", [b, "eplb", "synth", "--skew", "nan", "--output", os.path.join(tmp, "s.json")], 2, "--skew"),
        ("synth --skew inf", [b, "eplb", "synth", "--skew", "inf", "--output", os.path.join(tmp, "s.json")], 2, "--skew"),
        ("synth --drift nan", [b, "eplb", "synth", "--drift", "nan", "--output", os.path.join(tmp, "s.json")], 2, "--drift"),
        ("detokenize 4294967297", [b, "detokenize", "--tokenizer", DEMO, "4294967297"], 1, "'4294967297'"),
        ("detokenize {\"ids\": [4294967297]}", [b, "detokenize", "--tokenizer", DEMO, '{"ids": [4294967297]}'], 1,
         "ids[0] is 4294967297"),
        ("eos_token_id 2^32+5", [b, "tokenize", "--tokenizer",
                                 tokenizer_dir(tmp, "tok_eos", generation=lambda j: j.update(eos_token_id=2**32 + 5)),
                                 "hi"], 1, "eos_token_id 4294967301"),
        ("I32 weights", [b, "generate", "--model", model_dir(tmp, "int", weights=int_weight), "--prompt-ids", "1,2"], 1,
         "is I32"),
        ("FP8 weights without scales", [b, "generate", "--device", "cpu", "--model", fp8_without_scales(tmp),
                                        "--prompt-ids", "1,2"], 1, "has no block scales"),
        ("a tensor nothing uses", [b, "generate", "--model", model_dir(tmp, "extra", weights=extra_tensor),
                                   "--prompt-ids", "1,2"], 1, "'model.layers.0.mlp.gate.bias'"),
        ("--seed -1", gen + ["--seed", "-1"], 2, "--seed"),
        ("--cuda-graph-bs 0", gen + ["--cuda-graph-bs", "1,0,8"], 2, "--cuda-graph-bs"),
        ("--cuda-graph-bs x", gen + ["--cuda-graph-bs", "4,x"], 2, "--cuda-graph-bs"),
        ("a prompt beyond max_position_embeddings", [b, "generate", "--model", F, "--prompt-ids",
                                                     ",".join(["5"] * 600)], 1, "max_position_embeddings"),
        ("--init-expert-location without --ep", gen + ["--init-expert-location", nr4], 1, "no expert parallelism"),
        ("placement num_ranks 4 under --ep 2", gen + ["--ep", "2", "--init-expert-location",
                                                      write_json(os.path.join(tmp, "p4.json"),
                                                                 {"physical_to_logical_map": [list(range(8))],
                                                                  "num_ranks": 4})], 1, "num_ranks is 4 but 2"),
        ("report --ranks 2 of a num_ranks 4 file", [b, "eplb", "report", "--load", ok_load, "--after", nr4, "--ranks", "2"],
         1, "num_ranks is 4 but 2"),
        ("--ep-ranks-per-node 3 under --ep 2", gen + ["--ep", "2", "--ep-ranks-per-node", "3"], 1, "--ep-ranks-per-node 3"),
        # --- unclear errors
        ("chat_template entry not an object", [b, "tokenize", "--tokenizer",
                                               tokenizer_dir(tmp, "tok_chat", config=lambda j: j.update(chat_template=[1])),
                                               "hi"], 1, "chat_template[0]"),
        ("num_ranks a string", [b, "eplb", "report", "--load", ok_load, "--after",
                                write_json(os.path.join(tmp, "nrs.json"),
                                           {"physical_to_logical_map": [[0, 1, 2, 3]], "num_ranks": "x"})],
         1, 'num_ranks must be an integer in [1, 1024], got "x"'),
        ("detokenize 10^23 (was: error: stol)", [b, "detokenize", "--tokenizer", DEMO, "99999999999999999999999"], 1,
         "is not a token id"),
        ("a count of 1e308 (was: not a whole number)", plan[:3] + ["--load", write_json(os.path.join(tmp, "big.json"),
                                                                                      {"logical_count": [[1e308, 1]]}),
                                                                  "--ranks", "1", "--redundant", "0"], 1, "<= 2^53"),
        ("control bytes in an error line", [b, "eplb", "plan", "--load", os.path.join(tmp, "no\x1b[31mfile\nx.json"),
                                            "--ranks", "1", "--redundant", "0"], 1, "no\\x1B[31mfile\\x0Ax.json"),
    ]


def limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))


def run_case(name, argv, rc, needle, sanitized):
    t0 = time.time()
    try:
        p = subprocess.run(argv, capture_output=True, timeout=TIMEOUT_S, preexec_fn=None if sanitized else limit_memory)
    except subprocess.TimeoutExpired:
        return f"{name}: still running after {TIMEOUT_S} s"
    out, err = p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
    if sanitized:  # ASan's own note on an allocation it refused (allocator_may_return_null=1)
        err = "".join(l for l in err.splitlines(True) if "AddressSanitizer failed to allocate" not in l)
    took = time.time() - t0
    if p.returncode != rc:
        return f"{name}: exit {p.returncode}, expected {rc}\nstderr: {err[-2000:]}"
    if rc == 0:
        return None if needle in out else f"{name}: '{needle}' not in the output\n{out[-2000:]}"
    if not (err.startswith("error: ") and err.count("\n") == 1 and needle in err):
        return f"{name}: expected one line 'error: ...{needle}...', got\n{err[-2000:]}"
    if any(ord(c) < 0x20 and c != "\n" for c in err):
        return f"{name}: a raw control byte in the error line: {err!r}"
    print(f"ok {name} ({took:.1f} s): {err.strip()[:160]}")
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ballast", required=True)
    ap.add_argument("--sanitized", action="store_true", help="no memory limit (ASan reserves its shadow)")
    ap.add_argument("--only", default="")
    a = ap.parse_args()
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, argv, rc, needle in cases(a.ballast, tmp):
            if a.only in name:
                bad = run_case(name, argv, rc, needle, a.sanitized)
                if bad:
                    failures.append(bad)
    if failures:
        sys.exit("\n\n".join(failures))
    print("hostile_inputs: ok")


if __name__ == "__main__":
    main()

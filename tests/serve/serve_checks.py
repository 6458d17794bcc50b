#!/usr/bin/env python3
"""End-to-end checks of `ballast serve`, one per CTest test: `serve_checks.py CHECK --ballast BIN ...`.

Each check starts real servers on the shipped demo model and talks to them over HTTP: OpenAI's own
client (node, the `openai` npm package), curl for SGLang's endpoints, promtool for /metrics. The
expected outputs come from `ballast generate` (no server) or from the same request sent alone."""
import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "models", "default")


def run(cmd, expect_rc=0, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    if p.returncode != expect_rc:
        sys.exit(f"command {cmd} exited {p.returncode} (expected {expect_rc})\nstdout: {p.stdout}\nstderr: {p.stderr}")
    return p


class Server:
    """`ballast serve --port 0 ...` (or under a launcher), ready once /health answers."""

    def __init__(self, args, extra, launcher=(), cwd=None, binary=None):
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        cmd = list(launcher) + [binary or args.ballast, "serve", "--port", "0"] + extra
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
        deadline = time.time() + 120
        self.url = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"server exited {self.proc.returncode}:\n{self.output()}")
            m = re.search(r"on (http://[\d.]+:\d+)", self.output())
            if m:
                self.url = m.group(1)
                try:
                    if urllib.request.urlopen(self.url + "/health", timeout=5).status == 200:
                        return
                except (urllib.error.URLError, ConnectionError):
                    pass
            time.sleep(0.1)
        self.stop()
        sys.exit(f"server did not start:\n{self.output()}")

    def output(self):
        with open(self.log.name) as f:
            return f.read()

    def request(self, path, body=None, method=None, timeout=300):
        """(status, headers, parsed JSON or text)."""
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method or ("POST" if data is not None else "GET"))
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, headers, raw = r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            status, headers, raw = e.code, dict(e.headers), e.read()
        text = raw.decode("utf-8", "replace")
        try:
            return status, headers, json.loads(text)
        except json.JSONDecodeError:
            return status, headers, text

    def metrics(self):
        status, _, text = self.request("/metrics")
        assert status == 200
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def stop(self, sig=signal.SIGTERM, timeout=60):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)  # its own session: the server and, under mpirun, its ranks
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                sys.exit(f"server did not stop within {timeout} s:\n{self.output()}")
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def generate_ref(args, extra):
    return json.loads(run([args.ballast, "generate", "--model", MODEL, "--json"] + extra).stdout)


def complete(server, prompt_ids, max_tokens):
    """Greedy ids through SGLang's /generate (the end of sequence ignored: every length is exact)."""
    status, _, r = server.request("/generate", {"input_ids": prompt_ids, "sampling_params": {
        "max_new_tokens": max_tokens, "temperature": 0, "ignore_eos": True}})
    assert status == 200, (status, r)
    return r["output_ids"]


# --- checks ---

def check_openai_client(args):
    prompt, chat_prompt, n = "def fibonacci(n):", "Write a haiku about the sea", 24
    gen = generate_ref(args, ["--prompt", prompt, "--max-new-tokens", str(n)])
    chat = generate_ref(args, ["--prompt", chat_prompt, "--chat", "--max-new-tokens", str(n)])
    ref = {"model": "demo", "prompt": prompt, "text": gen["text"], "prompt_tokens": gen["prefill_tokens"],
           "max_tokens": n, "chat_prompt": chat_prompt, "chat_text": chat["text"],
           "chat_prompt_tokens": chat["prefill_tokens"]}
    assert len(gen["output_ids"]) == n, gen
    with Server(args, ["--model", MODEL, "--served-model-name", "demo"]) as s:
        p = subprocess.run(["node", os.path.join(ROOT, "tests", "serve", "openai_client.mjs"), s.url + "/v1",
                            json.dumps(ref)], capture_output=True, text=True, timeout=300, cwd=ROOT)
        print(p.stdout, p.stderr)
        assert p.returncode == 0, "the openai client's checks failed"
        assert s.stop() == 0


def curl(server, path, body=None):
    cmd = ["curl", "-sS", "-w", "\n%{http_code}", server.url + path]
    if body is not None:
        cmd += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
    out = run(cmd).stdout
    text, code = out.rsplit("\n", 1)
    try:
        return int(code), json.loads(text)
    except json.JSONDecodeError:
        return int(code), text


def check_sglang_endpoints(args):
    prompt = "import numpy as np\n"
    gen = generate_ref(args, ["--prompt", prompt, "--max-new-tokens", "12"])
    ids = json.loads(run([args.ballast, "tokenize", "--tokenizer", MODEL, "--json", prompt]).stdout)["ids"]
    with tempfile.TemporaryDirectory() as tmp, Server(args, [
            "--model", MODEL, "--ep", "2", "--ep-num-redundant-experts", "2", "--expert-distribution-recorder-dir", tmp,
            "--cuda-graph-bs", "8,1,3,2", "--cuda-graph-max-bs", "4"]) as s:
        code, r = curl(s, "/generate", {"text": prompt, "sampling_params": {"max_new_tokens": 12, "temperature": 0}})
        assert code == 200 and r["output_ids"] == gen["output_ids"] and r["text"] == gen["text"], r
        assert r["meta_info"]["finish_reason"] == {"type": "length", "length": 12}, r
        assert r["meta_info"]["prompt_tokens"] == len(ids) and r["meta_info"]["completion_tokens"] == 12, r
        code, r2 = curl(s, "/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 12, "temperature": 0},
                                         "return_logprob": True, "top_logprobs_num": 2})
        assert code == 200 and r2["output_ids"] == gen["output_ids"], r2
        lps = r2["meta_info"]["output_token_logprobs"]
        assert [t[1] for t in lps] == gen["output_ids"] and all(t[0] <= 0 for t in lps), lps
        assert all(top[0][1] == t[1] for top, t in zip(r2["meta_info"]["output_top_logprobs"], lps))
        # Streamed: cumulative text, [DONE] last.
        out = run(["curl", "-sN", s.url + "/generate", "-d", json.dumps(
            {"text": prompt, "stream": True, "sampling_params": {"max_new_tokens": 12, "temperature": 0}})]).stdout
        events = [e[len("data: "):] for e in out.split("\n\n") if e.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["text"] == gen["text"], events
        code, t = curl(s, "/tokenize", {"prompt": prompt})
        assert code == 200 and t["tokens"] == ids and t["count"] == len(ids), t
        code, d = curl(s, "/detokenize", {"tokens": gen["output_ids"]})
        assert code == 200 and d["text"] == gen["text"], d
        assert curl(s, "/health")[0] == 200 and curl(s, "/health_generate")[0] == 200
        code, info = curl(s, "/get_model_info")
        assert code == 200 and info["is_generation"] and os.path.samefile(info["model_path"], MODEL), info
        code, info = curl(s, "/get_server_info")
        assert code == 200 and info["ep_size"] == 2 and info["ep_num_redundant_experts"] == 2, info
        assert info["cuda_graph_bs"] == [1, 2, 3] and info["cuda_graph_max_bs"] == 4, info
        assert info["disable_cuda_graph"] is False, info
        code, text = curl(s, "/flush_cache", {})
        assert code == 200, text
        # The recorder: start, generate, dump; the file is what --dump-expert-distribution writes.
        assert curl(s, "/start_expert_distribution_record", {})[0] == 200
        curl(s, "/generate", {"text": prompt, "sampling_params": {"max_new_tokens": 8, "temperature": 0}})
        assert curl(s, "/stop_expert_distribution_record", {})[0] == 200
        code, dump = curl(s, "/dump_expert_distribution_record", {})
        assert code == 200 and dump["path"].startswith(tmp), dump
        with open(dump["path"]) as f:
            load = json.load(f)
        ref_path = os.path.join(tmp, "ref.json")
        run([args.ballast, "generate", "--model", MODEL, "--prompt", prompt, "--max-new-tokens", "8", "--ep", "2",
             "--ep-num-redundant-experts", "2", "--dump-expert-distribution", ref_path])
        with open(ref_path) as f:
            ref_load = json.load(f)
        assert load.keys() == ref_load.keys(), (load.keys(), ref_load.keys())
        # One request alone in both: the same tokens routed, the same counts.
        assert load["logical_count"] == ref_load["logical_count"], "dump differs from generate's"
        assert sum(map(sum, load["logical_count"])) > 0
        run([args.ballast, "eplb", "plan", "--load", dump["path"], "--ranks", "2", "--redundant", "2",
             "--output", os.path.join(tmp, "placement.json")])
        assert s.stop() == 0


def check_metrics_promtool(args):
    with Server(args, ["--model", MODEL, "--ep", "2", "--ep-num-redundant-experts", "2", "--enable-eplb",
                       "--eplb-rebalance-num-iterations", "4", "--speculative-algorithm", "NEXTN",
                       "--speculative-num-steps", "2"]) as s:
        for i in range(3):
            complete(s, [1 + i, 2, 3, 4], 16)
        status, _, text = s.request("/metrics")
        p = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert p.returncode == 0, f"promtool: {p.stdout}{p.stderr}\n{text}"
        m = s.metrics()
        assert m['ballast_requests_total{outcome="length"}'] == 3, m
        assert m["ballast_generation_tokens_total"] >= 48 and m["ballast_prompt_tokens_total"] == 12, m
        assert m["ballast_time_to_first_token_seconds_count"] == 3 and m["ballast_e2e_request_latency_seconds_count"] == 3
        assert m["ballast_time_per_output_token_seconds_count"] == 3
        assert m['ballast_eplb_rebalances_total{domain="trunk"}'] >= 1, m
        assert 0 < m['ballast_expert_balancedness{domain="trunk"}'] <= 1, m
        assert m["ballast_spec_acceptance_length"] > 1, m
        assert m["ballast_running_sequences"] == 0 and m["ballast_queue_depth"] == 0
        assert s.stop() == 0


def mixed_prompts(n=64, seed=7):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = [1, 300, 2, 150][i] if i < 4 else rng.randint(1, 200)
        out.append(([rng.randrange(8000) for _ in range(length)], rng.randint(1, 24)))
    return out


def check_batching_invariance(args):
    prompts = mixed_prompts()
    with Server(args, ["--model", MODEL]) as s:
        alone = [complete(s, p, n) for p, n in prompts]  # one at a time
        assert s.stop() == 0
    for extra in (["--ep", "4", "--ep-num-redundant-experts", "4", "--enable-eplb", "--eplb-rebalance-num-iterations",
                   "8", "--eplb-rebalance-layers-per-chunk", "2", "--ep-dispatch-algorithm", "balanced",
                   "--max-running-requests", "8", "--chunked-prefill-size", "256"],
                  # A cache of 700 rows for 16 running sequences: some are preempted and recomputed (with
                  # 1,200 the run sometimes had none, when the requests came in slower than they finished).
                  ["--speculative-algorithm", "NEXTN", "--speculative-num-steps", "2", "--max-running-requests", "16",
                   "--chunked-prefill-size", "256", "--max-total-tokens", "700"]):
        with Server(args, ["--model", MODEL] + extra) as s:
            with ThreadPoolExecutor(64) as pool:
                together = list(pool.map(lambda pn: complete(s, *pn), prompts))
            for i, (a, b) in enumerate(zip(alone, together)):
                assert a == b, (extra, i, len(prompts[i][0]), a, b)
            m = s.metrics()
            if "--enable-eplb" in extra:
                assert m['ballast_eplb_rebalances_total{domain="trunk"}'] >= 1, m
            else:
                assert m["ballast_spec_acceptance_length"] > 1, m
                assert m["ballast_preemptions_total"] > 0, m
            assert s.stop() == 0


def check_bad_requests(args):
    with Server(args, ["--model", MODEL, "--context-length", "64", "--max-request-bytes", "4096"]) as s:
        cases = [
            ("/v1/completions", b'{"prompt": "x", ', 400, "malformed JSON"),
            ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
            ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
            ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
            ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
            ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "gpt-4"),
            ("/v1/completions", {"prompt": ""}, 400, "empty"),
            ("/v1/completions", {"prompt": "word " * 80}, 400, "context length"),
            ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
            ("/v1/completions", {"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
            ("/v1/completions", {"prompt": "x", "max_tokens": 64}, 400, "context length"),
            ("/v1/completions", {"prompt": [1, 2, 99999999]}, 400, "vocabulary"),
            ("/v1/completions", b'{"prompt": "\xff\xfe"}', 400, "UTF-8"),
            ("/v1/completions", b'{"prompt": "x", "temperature": 1e400}', 400, "malformed JSON"),  # was a 500
            ("/v1/completions", {"prompt": "x" * 5000}, 413, "limit"),
            ("/v1/completions", {"prompt": "x", "n": 2}, 400, "'n'"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, 400, "logprobs"),
            ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": 0}}, 400, "max_new_tokens"),
            ("/v1/nothing", {}, 404, "no endpoint"),
        ]
        for path, body, code, needle in cases:
            status, _, r = s.request(path, body)
            assert status == code, (path, body, status, r)
            err = r["error"]
            assert needle.lower() in err["message"].lower(), (path, body, err)
            assert err["type"] and err["code"] == code, err
            assert "\n" not in err["message"], err
        status, _, r = s.request("/v1/models", method="DELETE")
        assert status == 404 and "no endpoint" in r["error"]["message"], r
        # ...and the server goes on serving.
        status, _, r = s.request("/v1/completions", {"prompt": "def", "max_tokens": 4, "temperature": 0})
        assert status == 200 and r["usage"]["completion_tokens"] >= 1, r
        assert s.metrics()['ballast_requests_refused_total{reason="invalid"}'] == len(cases) + 1
        assert s.stop() == 0


def wait_for(pred, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def open_stream(server, body, first_event=True):
    """A raw streaming request: returns the response once it started (and sent its first event)."""
    import http.client
    host, port = server.url[len("http://"):].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.status
    if first_event:
        first = resp.readline()
        assert first.startswith(b"data: "), first
    return conn, resp


def check_disconnect_frees_sequence(args):
    with Server(args, ["--model", MODEL]) as s:
        conn, resp = open_stream(s, {"prompt": "def", "max_tokens": 3000, "temperature": 0, "ignore_eos": True,
                                     "stream": True})
        assert wait_for(lambda: s.metrics()["ballast_running_sequences"] == 1)
        before = s.metrics()["ballast_generation_tokens_total"]
        resp.close()
        conn.close()  # the client goes away mid-stream
        assert wait_for(lambda: s.metrics()['ballast_requests_total{outcome="abort"}'] == 1), s.metrics()
        m = s.metrics()
        assert m["ballast_running_sequences"] == 0 and m["ballast_cache_usage_ratio"] == 0, m
        assert m["ballast_generation_tokens_total"] < before + 3000
        # The server serves the next one.
        status, _, r = s.request("/v1/completions", {"prompt": "def", "max_tokens": 4, "temperature": 0})
        assert status == 200, r
        assert s.stop() == 0


def refused(server):
    """A new request is not served: the connection is refused or answered 503."""
    try:
        return server.request("/v1/completions", {"prompt": "def", "max_tokens": 2}, timeout=5)[0] == 503
    except (urllib.error.URLError, ConnectionError):
        return True


def check_overload_timeout_and_shutdown(args):
    # One running and one queued at most: a third concurrent request is refused with Retry-After.
    with Server(args, ["--model", MODEL, "--max-running-requests", "1", "--max-queued-requests", "1",
                       "--request-timeout", "3", "--shutdown-timeout", "2"]) as s:
        long_body = {"prompt": "def", "max_tokens": 3000, "temperature": 0, "ignore_eos": True}
        streams = [open_stream(s, dict(long_body, stream=True), first_event=i == 0) for i in range(2)]
        status, headers, r = s.request("/v1/completions", {"prompt": "def", "max_tokens": 4})
        assert status == 503 and headers.get("Retry-After") == "1" and "capacity" in r["error"]["message"], (status, r)
        # The per-request timeout ends both (the second after it starts running).
        for conn, resp in streams:
            body = resp.read().decode()
            assert "timed out" in body and body.rstrip().endswith("data: [DONE]"), body[-300:]
            conn.close()
        m = s.metrics()
        assert m['ballast_requests_total{outcome="timeout"}'] == 2 and m['ballast_requests_refused_total{reason="overloaded"}'] == 1, m
        # SIGTERM with a request in flight: it is cut at the shutdown bound, new ones are refused, exit 0.
        conn, resp = open_stream(s, dict(long_body, stream=True, max_tokens=2500))
        t0 = time.time()
        os.killpg(s.proc.pid, signal.SIGTERM)
        assert wait_for(lambda: refused(s), 5), "a new request was served after SIGTERM"
        body = resp.read().decode()
        assert body.rstrip().endswith("data: [DONE]") and '"finish_reason":"abort"' in body, body[-300:]
        assert s.proc.wait(30) == 0, s.output()
        assert time.time() - t0 < 15
        assert "no new requests" in s.output()


def check_sigint_in_process_ranks(args):
    # SIGINT to a server of in-process ranks with a request in flight: the request is cut at the
    # shutdown bound with its stream closed properly, every rank's loop ends, exit 0 (README).
    with Server(args, ["--model", MODEL, "--ep", "2", "--shutdown-timeout", "1"]) as s:
        conn, resp = open_stream(s, {"prompt": "def", "max_tokens": 3000, "temperature": 0, "ignore_eos": True,
                                     "stream": True})
        t0 = time.time()
        os.killpg(s.proc.pid, signal.SIGINT)
        body = resp.read().decode()
        assert body.rstrip().endswith("data: [DONE]") and '"finish_reason":"abort"' in body, body[-300:]
        assert s.proc.wait(30) == 0, s.output()
        assert time.time() - t0 < 15
        assert "Interrupt: no new requests" in s.output() and "stopped" in s.output(), s.output()


def check_mpi_ranks(args):
    if not args.mpirun:
        print("skipped: no mpirun")
        return
    prompt_ids = [5, 6, 7, 8, 9]
    gen = generate_ref(args, ["--prompt-ids", ",".join(map(str, prompt_ids)), "--max-new-tokens", "10"])
    with Server(args, ["--model", MODEL, "--ep-num-redundant-experts", "2", "--enable-eplb",
                       "--eplb-rebalance-num-iterations", "3"], launcher=args.mpirun.split() + ["-np", "2"]) as s:
        prompts = [prompt_ids] + [[i + 10, i + 11] for i in range(5)]
        with ThreadPoolExecutor(6) as pool:
            outs = list(pool.map(lambda p: complete(s, p, 10), prompts))
        assert outs[0] == gen["output_ids"], (outs[0], gen["output_ids"])
        code, info = curl(s, "/get_server_info")
        assert info["ep_size"] == 2, info
        m = s.metrics()
        assert m['ballast_eplb_rebalances_total{domain="trunk"}'] >= 1, m
        # SIGTERM to rank 0 (mpirun's own SIGTERM kills the job): it stops every rank, mpirun exits 0.
        os.kill(int(re.search(r"pid (\d+)", s.output()).group(1)), signal.SIGTERM)
        assert s.proc.wait(60) == 0, s.output()


def check_default_model(args):
    """Without --model: from the build folder, from the repository root, and after cmake --install."""
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "prefix")
        run(["cmake", "--install", args.build_dir, "--prefix", prefix])
        installed = os.path.join(prefix, "bin", "ballast")
        assert os.path.exists(os.path.join(prefix, "share", "ballast", "models", "default", "tokenizer.json"))
        # A binary outside any repository, run from the repository's root (another build folder's binary).
        elsewhere = os.path.join(tmp, "bin")
        os.makedirs(elsewhere)
        copied = shutil.copy(args.ballast, elsewhere)
        for binary, cwd in ((args.ballast, tmp), (copied, ROOT), (installed, tmp)):
            with Server(args, [], cwd=cwd, binary=binary) as s:
                status, _, r = s.request("/v1/models")
                assert status == 200 and r["data"][0]["id"] == "default", r
                status, _, r = s.request("/v1/completions", {"prompt": "def", "max_tokens": 3, "temperature": 0})
                assert status == 200, r
                assert s.stop() == 0
        env = dict(os.environ)
        p = subprocess.run([copied, "serve", "--port", "0"], cwd=tmp, capture_output=True, text=True, timeout=60, env=env)
        assert p.returncode == 1 and "no default model found" in p.stderr, p.stderr


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("check")
    ap.add_argument("--ballast", required=True)
    ap.add_argument("--build-dir", default="")
    ap.add_argument("--mpirun", default="")
    args = ap.parse_args()
    globals()["check_" + args.check](args)
    print(f"{args.check}: ok")


if __name__ == "__main__":
    main()

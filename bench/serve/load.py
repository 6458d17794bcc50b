#!/usr/bin/env python3
"""Load run of `ballast serve` on loopback: streaming /v1/completions at concurrency 1, 4, 16, 64, 256.

Starts the server (the shipped demo model unless --model), sends `--requests-per-client` greedy
streaming requests per concurrent client at each level (random prompts of 16-128 token ids, each
asking for --max-tokens tokens with ignore_eos, so every request has a known length), and checks
every one: HTTP 200, a stream that ends with [DONE], exactly max_tokens tokens (usage), no error
event. Reports per level: requests, errors, lost, output tokens/s, TTFT and TPOT p50/p99.

  python3 bench/serve/load.py --ballast build/ballast [--levels 1,4,16,64,256] [-- extra serve flags]
"""
import argparse
import http.client
import json
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time


def pct(values, p):
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def one_request(host, port, prompt, max_tokens):
    """(ok, why, ttft, tpot, tokens) of one streaming request."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=600)
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        return False, f"HTTP {resp.status}: {resp.read()[:200]!r}", 0, 0, 0
    first = last = None
    usage, done, text_events = None, False, 0
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data: "):
            continue
        data = line[len(b"data: "):]
        if data == b"[DONE]":
            done = True
            break
        ev = json.loads(data)
        if "error" in ev:
            return False, f"error event: {ev['error']['message']}", 0, 0, 0
        if ev["choices"] and (ev["choices"][0]["text"] or ev["choices"][0]["finish_reason"]):
            now = time.perf_counter()
            first = first or now
            last = now
            text_events += 1
        if ev.get("usage"):
            usage = ev["usage"]
    conn.close()
    if not done or not usage or usage["completion_tokens"] != max_tokens:
        return False, f"lost: done={done} usage={usage}", 0, 0, 0
    n = usage["completion_tokens"]
    return True, "", first - t0, (last - first) / max(1, n - 1), n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ballast", required=True)
    ap.add_argument("--model", default="")
    ap.add_argument("--levels", default="1,4,16,64,256")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("serve_args", nargs="*")
    a = ap.parse_args()
    levels = [int(x) for x in a.levels.split(",")]
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    cmd = [a.ballast, "serve", "--port", "0", "--max-running-requests", str(max(levels)),
           "--http-threads", str(2 * max(levels) + 16)] + (["--model", a.model] if a.model else []) + a.serve_args
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = None
        for _ in range(600):
            m = re.search(r"on http://([\d.]+):(\d+)", open(log.name).read())
            if m:
                url = m
                break
            if server.poll() is not None:
                sys.exit(open(log.name).read())
            time.sleep(0.1)
        host, port = url.group(1), int(url.group(2))
        rng = random.Random(1)
        print(f"command: {' '.join(cmd)}; {a.requests_per_client} requests per client, {a.max_tokens} tokens each")
        print("| concurrency | requests | errors | lost | output tok/s | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 |")
        print("|---|---|---|---|---|---|---|---|---|")
        for c in levels:
            results, lock = [], threading.Lock()

            def client():
                for _ in range(a.requests_per_client):
                    prompt = [rng.randrange(8000) for _ in range(rng.randint(16, 128))]
                    try:
                        r = one_request(host, port, prompt, a.max_tokens)
                    except Exception as e:  # a broken connection is an error of the run, counted
                        r = (False, f"{type(e).__name__}: {e}", 0, 0, 0)
                    with lock:
                        results.append(r)

            t0 = time.perf_counter()
            threads = [threading.Thread(target=client) for _ in range(c)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            ok = [r for r in results if r[0]]
            errors = [r for r in results if not r[0] and not r[1].startswith("lost")]
            lost = c * a.requests_per_client - len(ok) - len(errors)
            for r in results:
                if not r[0]:
                    print(f"  failed: {r[1]}", file=sys.stderr)
            ttft = [r[2] for r in ok]
            tpot = [r[3] for r in ok]
            tokens = sum(r[4] for r in ok)
            print(f"| {c} | {len(results)} | {len(errors)} | {lost} | {tokens / wall:.0f} | {pct(ttft, 50) * 1e3:.0f} ms | "
                  f"{pct(ttft, 99) * 1e3:.0f} ms | {pct(tpot, 50) * 1e3:.1f} ms | {pct(tpot, 99) * 1e3:.1f} ms |",
                  flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""`ballast serve` on the GPU (gpu_check.sh's serve step): starts it on the demo model with its
defaults (the KV cache from --mem-fraction-static 0.85 of the GPU's memory), asks /get_server_info
and one completion, stops it with SIGTERM; fails unless the cache was sized from memory (more rows
than the CPU's default 64 K), the completion came back, and the server exited 0.
Usage: gpu_serve_check.py BALLAST [serve flags...] (gpu_check.sh: --device cuda)"""
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request

cmd = [sys.argv[1], "serve", "--port", "0"] + sys.argv[2:]
proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
port, lines = None, []
deadline = time.time() + 300
while port is None and time.time() < deadline:
    line = proc.stderr.readline()
    if not line:
        break
    lines.append(line)
    print(line, end="")
    m = re.search(r"on http://[^:]+:(\d+) ", line)
    if m:
        port = int(m.group(1))
if port is None:
    proc.kill()
    sys.exit("serve did not start:\n" + "".join(lines))
base = f"http://127.0.0.1:{port}"
info = json.load(urllib.request.urlopen(base + "/get_server_info", timeout=60))
print("server info:", {k: info[k] for k in ("max_total_tokens", "mem_fraction_static", "context_length",
                                            "max_running_requests")})
body = json.dumps({"prompt": "def fibonacci(n):", "max_tokens": 16}).encode()
req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
reply = json.load(urllib.request.urlopen(req, timeout=120))
print("completion:", json.dumps(reply["choices"][0]["text"]), reply["usage"])
proc.send_signal(signal.SIGTERM)
rest = proc.communicate(timeout=120)[1]
print(rest, end="")
ok = proc.returncode == 0 and info["max_total_tokens"] > 65536 and reply["usage"]["completion_tokens"] == 16
print("serve check:", "ok" if ok else f"FAILED (exit {proc.returncode})")
sys.exit(0 if ok else 1)

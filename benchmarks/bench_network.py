"""The allowlist proxy's cost, side by side in one run.

    .venv/bin/python benchmarks/bench_network.py [--mib 1024] [--n 50] [--conc 2000]

A loopback HTTP server on the host, in a process of its own (a real server
never shares corral's process, its CPU time or its GIL); the same client program runs on the host
(direct) and inside a box, twice: through the proxy variables (plain HTTP
forwarding to 127.0.0.1, allowlisted by an IP rule) and transparently (no
proxy variables: the name bench.test, answered by corral's DNS responder,
redirected by the box's nftables rules). It times a large download
(throughput; target >= 80% of direct), many small requests on fresh
connections (added latency per connection; target <= 1 ms) and ``--conc``
connections open at once (errors; target 0 at 2,000).
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import socketserver
import statistics
import subprocess
import sys
import threading

import corral
from corral import Policy

CLIENT = r"""
import asyncio, json, sys, time, urllib.request
url, size, n, conc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t = time.perf_counter(); got = 0
with urllib.request.urlopen(url + "/big") as r:
    while chunk := r.read(1 << 20):
        got += len(chunk)
big = time.perf_counter() - t
assert got == size, got
samples = []
for _ in range(n):
    t = time.perf_counter()
    urllib.request.urlopen(url + "/small").read()
    samples.append(time.perf_counter() - t)
samples.sort()
host, port = url.split("//")[1].split(":")
async def one():
    try:
        r, w = await asyncio.open_connection(host, int(port))
        w.write(f"GET /small HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        ok = (await asyncio.wait_for(r.read(), 30)).split(b" ")[1] == b"200"
        w.close()
        return ok
    except (OSError, IndexError, asyncio.TimeoutError):
        return False
async def many():
    return sum(await asyncio.gather(*[one() for _ in range(conc)]))
good = asyncio.run(many()) if conc else 0
print(json.dumps({"big_s": big, "small_s": samples[len(samples) // 2], "errors": conc - good}))
"""


def serve(size: int) -> socketserver.ThreadingTCPServer:
    block = b"\0" * (1 << 20)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            length = size if self.path == "/big" else 2
            self.send_response(200)
            self.send_header("Content-Length", str(length))
            self.end_headers()
            if self.path != "/big":
                self.wfile.write(b"ok")
                return
            left = size
            while left:
                n = min(left, len(block))
                self.wfile.write(block[:n])
                left -= n

        def log_message(self, *args: object) -> None:
            pass

    socketserver.ThreadingTCPServer.daemon_threads = True
    socketserver.ThreadingTCPServer.request_queue_size = 4096  # --conc at once
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--conc", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = args.mib << 20
    if args.serve:  # the server process: print the port, serve until stdin closes
        server = serve(size)
        print(server.server_address[1], flush=True)
        sys.stdin.read()
        return
    serving = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--mib", str(args.mib)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert serving.stdout is not None
    port = int(serving.stdout.readline())
    try:
        _compare(args, size, port)
    finally:
        serving.kill()
        serving.wait()


def _compare(args: argparse.Namespace, size: int, port: int) -> None:
    base = ["/usr/bin/python3", "-c", CLIENT]
    tail = [str(size), str(args.n), str(args.conc)]
    policy = (
        Policy.preset("dev")
        .with_network(mode="allowlist", allow=["127.0.0.1", "bench.test"])
        .with_network(hosts={"bench.test": "127.0.0.1"})
        .with_limits(open_files=8192)
    )
    runs: dict[str, list[dict[str, float]]] = {"direct": [], "variables": [], "transparent": []}
    for _ in range(args.rounds):  # interleaved: drift hits both alike
        argv = [*base, f"http://127.0.0.1:{port}", *tail]
        out = subprocess.run(argv, capture_output=True, check=True, env={"no_proxy": "*"})
        runs["direct"].append(json.loads(out.stdout))
        # no_proxy is emptied so even 127.0.0.1 goes through the proxy
        # (the connections at once go to the box's own 127.0.0.1: measured transparently only)
        argv = [*base, f"http://127.0.0.1:{port}", *tail[:2], "0"]
        result = corral.run(argv, policy=policy, env={"no_proxy": "", "NO_PROXY": ""})
        assert result.exit_code == 0, result.stderr_text
        runs["variables"].append(json.loads(result.stdout))
        argv = [*base, f"http://bench.test:{port}", *tail]
        bare = policy.with_env({"PATH": "/usr/bin:/bin"}, replace=True)
        result = corral.run(argv, policy=bare)
        assert result.exit_code == 0, result.stderr_text
        runs["transparent"].append(json.loads(result.stdout))
    med = {k: {f: statistics.median(r[f] for r in v) for f in v[0]} for k, v in runs.items()}
    mib = size / (1 << 20)
    d = med["direct"]
    print(f"{args.mib} MiB download, small requests (median of {args.n}), {args.conc} at once")
    print(f"  {'direct (host)':24} {mib / d['big_s']:8.1f} MiB/s  {d['small_s'] * 1e3:6.2f} ms")
    for name in ("variables", "transparent"):
        m = med[name]
        share = d["big_s"] / m["big_s"]
        added = (m["small_s"] - d["small_s"]) * 1e3
        print(
            f"  {'proxy, ' + name:24} {mib / m['big_s']:8.1f} MiB/s ({share:4.0%})"
            f"  {m['small_s'] * 1e3:6.2f} ms (+{added:.2f})  errors {m['errors']:.0f}"
        )
    print("  targets: >= 80% of direct, <= +1 ms per connection, 0 errors at 2,000")
    print(f"  medians of {args.rounds} interleaved rounds; load average {os.getloadavg()}")


if __name__ == "__main__":
    main()

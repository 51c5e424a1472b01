"""The allowlist proxy's cost, side by side in one run.

    .venv/bin/python benchmarks/bench_network.py [--mib 1024] [--n 50]

A loopback HTTP server on the host; the same client program runs on the host
(direct) and inside a box (through corral's proxy, allowlisted by an IP rule).
It times a large download (throughput; target >= 80% of direct) and many small
requests on fresh connections (added latency per connection; target <= 1 ms).
"""

from __future__ import annotations

import argparse
import http.server
import json
import socketserver
import subprocess
import threading

import corral
from corral import Policy

CLIENT = r"""
import json, sys, time, urllib.request
url, size, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
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
print(json.dumps({"big_s": big, "small_s": samples[len(samples) // 2]}))
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
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--n", type=int, default=50)
    args = parser.parse_args()
    size = args.mib << 20
    server = serve(size)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    argv = ["/usr/bin/python3", "-c", CLIENT, url, str(size), str(args.n)]
    policy = Policy.preset("dev").with_network(mode="allowlist", allow=["127.0.0.1"])
    direct, proxied = [], []
    for _ in range(3):  # interleaved: drift hits both alike
        out = subprocess.run(argv, capture_output=True, check=True, env={"no_proxy": "*"})
        direct.append(json.loads(out.stdout))
        # no_proxy is emptied so even 127.0.0.1 goes through the proxy
        result = corral.run(argv, policy=policy, env={"no_proxy": "", "NO_PROXY": ""})
        assert result.exit_code == 0, result.stderr_text
        proxied.append(json.loads(result.stdout))
    d_big = sorted(r["big_s"] for r in direct)[1]
    p_big = sorted(r["big_s"] for r in proxied)[1]
    d_small = sorted(r["small_s"] for r in direct)[1]
    p_small = sorted(r["small_s"] for r in proxied)[1]
    mib = size / (1 << 20)
    print(f"{args.mib} MiB download")
    print(f"  direct (host)      {mib / d_big:8.1f} MiB/s")
    share = d_big / p_big
    print(f"  through the proxy  {mib / p_big:8.1f} MiB/s   {share:.0%} of direct (target >= 80%)")
    print("small request on a fresh connection (median)")
    print(f"  direct (host)      {d_small * 1e3:8.2f} ms")
    added = (p_small - d_small) * 1e3
    print(f"  through the proxy  {p_small * 1e3:8.2f} ms   +{added:.2f} ms (target <= 1)")
    server.shutdown()


if __name__ == "__main__":
    main()

"""The client's own CPU time for one POST to a server on this host: DirectSession (what the client posts with to a
plain http:// address) against requests (the reference: ``settled_session``, a requests.Session with the
environment's settings read once, what the client uses for other addresses), in one run.

    python bench/post_cost.py [--requests 1000] [--rounds 5]

The server is a stub in another process that answers at once with a small JSON body, as TorchServe answers a
DiT+decoder request over shared memory; the request is the one the video client sends for a pair (a multipart
reference and a seed, the key and the reply headers). What is timed is the posting thread's CPU time
(time.thread_time: its Python and its system calls), the interpreter time the client's other threads wait for.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from eden_client.model_client import DirectSession, settled_session  # noqa: E402

STUB = r'''
import http.server, socketserver, sys
class Answer(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b'{"segment": "eden-0123456789abcdef"}'
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                         % len(body) + body)
    def log_message(self, *args):
        pass
class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
server = Server(("127.0.0.1", 0), Answer)
print(server.server_address[1], flush=True)
server.serve_forever()
'''

FILES = {"ref": ("ref", b'{"pair": [{"segment": "eden-a", "frame": 3}, {"segment": "eden-b", "frame": 0}], '
                        b'"difference": 0.12}', "application/x-eden-ref"),
         "seed": (None, "1234")}
HEADERS = {"Authorization": "Bearer 0123456789abcdef", "X-Eden-Reply": "shm", "X-Eden-Handoff": "device"}


def cpu_per_post(session, url: str, n: int) -> float:
    for _ in range(n // 10):  # connections made, caches warm
        session.post(url, files=FILES, headers=HEADERS, timeout=10).content
    start = time.thread_time()
    for _ in range(n):
        session.post(url, files=FILES, headers=HEADERS, timeout=10).content
    return (time.thread_time() - start) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    stub = subprocess.Popen([sys.executable, "-c", STUB], stdout=subprocess.PIPE, text=True)
    try:
        port = stub.stdout.readline().strip()
        if not port.isdigit():
            raise SystemExit(f"the stub server did not start (it said {port!r})")
        url = f"http://127.0.0.1:{port}/predictions/eden_ditdec"
        reference = "requests (reference)"
        seen: dict[str, list[float]] = {reference: [], "DirectSession": []}
        for _ in range(args.rounds):  # interleaved, so that a slower moment of the host falls on both
            for name, make in ((reference, lambda: settled_session(url)), ("DirectSession", DirectSession)):
                session = make()
                seen[name].append(cpu_per_post(session, url, args.requests))
                session.close()
    finally:
        stub.kill()
        stub.wait()
    ref = statistics.median(seen[reference])
    for name, values in seen.items():
        med = statistics.median(values)
        print(f"{name}: {med * 1e6:.0f} us of client CPU a POST (median of {args.rounds} x {args.requests}; "
              f"{ref / med:.2f}x the reference's speed)")


if __name__ == "__main__":
    main()

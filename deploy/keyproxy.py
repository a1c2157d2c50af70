"""Authenticating forwarder in front of one TorchServe's inference API (one per pod / container).

TorchServe makes its own random keys at start and rotates them when they expire, so behind a Service with several
replicas no single client key works. This forwarder gives the cluster one stable secret instead:

    client --(Authorization: Bearer $EDEN_PROXY_SECRET)--> keyproxy :8090 --(pod's inference key)--> 127.0.0.1:8080

It accepts only POST /predictions/<model> and GET /ping, compares the secret in constant time, forwards the body
and the request headers a client sends that may cross hosts (eden_serve/protocol.py, REMOTE_REQUEST_HEADERS:
Content-Type, X-Eden-Seed, X-Eden-Format, X-Eden-Token-Dtype) unchanged (bytes only: nothing is unpickled or
parsed), and answers a missing or wrong secret the way TorchServe does (HTTP 400, type InvalidKeyException) so the
client's hint applies. The secret is checked before the body is read: a request without it costs one header read.
Shared-memory references (a same-host transport) are refused twice: a body holding the reference magic anywhere is
answered 400 here, and every forwarded request carries ``X-Eden-Remote: 1``, on which the handlers refuse references
and shared-memory replies however they are encoded (eden_serve/protocol.py, REMOTE).
The pod's key comes from TorchServe's key_file.json and is renewed through the (loopback) management API when it
expires (eden_client.keys.KeySource). TorchServe itself stays on loopback.

    python deploy/keyproxy.py --listen 0.0.0.0:8090 --target http://127.0.0.1:8080 \\
        --management http://127.0.0.1:8081 --key-file key_file.json      # secret in $EDEN_PROXY_SECRET
"""
from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from eden_client.keys import KeySource  # noqa: E402
from eden_serve import protocol  # noqa: E402
from eden_serve.shm import DEVICE_MAGIC, REF_MAGIC  # noqa: E402

SECRET_ENV = "EDEN_PROXY_SECRET"
MAX_BODY = protocol.MAX_BODY_BYTES  # TorchServe's max_request_size
PATHS = re.compile(r"^/predictions/[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?$")
# The protocol's same-host headers (X-Eden-Reply, X-Eden-Handoff: answers through shared memory) are not
# forwarded: that transport is for clients on the server's own host.
FORWARD_HEADERS = tuple(h.lower() for h in protocol.REMOTE_REQUEST_HEADERS)
log = logging.getLogger("keyproxy")


def make_handler(secret: str, target: str, keys: KeySource, timeout: float, max_concurrent: int = 16):
    session = requests.Session()
    slots = threading.BoundedSemaphore(max_concurrent)  # bodies held at once: memory <= max_concurrent x MAX_BODY

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self, status: int, body: bytes, headers: dict | None = None):
            self.send_response(status)
            for k, v in (headers or {"Content-Type": "application/json"}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, type_: str, message: str):
            self.close_connection = True  # a body left unread must not be taken for the next request
            self._answer(status, json.dumps({"code": status, "type": type_, "message": message}).encode())

        def _authorized(self) -> bool:
            given = self.headers.get("Authorization", "")
            token = given[7:] if given.startswith("Bearer ") else ""
            if hmac.compare_digest(token.encode(), secret.encode()):
                return True
            self._error(400, "InvalidKeyException",
                        "Token Authorization failed: send the deployment's secret as 'Authorization: Bearer ...'")
            return False

        def _forward(self, method: str):
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self._error(413, "RequestTooLarge", f"body of {length} bytes is over the limit of {MAX_BODY}")
                return
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                self._error(411, "LengthRequired", "send the body with a Content-Length (no chunked encoding)")
                return
            body = self.rfile.read(length) if length else None
            if body and (REF_MAGIC in body or DEVICE_MAGIC in body):
                self._error(400, "BadInput", "shared-memory references are for clients on the server's own host: "
                                             "send the bytes themselves")
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() in FORWARD_HEADERS}
            headers[protocol.REMOTE] = "1"
            for attempt in range(2):
                key = keys.read("inference", fresh=attempt > 0)
                headers["Authorization"] = f"Bearer {key}"
                try:
                    r = session.request(method, target + self.path, data=body, headers=headers, timeout=timeout)
                except requests.RequestException as e:
                    self._error(503, "ServiceUnavailable", f"TorchServe behind this proxy did not answer: {e}")
                    return
                if r.status_code == 400 and "InvalidKeyException" in r.text[:300] and attempt == 0:
                    keys.renew("inference")  # rotated or expired under us: renew, then once more
                    continue
                break
            out = {k: v for k, v in r.headers.items() if k.lower().startswith("x-eden-")}
            out["Content-Type"] = r.headers.get("Content-Type", "application/octet-stream")
            self._answer(r.status_code, r.content, out)

        def do_POST(self):  # noqa: N802 - http.server's naming
            if not PATHS.match(self.path.split("?")[0]):
                self._error(404, "ResourceNotFoundException", "only POST /predictions/<model> goes through here")
                return
            if not self._authorized():
                return
            if not slots.acquire(blocking=False):
                self._answer(503, json.dumps({"code": 503, "type": "ServiceUnavailable", "message": (
                    f"this forwarder already holds {max_concurrent} requests: retry shortly")}).encode(),
                    {"Content-Type": "application/json", "Retry-After": "1"})
                self.close_connection = True
                return
            try:
                self._forward("POST")
            finally:
                slots.release()

        def do_GET(self):  # noqa: N802
            if self.path != "/ping":
                self._error(404, "ResourceNotFoundException", "only GET /ping and POST /predictions/<model>")
                return
            if self._authorized():
                self._forward("GET")

        def log_message(self, fmt, *args):
            log.info("%s %s", self.address_string(), fmt % args)

    return Handler


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", default="0.0.0.0:8090", help="host:port to listen on (default 0.0.0.0:8090)")
    ap.add_argument("--target", default="http://127.0.0.1:8080", help="TorchServe inference API")
    ap.add_argument("--management", default="http://127.0.0.1:8081", help="its management API (key renewal)")
    ap.add_argument("--key-file", default="key_file.json", help="TorchServe's key_file.json")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--max-concurrent", type=int, default=16,
                    help="requests forwarded at once (each body is held in memory, up to 256 MiB); past it 503")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s keyproxy %(message)s")
    secret = os.environ.get(SECRET_ENV, "")
    if len(secret) < 16:
        print(f"keyproxy: set ${SECRET_ENV} to the deployment's secret (16 characters or more; a Kubernetes Secret "
              "in deploy/k8s), refusing to run without one", file=sys.stderr)
        return 2
    host, port = args.listen.rsplit(":", 1)
    keys = KeySource(key_file=Path(args.key_file), management_url=args.management)
    server = ThreadingHTTPServer((host, int(port)), make_handler(secret, args.target.rstrip("/"), keys,
                                                                 args.timeout, args.max_concurrent))
    log.info("forwarding %s -> %s", args.listen, args.target)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

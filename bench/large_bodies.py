"""What TorchServe's HTTP path (netty frontend -> Java -> worker socket -> Python) costs for large bodies, alone:
round trips of 10-100 MB bodies to an echo model, for issue 13's JVM/netty part (run it on the GPU host; the numbers
say whether token bodies across hosts are bounded by the frontend rather than the network).

A model ``eden_echo`` (a handler of a few lines, archived here with torch-model-archiver, no weights) answers each
request with ``X-Echo-Bytes`` and either the body itself (``--mode echo``: the body crosses the frontend twice, as
the encoder's tokens do going out) or 8 bytes (``--mode sink``: the DiT+decoder's direction, tokens in, small frame
out). For each size, over loopback:

* cold: the first request of that size after TorchServe started (JVM not warmed for it: buffer pools grow);
* warm: ``--repeat`` more requests, sequential, then ``--concurrency`` at once; median and p90 seconds, MB/s.

``--api http grpc`` measures both of TorchServe's inference APIs in the same run (its gRPC ``Predictions`` call:
the body as the request's one input, the answer as its prediction; grpcio needed, no generated stubs: the two
messages are encoded here).

Bounded by design: sizes default to 10, 25, 50 and 100 MB, 5 warm repeats each; one TorchServe, one worker; it is
stopped at the end. The frontend's own limits (max_request_size, max_response_size) are set to fit the largest size.

    python bench/large_bodies.py --out bench/results/large_bodies_<host>.json
    python bench/large_bodies.py --sizes 10 100 --repeat 3 --mode sink --netty-threads 4
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from eden_client.keys import KeySource  # noqa: E402
from eden_dev.launcher import TorchServe  # noqa: E402

HANDLER = '''
try:  # the worker's socket read as the EDEN handlers run it (eden_serve/ts_patches.py, shipped beside this file)
    import ts_patches
    PATCHED = ts_patches.apply() if __import__("os").environ.get("EDEN_ECHO_PATCH", "1") == "1" else False
except ImportError:
    PATCHED = False


def handle(data, context):
    """Echo (X-Echo: body) or count the raw body of each request."""
    if data is None:
        return None
    out = []
    for idx, request in enumerate(data):
        body = request.get("body") if request.get("body") is not None else request.get("data")
        body = body if isinstance(body, (bytes, bytearray)) else b""
        context.set_response_header(idx, "X-Echo-Bytes", str(len(body)))
        headers = context.get_all_request_header(idx) or {}
        echo = (any(str(k).lower() == "x-echo" and v == "body" for k, v in headers.items())
                or request.get("echo") in (b"body", "body"))  # (gRPC: a second input)
        out.append(bytes(body) if echo else b"received")
    return out
'''


def build_echo(store: Path, patched: bool = True) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        handler = Path(tmp, "echo_handler.py")
        handler.write_text(HANDLER.replace('"EDEN_ECHO_PATCH", "1"', f'"EDEN_ECHO_PATCH", "{int(patched)}"'))
        shutil.copy(ROOT / "eden_serve" / "ts_patches.py", Path(tmp, "ts_patches.py"))
        config = Path(tmp, "model-config.yaml")
        config.write_text("minWorkers: 1\nmaxWorkers: 1\nbatchSize: 1\nmaxBatchDelay: 1\nresponseTimeout: 600\n")
        subprocess.run([sys.executable, "-c", "from model_archiver.model_packaging import generate_model_archive "
                        "as g; g()", "--model-name", "eden_echo", "--version", "1.0", "--handler", str(handler),
                        "--config-file", str(config), "--extra-files", str(Path(tmp, "ts_patches.py")),
                        "--export-path", str(store), "--force"],
                       check=True, env={**os.environ, "TMPDIR": tmp})


def one(session, url, key, body: bytes, echo: bool) -> float:
    t = time.perf_counter()
    r = session.post(url, data=body, headers={"Authorization": f"Bearer {key}",
                                              "Content-Type": "application/octet-stream",
                                              **({"X-Echo": "body"} if echo else {})}, timeout=600)
    r.raise_for_status()
    got = len(r.content)
    if int(r.headers["X-Echo-Bytes"]) != len(body) or (echo and got != len(body)):
        raise RuntimeError(f"body of {len(body)} bytes came back as {r.headers['X-Echo-Bytes']} / {got}")
    return time.perf_counter() - t


# ---- TorchServe's gRPC inference API without generated stubs: its two messages, protobuf-encoded by hand
PREDICTIONS = "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        value, pos, shift = value | (b & 0x7F) << shift, pos + 1, shift + 7
        if not b & 0x80:
            return value, pos


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def predictions_request(model: str, inputs: dict[str, bytes]) -> bytes:
    """PredictionsRequest: model_name (field 1), input (field 3, a map<string, bytes>: entries of key 1, value 2)."""
    return b"".join([_field(1, model.encode())] +
                    [_field(3, _field(1, k.encode()) + _field(2, v)) for k, v in inputs.items()])


def prediction_of(message: bytes) -> bytes:
    """PredictionResponse.prediction (field 1) of a serialized answer."""
    pos = 0
    while pos < len(message):
        key, pos = _read_varint(message, pos)
        if key & 7 == 2:
            n, pos = _read_varint(message, pos)
            if key >> 3 == 1:
                return message[pos:pos + n]
            pos += n
        elif key & 7 == 0:
            _, pos = _read_varint(message, pos)
        else:
            raise ValueError(f"unexpected protobuf wire type {key & 7}")
    return b""


def grpc_caller(port: int, key: str):
    """one(...)'s gRPC twin: a function (body, echo) -> seconds for one Predictions call."""
    import grpc
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1),
                                                                  ("grpc.max_receive_message_length", -1)])
    call = channel.unary_unary(PREDICTIONS)  # (bytes in, bytes out: the messages are made here)

    def one_grpc(body: bytes, echo: bool) -> float:
        t = time.perf_counter()
        inputs = {"data": body, **({"echo": b"body"} if echo else {})}
        answer = prediction_of(call(predictions_request("eden_echo", inputs),
                                    metadata=(("authorization", f"Bearer {key}"),), timeout=600))
        if len(answer) != (len(body) if echo else len(b"received")):
            raise RuntimeError(f"body of {len(body)} bytes came back as {len(answer)}")
        return time.perf_counter() - t
    return one_grpc


def summary(seconds: list[float], nbytes: int, factor: int) -> dict:
    s = sorted(seconds)
    med = statistics.median(s)
    return {"n": len(s), "median_s": round(med, 4), "p90_s": round(s[min(len(s) - 1, int(0.9 * len(s)))], 4),
            "MB_per_s": round(factor * nbytes / 1e6 / med, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 25, 50, 100], help="body sizes in MB (max 200)")
    p.add_argument("--repeat", type=int, default=5, help="warm requests per size (max 20)")
    p.add_argument("--concurrency", type=int, default=4, help="warm requests at once, after the sequential ones")
    p.add_argument("--mode", choices=["echo", "sink"], default="echo")
    p.add_argument("--api", nargs="+", choices=["http", "grpc"], default=["http"],
                   help="TorchServe inference API(s) to measure, in this order (default http)")
    p.add_argument("--netty-threads", type=int, default=0, help="TorchServe number_of_netty_threads (0: default)")
    p.add_argument("--vmargs", default="", help="the frontend JVM's options (TorchServe vmargs), e.g. "
                   "\"-XX:+UseParallelGC -Xms8g\" (default: TorchServe's)")
    p.add_argument("--unpatched", action="store_true",
                   help="the worker reads bodies with TorchServe's own socket loop (default: as the EDEN handlers "
                        "do, eden_serve/ts_patches.py)")
    p.add_argument("--work", default=None, help="folder for the archive and TorchServe (default: a temporary one)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if max(args.sizes) > 200 or args.repeat > 20 or args.concurrency > 8:
        p.error("bounded on purpose: sizes <= 200 MB, --repeat <= 20, --concurrency <= 8")
    work = Path(args.work or tempfile.mkdtemp(prefix="eden_large_bodies_"))
    store = work / "store"
    store.mkdir(parents=True, exist_ok=True)
    build_echo(store, patched=not args.unpatched)
    limit = (max(args.sizes) + 1) << 20
    extra = {"max_request_size": limit, "max_response_size": limit}
    if args.netty_threads:
        extra["number_of_netty_threads"] = args.netty_threads
    if args.vmargs:
        extra["vmargs"] = args.vmargs
    echo = args.mode == "echo"
    results = []
    with TorchServe(work / "serve", store, models=["eden_echo.mar"], extra_config=extra) as ts:
        key = KeySource(key_file=ts.key_file).read("inference")
        url = f"{ts.inference_url}/predictions/eden_echo"
        callers = {"http": lambda: (lambda body, e, s=requests.Session(): one(s, url, key, body, e)),
                   "grpc": lambda: grpc_caller(ts.grpc_ports[0], key)}
        for api in args.api:
            call = callers[api]()
            for mb in args.sizes:
                body = os.urandom(mb << 20)
                cold = call(body, echo)
                warm = [call(body, echo) for _ in range(args.repeat)]
                with ThreadPoolExecutor(args.concurrency) as pool:
                    t = time.perf_counter()
                    each = list(pool.map(lambda _: callers[api]()(body, echo), range(args.concurrency)))
                    together = time.perf_counter() - t
                factor = 2 if echo else 1
                row = {"api": api, "MB": mb, "bytes": len(body), "cold_s": round(cold, 4),
                       "warm": summary(warm, len(body), factor),
                       "concurrent": {"n": args.concurrency, "wall_s": round(together, 4),
                                      "MB_per_s": round(factor * args.concurrency * len(body) / 1e6 / together, 1),
                                      "max_s": round(max(each), 4)}}
                results.append(row)
                print(json.dumps(row), flush=True)
    record = {"mode": args.mode, "netty_threads": args.netty_threads or "default", "host": os.uname().nodename,
              "vmargs": args.vmargs or "default", "worker_socket_read": "TorchServe's" if args.unpatched else "patched",
              "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Helpers for tests and benchmarks that talk to a real TorchServe over HTTP: instances, clients, raw requests
with the inference key, test frames, token blobs with one thing wrong, and the memory of the processes."""
from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import psutil
import requests
from PIL import Image

from eden_client.api import EdenClient
from eden_client.keys import KeySource
from eden_client.model_client import ModelClient, RetryPolicy
from eden_dev.launcher import TorchServe
from eden_serve import wire
from eden_serve.shm import REF_CONTENT_TYPE, REF_MAGIC


# ---------------------------------------------------------------------- instances
def start_server(workdir, model_store, **extra) -> TorchServe:
    """A started TorchServe of both models in ``workdir``, on free ports, with ``extra`` config.properties keys."""
    return TorchServe(workdir, model_store, extra_config=extra).start()


def eden_client(ts: TorchServe, timeout: float = 60, retry: RetryPolicy | None = None) -> EdenClient:
    """A client of both models of ``ts`` with its own retry policy and per-try timeout."""
    keys = KeySource(key_file=ts.key_file)
    return EdenClient(ModelClient(ts.inference_url, "eden_encoder", keys, timeout, retry=retry),
                      ModelClient(ts.inference_url, "eden_ditdec", keys, timeout, retry=retry))


# ---------------------------------------------------------------------- raw requests
def post(ts: TorchServe, model: str, headers: dict | None = None, timeout: float = 60, **kw) -> requests.Response:
    """One POST to /predictions/{model} with the inference key, no retry (the answer as it came)."""
    key = ts.keys()["inference"]["key"]
    return requests.post(f"{ts.inference_url}/predictions/{model}",
                         headers={"Authorization": f"Bearer {key}", **(headers or {})}, timeout=timeout, **kw)


@dataclass
class RawAnswer:
    """An answer read off a raw socket (for requests that ``requests`` refuses to send)."""
    status: int
    reason: str
    headers: dict = field(default_factory=dict)
    body: bytes = b""

    def message(self) -> str:
        try:
            return json.loads(self.body)["message"]
        except (ValueError, KeyError, TypeError):
            return self.body.decode(errors="replace") or self.reason


def post_raw(ts: TorchServe, model: str, head: dict, body: bytes, timeout: float = 30) -> RawAnswer:
    """A POST whose headers are sent exactly as given (e.g. a Content-Length that does not match the body)."""
    url = urlparse(ts.inference_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        conn.putrequest("POST", f"/predictions/{model}", skip_accept_encoding=True)
        conn.putheader("Authorization", f"Bearer {ts.keys()['inference']['key']}")
        for name, value in head.items():
            conn.putheader(name, value)
        conn.endheaders()
        conn.send(body)
        r = conn.getresponse()
        return RawAnswer(r.status, r.reason, dict(r.getheaders()), r.read())
    finally:
        conn.close()


# ---------------------------------------------------------------------- frames
def png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def image_bytes(rgb: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise_frame(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def moving_frames(count: int, height: int = 64, width: int = 80, seed: int = 0) -> list[np.ndarray]:
    """A small synthetic video: a textured background moving right a few pixels per frame."""
    base = np.random.default_rng(seed).integers(0, 256, (height, width + 4 * count, 3), dtype=np.uint8)
    return [np.ascontiguousarray(base[:, 4 * i:4 * i + width]) for i in range(count)]


def png_declaring(width: int, height: int) -> bytes:
    """A small PNG file whose header declares width x height pixels (its data is far too short for that)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


# ---------------------------------------------------------------------- token blobs with one thing wrong
def blob_header(blob: bytes) -> dict:
    n = struct.unpack_from("<I", blob, 12)[0]
    return json.loads(blob[16:16 + n])


def with_header(blob: bytes, **changes) -> bytes:
    """The blob with header fields replaced (the payload untouched; the header re-padded to the alignment)."""
    n = struct.unpack_from("<I", blob, 12)[0]
    header = {**json.loads(blob[16:16 + n]), **changes}
    text = json.dumps(header).encode()
    text += b" " * (-(16 + len(text)) % wire.ALIGN)
    return blob[:12] + struct.pack("<I", len(text)) + text + blob[16 + n:]


def with_prefix(blob: bytes, version: int | None = None, header_length: int | None = None) -> bytes:
    """The blob with its version or declared header length replaced."""
    magic, v, n = wire.PREFIX.unpack_from(blob)
    return wire.PREFIX.pack(magic, v if version is None else version, n if header_length is None else header_length) \
        + blob[wire.PREFIX.size:]


def with_token(blob: bytes, value: float, index=(0, 1, 0, 0)) -> bytes:
    """The blob with one token value replaced (e.g. NaN or infinity)."""
    parsed = wire.from_bytes(blob)
    tokens = parsed.tokens.copy()
    tokens[index] = value
    parsed.tokens = tokens
    return parsed.to_bytes()


def with_tokens(blob: bytes, tokens: np.ndarray, **header) -> bytes:
    """The blob's header around other tokens (a consistent blob of another shape or dtype)."""
    parsed = wire.from_bytes(blob)
    parsed.tokens = tokens
    return with_header(parsed.to_bytes(), **header) if header else parsed.to_bytes()


def repeated_frames(blob: bytes, frames: int) -> bytes:
    """A well-formed blob of ``frames`` frames made by repeating the pair's first frame."""
    p = wire.from_bytes(blob)
    return wire.TokenBlob(np.repeat(p.tokens[:1], frames, axis=0), p.size, p.padding, p.patch_size,
                          p.mean[:1] * frames, p.std[:1] * frames, [0.0] * (frames - 1), p.encoder).to_bytes()


# ---------------------------------------------------------------------- process memory
def tree_rss(root_pid: int) -> dict[str, int]:
    """Resident memory (bytes) of a TorchServe started by eden_dev.launcher: 'frontend' (the Java process and the Python
    launcher above it) and 'workers' (the Python model workers below the frontend)."""
    try:
        root = psutil.Process(root_pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return {"frontend": 0, "workers": 0}
    out = {"frontend": 0, "workers": 0}
    for p in procs:
        try:
            kind = "workers" if "model_service_worker" in " ".join(p.cmdline()) else "frontend"
            out[kind] += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def pids_rss(pids: list[int]) -> int:
    """Summed resident memory (bytes) of the given processes."""
    return sum(psutil.Process(p).memory_info().rss for p in pids)


def wait_for_new_workers(ts: TorchServe, model: str, old: list[int], timeout: float = 120) -> list[int]:
    """Until TorchServe has replaced the workers ``old`` of ``model`` and they are READY; their pids."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            workers = ts.describe(model)["workers"]
            pids = sorted(int(w["pid"]) for w in workers)
            if workers and all(w["status"] == "READY" for w in workers) and not set(pids) & set(old) \
                    and all(p > 0 for p in pids):
                return pids
        except (requests.RequestException, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{model}'s workers {old} were not replaced within {timeout:.0f} s\n{ts.log_tail()}")


class LogTail:
    """Waits for a text to appear in a growing log file, reading only what was written after its creation."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = self.path.stat().st_size if self.path.is_file() else 0

    def wait_for(self, text: str, timeout: float = 30) -> bool:
        deadline, seen = time.monotonic() + timeout, b""
        needle = text.encode()
        while time.monotonic() < deadline:
            if self.path.is_file():
                with open(self.path, "rb") as f:
                    f.seek(self.offset)
                    new = f.read()
                self.offset += len(new)
                seen = seen[-len(needle):] + new
                if needle in seen:
                    return True
            time.sleep(0.001)
        return False


def kill(pid: int) -> None:
    os.kill(pid, 9)


# ---------------------------------------------------------------------- hostile requests (issue 17)
SEGMENT = "eden-" + "ab" * 16  # a valid segment name that does not exist


def raw_header(good: bytes, text: bytes) -> bytes:
    """``good`` with its header replaced by ``text`` verbatim (padded), the payload untouched."""
    n = struct.unpack_from("<I", good, 12)[0]
    text += b" " * (-(16 + len(text)) % wire.ALIGN)
    return good[:12] + struct.pack("<I", len(text)) + text + good[16 + n:]


def header_with(good: bytes, field: str, value_text: str) -> bytes:
    """``good`` with one header field's JSON text replaced verbatim (e.g. a number JSON cannot hold in a float)."""
    n = struct.unpack_from("<I", good, 12)[0]
    header = json.loads(good[16:16 + n])
    header[field] = "@@"
    return raw_header(good, json.dumps(header).encode().replace(b'"@@"', value_text.encode()))


def hostile_requests(good: bytes, frame: bytes) -> dict:
    """name -> (model, requests.post kwargs, expected status, expected words): each raised an exception the
    handlers did not catch (the whole batch answered 503) before."""
    tokens = {"Content-Type": wire.CONTENT_TYPE}
    deep = b"[" * 5000 + b"]" * 5000
    pair = '{"pair": [{"segment": "%s", "frame": 0}, {"segment": "%s", "frame": 1}], "difference": %s}'
    return {
        "deeply nested header": ("eden_ditdec", {"data": raw_header(good, b'{"dtype": ' + deep + b"}"),
                                                 "headers": tokens}, 400, "header nests 5001 levels deep"),
        "5000-digit integer in the header": ("eden_ditdec", {"data": header_with(good, "patch_size", "7" * 5000),
                                                             "headers": tokens}, 400, "number of 5000 digits"),
        "10**400 as a statistic": ("eden_ditdec", {"data": header_with(good, "mean", f"[{10**400}, 0.1]"),
                                                   "headers": tokens}, 400, "number of 401 digits"),
        "1e300 as a statistic": ("eden_ditdec", {"data": header_with(good, "std", "[1e300, 0.1]"),
                                                 "headers": tokens}, 400, "'std' has values beyond"),
        "1e400 as a difference": ("eden_ditdec", {"data": header_with(good, "differences", "[1e400]"),
                                                  "headers": tokens}, 400, "'differences' has values that are not"),
        "a grid of 2^31": ("eden_ditdec", {"data": header_with(good, "grid", f"[{2**31}, 2]"), "headers": tokens},
                           400, "'grid' must be a list of 2 integers >= 1 and <= 65536"),
        "deeply nested reference": ("eden_ditdec", {"data": REF_MAGIC + b"[" * 3000, "headers": {
            "Content-Type": REF_CONTENT_TYPE}}, 400, "reference nests 3000 levels deep"),
        "10**400 as a pair's difference": ("eden_ditdec", {
            "data": REF_MAGIC + (pair % (SEGMENT, SEGMENT, 10**400)).encode(),
            "headers": {"Content-Type": REF_CONTENT_TYPE}}, 400, "number of 401 digits"),
        "5000-digit seed": ("eden_ditdec", {"data": good, "headers": {**tokens, "X-Eden-Seed": "9" * 5000}},
                            400, "seed must be an integer"),
        "a field named frame²": ("eden_encoder", {"files": {"frame0": frame, "frame1": frame, "frame²": frame}},
                                 400, "field 'frame²' is not a frame field"),
        "a lead frame alone": ("eden_encoder", {"files": {"frame0": frame, "lead": (None, "1")}}, 400,
                               "a lead frame (field 'lead' = 1) needs a frame after it"),
        "lead = 2": ("eden_encoder", {"files": {"frame0": frame, "frame1": frame, "lead": (None, "2")}}, 400,
                     "field 'lead' must be 0 or 1"),
        "deeply nested reference as a frame": ("eden_encoder", {"files": {
            "frame0": ("f", REF_MAGIC + b"{" * 3000, REF_CONTENT_TYPE)}}, 400, "reference nests 3000 levels"),
        "segment name with a trailing newline": ("eden_ditdec", {
            "data": REF_MAGIC + json.dumps({"segment": SEGMENT + "\n"}).encode(),
            "headers": {"Content-Type": REF_CONTENT_TYPE}}, 400, "invalid segment name"),
        "missing segment": ("eden_ditdec", {"data": REF_MAGIC + json.dumps({"segment": SEGMENT}).encode(),
                                            "headers": {"Content-Type": REF_CONTENT_TYPE}}, 400, "does not exist"),
        "a reference as a JSON string": ("eden_ditdec", {
            "data": json.dumps((REF_MAGIC + json.dumps({"segment": SEGMENT}).encode()).decode()),
            "headers": {"Content-Type": "application/json"}}, 400, "body was sent as application/json"),
        "a frame sent as text/plain": ("eden_encoder", {"files": {"frame0": ("f", frame, "text/plain"),
                                                                  "frame1": frame}}, 400,
                                       "frame0 was sent as text/plain"),
    }


@contextlib.contextmanager
def keyproxy_running(target: str, key_file, secret: str, *args: str):
    """deploy/keyproxy.py for real on a free loopback port, forwarding to ``target``; yields its URL."""
    root = Path(__file__).resolve().parent.parent
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(root / "deploy" / "keyproxy.py"), "--listen", f"127.0.0.1:{port}",
                             "--target", target, "--key-file", str(key_file), *args],
                            env={**os.environ, "EDEN_PROXY_SECRET": secret, "PYTHONPATH": str(root)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                requests.get(f"{url}/ping", timeout=2)
                break
            except requests.RequestException:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)

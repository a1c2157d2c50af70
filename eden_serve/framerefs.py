"""A DiT+decoder request body that may name frames it sent before instead of carrying them (issue 13: tokens across
hosts; docs/tokens-across-hosts.md).

Over HTTP a video's frame is in two pairs (x2) or more: sent as whole pair blobs, its tokens cross the wire once per
pair. With this body each frame's tokens cross once per DiT+decoder worker: the worker keeps the frames it received
(``DitDecService.http_frame``, at most ``http_frame_cache_bytes``), and a later pair names them by hash::

    offset 0   magic b"EDENPAIR"                       8 bytes
           8   version uint32 LE (1)
          12   header length uint32 LE (at most MAX_HEAD_BYTES)
          16   header: UTF-8 JSON, space-padded so the first frame starts at a multiple of 64:
                 {"difference": d, "frames": [F0, F1]}
                 F = {"bytes": n}   the frame inline: the next n bytes are a one-frame token blob (wire.py, K = 1,
                                    no differences: its own header fields say its size, statistics, dtype, encoder)
                 F = {"hash": H}    a frame this worker may hold: H = frame_hash of that one-frame blob's bytes
        then   the inline frames' blobs, in order, nothing after them

H is the first 32 hex digits of SHA-256 over the one-frame blob's bytes, header included, so it covers the tokens and
everything that goes with them (encoder fingerprint, statistics, size, dtype). The worker hashes what it received
itself (a client cannot plant tokens under another frame's hash). A frame named by hash that this worker does not
hold is answered 409 with error type FRAME_NOT_CACHED (and nothing computed): each worker and each replica has its own
cache, so a client never assumes a hit and sends that pair again with both frames inline.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass

from . import protocol, wire

MAGIC = b"EDENPAIR"
VERSION = 1
PREFIX = struct.Struct("<8sII")
MAX_HEAD_BYTES = 4096
CONTENT_TYPE = protocol.PAIR_CONTENT_TYPE
FRAME_NOT_CACHED = protocol.FRAME_NOT_CACHED  # the error "type" of a 409
HASH_RE = re.compile(r"[0-9a-f]{32}")


def frame_hash(data) -> str:
    """The name of a one-frame blob: SHA-256 of its bytes, its first 128 bits as 32 hex digits. (SHA-256 because
    x86 CPUs with SHA extensions hash it at ~1.7 GB/s, twice BLAKE2b's speed here: a 1080p float16 frame, 25 MB,
    costs the worker ~15 ms.)"""
    return hashlib.sha256(memoryview(data)).hexdigest()[:32]


def segment_name(key: str) -> str:
    """The shared-memory segment a DiT+decoder worker keeps a frame received inline under, for the other workers of
    its host (``DitDecService.share_frame``): named by the frame's hash, so any of them finds it. A reader hashes what
    it read again (whoever can write to the folder could have put anything under that name)."""
    if not HASH_RE.fullmatch(key):
        raise ValueError(f"not a frame hash: {key[:40]!r}")
    return f"eden-{key}"


def one_frame(data, what: str = "a shared frame") -> wire.TokenBlob:
    """A one-frame token blob's bytes -> the blob (every field checked); WireError if it is anything else."""
    blob = wire.from_bytes(data)
    if blob.num_frames != 1:
        raise wire.WireError(f"{what} must be a blob of one frame, got {blob.num_frames}")
    return blob


def is_pair_body(body) -> bool:
    return isinstance(body, (bytes, bytearray, memoryview)) and bytes(body[:len(MAGIC)]) == MAGIC


@dataclass
class Frame:
    """One frame of a pair body: inline (``blob`` parsed from ``data``, ``hash`` computed here) or named (``blob``
    None)."""
    hash: str
    blob: wire.TokenBlob | None = None
    data: memoryview | None = None  # the one-frame blob's bytes, a view of the body


def build(frames: list, difference: float) -> bytes:
    """A pair body: ``frames`` are two items, each a one-frame blob's bytes (inline) or a hash (str)."""
    if len(frames) != 2:
        raise ValueError("a pair body holds two frames")
    entries, inline = [], []
    for f in frames:
        if isinstance(f, str):
            entries.append({"hash": f})
        else:
            entries.append({"bytes": len(f)})
            inline.append(f)
    head = json.dumps({"difference": float(difference), "frames": entries}, separators=(",", ":")).encode()
    head += b" " * (-(PREFIX.size + len(head)) % wire.ALIGN)
    return b"".join([PREFIX.pack(MAGIC, VERSION, len(head)), head, *inline])


def parse(buf) -> tuple[list[Frame], float]:
    """Check a pair body -> (its two frames, the difference); WireError naming what is wrong. Inline frames are
    parsed (``wire.from_bytes``: every field, their tokens a view of ``buf``) and hashed."""
    buf = memoryview(buf).cast("B")
    if len(buf) < PREFIX.size:
        raise wire.WireError(f"not a pair body: {len(buf)} bytes is shorter than the {PREFIX.size}-byte prefix")
    magic, version, head_len = PREFIX.unpack_from(buf)
    if magic != MAGIC:
        raise wire.WireError(f"not a pair body: bad magic {bytes(magic)!r}")
    if version != VERSION:
        raise wire.WireError(f"unsupported pair body version {version}: this server reads version {VERSION}")
    if head_len > MAX_HEAD_BYTES or PREFIX.size + head_len > len(buf):
        raise wire.WireError(f"pair body header length {head_len} is larger than the body ({len(buf)} bytes) or "
                             f"the {MAX_HEAD_BYTES}-byte limit")
    h = wire.load_json(buf[PREFIX.size:PREFIX.size + head_len], "pair body header")
    if not isinstance(h, dict) or set(h) != {"difference", "frames"}:
        raise wire.WireError("a pair body header is exactly {'difference': d, 'frames': [F0, F1]}")
    d = h["difference"]
    if type(d) not in (int, float) or not math.isfinite(d) or abs(d) > wire.MAX_STATISTIC:
        raise wire.WireError(f"pair body 'difference' must be a finite number within +-{wire.MAX_STATISTIC:g}")
    entries = h["frames"]
    if not isinstance(entries, list) or len(entries) != 2:
        raise wire.WireError("pair body 'frames' must be a list of two frames")
    frames, offset = [], PREFIX.size + head_len
    for i, e in enumerate(entries):
        if isinstance(e, dict) and set(e) == {"hash"} and isinstance(e["hash"], str) and HASH_RE.fullmatch(e["hash"]):
            frames.append(Frame(e["hash"]))
            continue
        n = e.get("bytes") if isinstance(e, dict) and set(e) == {"bytes"} else None
        if type(n) is not int or not 0 < n <= len(buf) - offset:
            raise wire.WireError(f"pair body frame {i} must be {{'hash': 32 hex digits}} or {{'bytes': n}} with n "
                                 f"bytes left in the body, got {e!r:.80}")
        data = buf[offset:offset + n]
        offset += n
        frames.append(Frame(frame_hash(data), one_frame(data, f"pair body frame {i}"), data))
    if offset != len(buf):
        raise wire.WireError(f"{len(buf) - offset} unexpected trailing bytes after the pair body's frames")
    return frames, float(d)

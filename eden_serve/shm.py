"""Same-host transport: bodies travel through shared memory, the HTTP request carries only a reference.

TorchServe's data plane copies a body several times (client -> Java -> worker socket -> Python); tokens are
10-100 MB a pair. When client and workers share a host, the bytes go into a tmpfs file instead (``/dev/shm/eden``
by default) and the request carries a *reference*: ``b"EDENREF1"`` followed by UTF-8 JSON, one of

    {"segment": NAME}                                         the whole segment is the value (frame or blob)
    {"pair": [{"segment": A, "frame": i}, {"segment": B, "frame": j}], "difference": d}
                                                              DiT+decoder only: frames of two token blobs
    {"probe": NAME or null}                                   either model: may this client use shared memory?

A probe is how a client finds out, before sending any frame, whether it shares this folder with the servers
(``client/transport.py``): ``{"probe": null}`` answers where the server keeps segments (JSON: ``shm_dir``, host, device,
whether it hands tokens off on its GPU); ``{"probe": NAME}`` answers the hash of the segment's bytes
(``probe_answer``) and writes the same hash to a new segment for the client to read back.

The bytes in a segment are exactly what HTTP would carry (an image or a token blob), so they are parsed and checked
the same way. One exception: an encoder on a GPU asked for a device handoff (``X-Eden-Handoff: device``) keeps
the tokens on its GPU and writes a *device segment*: ``b"EDENDEV1"`` followed by UTF-8 JSON
``{"blob": <the token blob's header>, "cuda": <descriptor>}`` (eden_serve/handoff.py), which readers turn into
the same blob with its tokens left where they are. Segments are written under a temporary name and renamed (no reader sees a partial one), created
0600 (same user only) and never followed through links; names are ``eden-`` + 32 hex digits, nothing else is
opened. Whoever asked for a segment unlinks it when done (the client, for the encoder's tokens and the returned
frames); anything older than the store's TTL is swept by the handlers, so a killed client or worker leaks nothing
for long.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import mmap
import os
import re
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from . import wire

POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # map every page at once (Linux): no fault per page on first touch
REF_MAGIC = b"EDENREF1"
DEVICE_MAGIC = b"EDENDEV1"
HANDOFF_UNAVAILABLE = "HandoffUnavailable"  # error "type" of a DiT+decoder that cannot use handed-off tokens at all
REF_CONTENT_TYPE = "application/x-eden-ref"
NAME_RE = re.compile(r"^eden-[0-9a-f]{32}$")
DEFAULT_DIR = "/dev/shm/eden"
MAX_REF_BYTES = 4096


class ShmError(ValueError):
    """A reference or segment that cannot be used; the message says why."""


@dataclass(frozen=True)
class ShmStore:
    root: Path = Path(DEFAULT_DIR)
    ttl_s: float = 600.0
    max_bytes: int = 1 << 31

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    # ------------------------------------------------------------------ writing
    def create(self) -> None:
        """The folder, private to this user (0700), if it does not exist yet."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def write(self, buffers) -> str:
        """Write bytes (or a list of buffers, in order) to a new segment; returns its name."""
        self.create()
        name = f"eden-{uuid.uuid4().hex}"
        tmp = self.root / f".{name}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb", buffering=0) as f:
                for buf in buffers if isinstance(buffers, (list, tuple)) else [buffers]:
                    view = memoryview(buf).cast("B")
                    while view:
                        view = view[f.write(view):]
            os.rename(tmp, self.root / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return name

    @contextlib.contextmanager
    def allocate(self, nbytes: int) -> Iterator[tuple[str, memoryview]]:
        """A new segment of ``nbytes`` to fill in place (e.g. a GPU copy straight into it): yields (name, writable
        view); published under its name when the block ends, removed if it raises."""
        self.create()
        name = f"eden-{uuid.uuid4().hex}"
        tmp = self.root / f".{name}.part"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            yield name, memoryview(mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | POPULATE))
            os.rename(tmp, self.root / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ reading
    def path(self, name: str) -> Path:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ShmError(f"invalid segment name {str(name)[:80]!r}: expected 'eden-' and 32 hex digits")
        return self.root / name

    def read(self, name: str) -> memoryview:
        """A read-only view of the segment's bytes (memory-mapped, no copy)."""
        fd = self._open(name)
        try:
            return self._map(fd, name)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def lease(self, name: str) -> Iterator[memoryview]:
        """``read``, holding a shared lock on the segment until the block ends. A device segment's writer frees
        its GPU memory only under an exclusive lock, after truncating the file: a reader sees either the whole
        segment with the memory still there, or an empty file."""
        lock = self._open(name)  # its own descriptor: a mapping keeps a duplicate of the one it maps, which would
        try:                     # keep a lock taken through it for as long as the mapping lives
            fcntl.flock(lock, fcntl.LOCK_SH)
            yield self.read(name)
        finally:
            os.close(lock)  # (releases the lock)

    def _open(self, name: str) -> int:
        path = self.path(name)
        try:
            return os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise ShmError(f"segment {name} does not exist in {self.root} (expired, already released, or on "
                           "another host: use the HTTP transport across hosts)") from None
        except OSError as e:
            raise ShmError(f"segment {name} cannot be opened: {e.strerror}") from None

    def _map(self, fd: int, name: str) -> memoryview:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ShmError(f"segment {name} is not a regular file")
        if st.st_size == 0:
            return memoryview(b"")
        if st.st_size > self.max_bytes:
            raise ShmError(f"segment {name} is {st.st_size} bytes, over the limit of {self.max_bytes}")
        return memoryview(mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED | POPULATE, prot=mmap.PROT_READ))

    def write_held(self, data: bytes) -> tuple[str, int]:
        """``write``, and an open descriptor of the new segment for its writer to lock (see ``lease``)."""
        name = self.write(data)
        return name, os.open(self.root / name, os.O_RDWR | os.O_NOFOLLOW)

    def unlink(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)

    def sweep(self) -> int:
        """Remove segments (and partial writes) older than the TTL; returns how many."""
        if not self.root.is_dir():
            return 0
        cutoff, removed = time.time() - self.ttl_s, 0
        for entry in os.scandir(self.root):
            name = entry.name.removeprefix(".").removesuffix(".part")
            if NAME_RE.match(name):
                try:
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:
                    pass
        return removed


@dataclass(frozen=True)
class Segment:
    """An answer already written to shared memory: the handler replies with a reference to it."""
    name: str
    nbytes: int


# ---------------------------------------------------------------------- references
def make_ref(**fields) -> bytes:
    return REF_MAGIC + json.dumps(fields, separators=(",", ":")).encode()


def is_ref(value) -> bool:
    return isinstance(value, (bytes, bytearray, memoryview)) and bytes(value[:len(REF_MAGIC)]) == REF_MAGIC


def parse_ref(value) -> dict:
    """The JSON object of a reference; ShmError if it is malformed."""
    if len(value) > MAX_REF_BYTES:
        raise ShmError(f"reference of {len(value)} bytes is over {MAX_REF_BYTES}")
    try:
        ref = json.loads(bytes(value[len(REF_MAGIC):]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShmError(f"reference is not valid JSON: {e}") from None
    if not isinstance(ref, dict):
        raise ShmError("reference is not a JSON object")
    return ref


def probe_answer(nonce) -> str:
    """What a server proves it read a probe segment with (``{"probe": NAME}``): a hash of the segment's bytes, so a
    client can tell its own segment from another one of the same name in another folder or on another host."""
    return hashlib.sha256(b"eden-probe:" + bytes(nonce)).hexdigest()


def pair_frames(ref: dict) -> tuple[list[tuple[str, int]], float]:
    """The (segment, frame index) of each frame of a pair reference, and its difference."""
    frames, diff = ref.get("pair"), ref.get("difference")
    if (not isinstance(frames, list) or len(frames) != 2
            or not all(isinstance(f, dict) and isinstance(f.get("segment"), str) and type(f.get("frame")) is int
                       and f["frame"] >= 0 for f in frames)):
        raise ShmError("a pair reference needs 'pair': [{'segment': NAME, 'frame': INDEX}, {...}] (two frames)")
    if type(diff) not in (int, float) or diff != diff or abs(diff) == float("inf"):
        raise ShmError("a pair reference needs a finite 'difference'")
    return [(f["segment"], f["frame"]) for f in frames], float(diff)


# ---------------------------------------------------------------------- device segments
def device_segment(blob: wire.TokenBlob, cuda: dict) -> bytes:
    """The bytes of a device segment: the blob's header and where its tokens are (``handoff.export``)."""
    return DEVICE_MAGIC + json.dumps({"blob": blob.header(), "cuda": cuda}, separators=(",", ":")).encode()


class SegmentGone(ShmError):
    """A device segment whose tokens were freed (its file was emptied under the writer's lock)."""


def read_blob(data) -> tuple[wire.TokenBlob, dict | None]:
    """A segment's token blob -> (blob, None), or for a device segment (blob whose tokens are only a shape, its
    CUDA descriptor). Only for bytes read from the store: a body that came over the network is ``wire.from_bytes``.
    Raises WireError / ShmError naming what is wrong."""
    if len(data) == 0:
        raise SegmentGone("the segment is empty: its tokens were freed (expired or released)")
    if bytes(data[:len(DEVICE_MAGIC)]) != DEVICE_MAGIC:
        return wire.from_bytes(data), None
    if len(data) > wire.MAX_HEADER_BYTES:
        raise ShmError(f"device segment of {len(data)} bytes is over {wire.MAX_HEADER_BYTES}")
    try:
        body = json.loads(bytes(data[len(DEVICE_MAGIC):]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShmError(f"device segment is not valid JSON: {e}") from None
    if not isinstance(body, dict) or set(body) != {"blob", "cuda"} or not isinstance(body["cuda"], dict):
        raise ShmError("a device segment needs exactly 'blob' (a token blob header) and 'cuda' (a descriptor)")
    return wire.from_header(body["blob"]), body["cuda"]

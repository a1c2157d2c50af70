"""Same-host transport: bodies travel through shared memory, the HTTP request carries only a reference.

TorchServe's data plane copies a body several times (client -> Java -> worker socket -> Python); tokens are
10-100 MB a pair. When client and workers share a host, the bytes go into a tmpfs file instead (``/dev/shm/eden``
by default) and the request carries a *reference*: ``b"EDENREF1"`` followed by UTF-8 JSON, one of

    {"segment": NAME}                                         the whole segment is the value (frame or blob)
    {"pair": [{"segment": A, "frame": i}, {"segment": B, "frame": j}], "difference": d}
                                                              DiT+decoder only: frames of two token blobs
    {"probe": NAME or null}                                   either model: may this client use shared memory?

A probe is how a client finds out, before sending any frame, whether it shares this folder with the servers
(``eden_client/transport.py``): ``{"probe": null}`` answers where the server keeps segments (JSON: ``shm_dir``, host,
device, whether it hands tokens off on its GPU); ``{"probe": NAME}`` answers the hash of the segment's bytes
(``probe_answer``) and writes the same hash to a new segment for the client to read back.

The bytes in a segment are exactly what HTTP would carry (an image or a token blob), so they are parsed and checked
the same way. One exception: an encoder on a GPU asked for a device handoff (``X-Eden-Handoff: device``) keeps
the tokens on its GPU and writes a *device segment*: ``b"EDENDEV1"`` followed by UTF-8 JSON
``{"blob": <the token blob's header>, "cuda": <descriptor>}`` (eden_serve/handoff.py), which readers turn into
the same blob with its tokens left where they are. Segments are written under a temporary name and renamed (no
reader sees a partial one), created 0600 (same user only); names are ``eden-`` + 32 hex digits, nothing else is
opened. Whoever asked for a segment unlinks it when done (the client, for the encoder's tokens and the returned
frames); anything older than the store's TTL is swept by the handlers, so a killed client or worker leaks nothing
for long.

Neighbours on the host are not trusted (issue 17): the folder must be private (``ShmStore.check_dir``: a real
folder of this user, mode 0700, or 0770 with a named group), segments are opened without following links and
without blocking and must be regular files of this user, they are read by copying rather than mapped (a file
truncated under a reader is a short read, not a SIGBUS), the sweep leaves alone what it cannot remove, and
``quota_bytes`` bounds what the folder may hold (``ShmFull``).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import grp
import json
import logging
import math
import mmap
import os
import re
import stat
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from . import protocol, wire

log = logging.getLogger(__name__)
POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # map every page at once (Linux): no fault per page on first touch
REF_MAGIC = b"EDENREF1"
DEVICE_MAGIC = b"EDENDEV1"
# The protocol's names (eden_serve/protocol.py), kept here under their old names for the modules that import them.
HANDOFF_UNAVAILABLE = protocol.HANDOFF_UNAVAILABLE
UNSAFE_FOLDER = protocol.SHM_FOLDER_UNSAFE
REF_CONTENT_TYPE = protocol.REFERENCE_CONTENT_TYPE
REMOTE_HEADER = protocol.REMOTE
NAME_RE = re.compile(r"eden-[0-9a-f]{32}")  # always with fullmatch (a "$" would let a trailing newline through)
DEFAULT_DIR = "/dev/shm/eden"
MAX_REF_BYTES = 4096
USAGE_RECOUNT_S = 0.25  # a quota's count of the folder is reused this long, far from the quota (ShmStore._reserve)


class ShmError(ValueError):
    """A reference or segment that cannot be used; the message says why."""


class ShmUnsafe(ShmError):
    """The shared-memory folder is not private to this user (or the named group): it is not used."""


class ShmFull(ShmError):
    """Writing this segment would pass the store's quota (answered 507: worth a retry once segments are released)."""


def _reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


@dataclass(frozen=True)
class ShmStore:
    """Segments in one folder. The folder is created 0700 (0770 with ``group``: that group may use it too) and
    refused (ShmUnsafe) when it is a link, or owned by another user, or grants more than that; segments are
    opened without following links and without blocking, must be regular files of the same owner (or group), and
    are read by copying (a file truncated while it is read is an error, not a SIGBUS). ``quota_bytes`` (0: none)
    bounds what the folder holds: a write past it raises ShmFull (see ``_reserve`` for how exactly)."""
    root: Path = Path(DEFAULT_DIR)
    ttl_s: float = 600.0
    max_bytes: int = 1 << 31
    quota_bytes: int = 0
    group: str | int | None = None

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(self, "_gid", _group_id(self.group) if self.group not in (None, "") else None)
        object.__setattr__(self, "_warned", set())
        # the folder's bytes at the last count, when, and what this store wrote since (``_reserve``)
        object.__setattr__(self, "_count", [0, -math.inf, 0])
        object.__setattr__(self, "_count_lock", threading.Lock())

    def __reduce__(self):  # (the count and its lock are this process's: a copy starts its own)
        return type(self), (self.root, self.ttl_s, self.max_bytes, self.quota_bytes, self.group)

    @property
    def dir_mode(self) -> int:
        return 0o770 if self._gid is not None else 0o700

    @property
    def file_mode(self) -> int:
        return 0o660 if self._gid is not None else 0o600

    # ------------------------------------------------------------------ the folder
    def ensure_dir(self) -> Path:
        """Create the folder if it does not exist (0700, or 0770 and the group), then ``check_dir``."""
        try:
            os.lstat(self.root)
        except FileNotFoundError:
            self.root.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.mkdir(self.root, self.dir_mode)
                if self._gid is not None:
                    os.chown(self.root, -1, self._gid)
                os.chmod(self.root, self.dir_mode | (stat.S_ISGID if self._gid is not None else 0))
            except FileExistsError:  # made by someone else meanwhile: checked below like any other
                pass
        return self.check_dir()

    def check_dir(self) -> Path:
        """The folder if it is private: a real folder (not a link), owned by this user (or, with ``group``, of that
        group), granting nothing to others (nor to its group, without ``group``). ShmUnsafe saying what is wrong
        otherwise; ShmError if it does not exist."""
        try:
            st = os.lstat(self.root)
        except FileNotFoundError:
            raise ShmError(f"the shared-memory folder {self.root} does not exist") from None
        fix = (f"remove it (or run as its owner) and let the server create it (mode {self.dir_mode:04o}), or point "
               "shm_dir / --shm-dir elsewhere")
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise ShmUnsafe(f"the shared-memory folder {self.root} is {'a link' if stat.S_ISLNK(st.st_mode) else 'not a folder'}: "
                            f"refusing to use it; {fix}")
        mine = st.st_uid == os.geteuid()
        if not mine and not (self._gid is not None and st.st_gid == self._gid):
            raise ShmUnsafe(f"the shared-memory folder {self.root} is owned by uid {st.st_uid}, not this process's "
                            f"uid {os.geteuid()}: another user could read or replace segments; {fix}")
        extra = st.st_mode & 0o777 & ~self.dir_mode
        if extra or (self._gid is not None and st.st_gid != self._gid):
            raise ShmUnsafe(f"the shared-memory folder {self.root} has mode {st.st_mode & 0o777:04o} (group "
                            f"{st.st_gid}): it must grant nothing beyond {self.dir_mode:04o}"
                            + (f" and belong to group {self.group}" if self._gid is not None else "")
                            + f"; refusing to use it; {fix}")
        return self.root

    def usage(self) -> int:
        """Bytes held in the folder (regular files only)."""
        total = 0
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
        return total

    def _reserve(self, nbytes: int) -> None:
        """Raise ShmFull if ``nbytes`` more would pass the quota. Counting the folder (a stat of every segment) took
        0.46 ms with 200 segments on a 2-core host, before every answer a worker writes (bench/NOTES.md session
        13), so the count is reused for USAGE_RECOUNT_S with this store's own writes added (removals not
        subtracted: it only over-counts), and made afresh whenever that total comes within a quarter of the quota or
        this store has written a sixteenth of it since. What other processes write in between is seen at the next
        count: far from the quota only, and each writes at most a sixteenth of it unseen."""
        if not self.quota_bytes or nbytes <= 0:
            return
        with self._count_lock:
            used, when, since = self._count
            now = time.monotonic()
            if (now - when > USAGE_RECOUNT_S or 4 * (used + since + nbytes) > 3 * self.quota_bytes
                    or 16 * (since + nbytes) > self.quota_bytes):
                used, when, since = self.usage(), now, 0
            if used + since + nbytes > self.quota_bytes:
                self._count[:] = [used, when, since]
                raise ShmFull(f"shared memory is full: {used + since} bytes held in {self.root} and {nbytes} more "
                              f"would pass the quota of {self.quota_bytes} (shm_quota_bytes): release the segments "
                              f"you are done with, or retry when they expire (shm_ttl_s {self.ttl_s:.0f} s)")
            self._count[:] = [used, when, since + nbytes]

    def _create(self, tmp: Path, flags: int) -> int:
        fd = os.open(tmp, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, self.file_mode)
        if self._gid is not None:
            os.fchown(fd, -1, self._gid)
            os.fchmod(fd, self.file_mode)
        return fd

    # ------------------------------------------------------------------ writing
    def write(self, buffers, name: str | None = None) -> str:
        """Write bytes (or a list of buffers, in order) to a new segment; returns its name. ``name`` (content-named
        segments, whose bytes are the same whoever writes them): that name, kept as it is when it exists already
        (its time refreshed against the sweep) or while another process is writing it."""
        self.ensure_dir()
        buffers = list(buffers) if isinstance(buffers, (list, tuple)) else [buffers]
        if name is not None:
            path = self.path(name)
            try:
                os.utime(path, follow_symlinks=False)
                return name
            except FileNotFoundError:
                pass
        self._reserve(sum(memoryview(b).nbytes for b in buffers))
        named, name = name is not None, name or f"eden-{uuid.uuid4().hex}"
        tmp = self.root / f".{name}.part"
        try:
            fd = self._create(tmp, os.O_WRONLY)
        except FileExistsError:
            if named:  # another process is writing the same bytes under this name now
                return name
            raise
        try:
            with os.fdopen(fd, "wb", buffering=0) as f:
                for buf in buffers:
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
        self.ensure_dir()
        self._reserve(nbytes)
        name = f"eden-{uuid.uuid4().hex}"
        tmp = self.root / f".{name}.part"
        fd = self._create(tmp, os.O_RDWR)
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
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ShmError(f"invalid segment name {str(name)[:80]!r}: expected 'eden-' and 32 hex digits")
        return self.root / name

    def read(self, name: str) -> memoryview:
        """The segment's bytes, copied into private memory (writable; no mapping of the file)."""
        with self.open(name) as seg:
            return seg.read()

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator["SegmentFile"]:
        seg = SegmentFile(self._open(name), name)
        try:
            yield seg
        finally:
            seg.close()

    @contextlib.contextmanager
    def lease(self, name: str) -> Iterator["SegmentFile"]:
        """The open segment, holding a shared lock on it until the block ends. A device segment's writer frees its
        GPU memory only under an exclusive lock, after truncating the file: a reader sees either the whole segment
        with the memory still there, or an empty file."""
        with self.open(name) as seg:
            fcntl.flock(seg.fd, fcntl.LOCK_SH)
            yield seg  # (closing the descriptor releases the lock)

    def _open(self, name: str) -> int:
        path = self.path(name)
        self.check_dir()
        try:  # no links, no waiting on a FIFO's writer, nothing but a regular file of ours
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ShmError(f"segment {name} does not exist in {self.root} (expired, already released, or on "
                           "another host: use the HTTP transport across hosts)") from None
        except OSError as e:
            raise ShmError(f"segment {name} cannot be opened: {_reason(e)}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ShmError(f"segment {name} is not a regular file")
            if st.st_uid != os.geteuid() and not (self._gid is not None and st.st_gid == self._gid):
                raise ShmError(f"segment {name} belongs to uid {st.st_uid}, not to this user")
            if st.st_size > self.max_bytes:
                raise ShmError(f"segment {name} is {st.st_size} bytes, over the limit of {self.max_bytes}")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def write_held(self, data: bytes) -> tuple[str, int]:
        """``write``, and an open descriptor of the new segment for its writer to lock (see ``lease``)."""
        name = self.write(data)
        return name, os.open(self.root / name, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)

    def unlink(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)

    def sweep(self) -> int:
        """Remove segments (and partial writes) older than the TTL; returns how many. Anything else named like one
        (a folder, something that cannot be removed) is left where it is and logged once."""
        try:
            self.check_dir()
            entries = list(os.scandir(self.root))
        except ShmError:
            return 0
        except OSError as e:
            log.warning("cannot sweep %s: %s", self.root, _reason(e))
            return 0
        cutoff, removed = time.time() - self.ttl_s, 0
        for entry in entries:
            if not NAME_RE.fullmatch(entry.name.removeprefix(".").removesuffix(".part")):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
                if st.st_mtime >= cutoff:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    raise IsADirectoryError(21, "a folder, not a segment")
                os.unlink(entry.path)
                removed += 1
            except FileNotFoundError:
                pass
            except OSError as e:
                if entry.name not in self._warned:
                    self._warned.add(entry.name)
                    log.warning("sweep: left %s in place (%s)", entry.path, _reason(e))
        return removed


class SegmentFile:
    """An open segment, read by copying (``os.preadv``) into private memory: never mapped, so a file truncated
    while it is read gives a short read (ShmError), not a SIGBUS."""

    def __init__(self, fd: int, name: str):
        self.fd, self.name = fd, name
        self.size = os.fstat(fd).st_size

    def read(self, offset: int = 0, length: int | None = None) -> memoryview:
        length = self.size - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ShmError(f"segment {self.name}: bytes {offset}..{offset + length} are outside its {self.size}")
        view = memoryview(np.empty(length, np.uint8)).cast("B")
        self.readinto(view, offset)
        return view

    def readinto(self, view: memoryview, offset: int = 0) -> None:
        """Fill ``view`` (any writable buffer, e.g. page-locked host memory) with the bytes from ``offset``: one copy,
        no buffer in between."""
        view = memoryview(view).cast("B")
        if offset < 0 or offset + view.nbytes > self.size:
            raise ShmError(f"segment {self.name}: bytes {offset}..{offset + view.nbytes} are outside its {self.size}")
        done = 0
        while done < view.nbytes:
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                raise ShmError(f"segment {self.name} was truncated while being read ({done} of {view.nbytes} bytes "
                               "read): it was changed after it was published")
            done += n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _group_id(group: str | int) -> int:
    if isinstance(group, int) or str(group).isdigit():
        return int(group)
    try:
        return grp.getgrnam(str(group)).gr_gid
    except KeyError:
        raise ShmError(f"shm group {group!r} does not exist") from None


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
    ref = wire.load_json(value[len(REF_MAGIC):], "reference", ShmError)
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
                       and 0 <= f["frame"] < wire.MAX_FRAMES for f in frames)):
        raise ShmError("a pair reference needs 'pair': [{'segment': NAME, 'frame': INDEX}, {...}] (two frames)")
    if type(diff) not in (int, float) or not math.isfinite(diff) or abs(diff) > 1e6:
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
    body = wire.load_json(data[len(DEVICE_MAGIC):], "device segment", ShmError)
    if not isinstance(body, dict) or set(body) != {"blob", "cuda"} or not isinstance(body["cuda"], dict):
        raise ShmError("a device segment needs exactly 'blob' (a token blob header) and 'cuda' (a descriptor)")
    return wire.from_header(body["blob"]), body["cuda"]


def read_blob_head(seg: SegmentFile) -> tuple[wire.TokenBlob, dict | None, int]:
    """``read_blob`` reading only the prefix and header of a host blob -> (blob whose tokens are only a shape, CUDA
    descriptor or None, offset of the payload in the segment): frames are read later, one by one
    (``read_frame``)."""
    if seg.size == 0:
        raise SegmentGone("the segment is empty: its tokens were freed (expired or released)")
    head = seg.read(0, min(seg.size, wire.PREFIX.size + wire.MAX_HEADER_BYTES))
    if bytes(head[:len(DEVICE_MAGIC)]) == DEVICE_MAGIC:
        blob, cuda = read_blob(head if seg.size <= len(head) else seg.read())
        return blob, cuda, 0
    blob, start = wire.parse_head(head, seg.size)
    return blob, None, start


def read_frame(seg: SegmentFile, blob: wire.TokenBlob, start: int, k: int):
    """Frame k's tokens [2, N, D] of a host blob in ``seg`` (its head read by ``read_blob_head``), copied."""
    frame_bytes = blob.tokens[0].nbytes
    data = seg.read(start + k * frame_bytes, frame_bytes)
    return np.frombuffer(data, dtype=blob.tokens.dtype).reshape(blob.tokens.shape[1:])

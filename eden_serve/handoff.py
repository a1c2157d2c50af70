"""Device handoff: tokens go from the encoder's GPU to the DiT+decoder's GPU without touching host memory.

With the shared-memory transport both workers share a host, so the encoder can keep its tokens on its GPU and put
a CUDA IPC handle in the segment instead of the bytes (``shm.device_segment``); the DiT+decoder maps the encoder's
memory and copies the frames it needs GPU to GPU (peer to peer over NVLink or PCIe where the GPUs allow it, else
through the driver's staging). That removes a device-to-host copy into tmpfs and a host-to-device copy out of it,
25 MB each per 1080p frame.

This module is the CUDA driver API through ``ctypes`` (``libcuda``, present wherever CUDA works) and nothing else;
no pickle, no torch internals. The encoder's side:

    desc = export(tensor)        # {"handle", "offset", "nbytes", "device", "pid"}: JSON, goes in the segment

and it keeps ``tensor`` alive until the segment is released. The DiT+decoder's side:

    t = import_copy(desc, frame_offset, shape, dtype, device)   # a new tensor on ``device``

Each import opens the handle, checks the range against what is mapped, copies, waits for the copy and closes the
handle: nothing of the encoder's memory stays mapped in the DiT+decoder (CUDA leaves freeing exported memory that
an importer still maps undefined). Whether the memory still holds the tokens is the segment lease's business
(``shm.ShmStore.lease``). A handle whose exporter has stopped raises ``TokensGone``.
"""
from __future__ import annotations

import ctypes
import logging
import os
import re
import threading

import torch

IPC_HANDLE_BYTES = 64
CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1
BUS_ID_RE = re.compile(r"^[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-9A-Fa-f]$")
DESC_KEYS = {"handle", "offset", "nbytes", "device", "pid"}
LIMITS = {"offset": 1 << 48, "nbytes": 1 << 48, "pid": 1 << 31}  # exclusive upper bounds of the integer fields

log = logging.getLogger(__name__)


class HandoffError(RuntimeError):
    """The device handoff cannot be used here (no driver, unsupported memory, bad descriptor)."""


class TokensGone(HandoffError):
    """The tokens a descriptor names are no longer on the encoder's GPU (its worker stopped, or they expired)."""


class CopyFailed(RuntimeError):
    """The copy onto this worker's own GPU failed: a fault of this worker, not of the request."""


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * IPC_HANDLE_BYTES)]  # (c_char would stop at the first zero byte)


# ---------------------------------------------------------------------- the driver
class _Driver:
    """The few libcuda entry points used here, with errors turned into exceptions naming the CUDA error."""

    def __init__(self):
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise HandoffError(f"the CUDA driver library is not available: {e}") from None
        self.lock = threading.Lock()
        self.contexts: dict[int, ctypes.c_void_p] = {}
        self.bus_ids: dict[int, str] = {}
        self.call("cuInit", ctypes.c_uint(0))

    def fn(self, *names):
        for name in names:
            f = getattr(self.lib, name, None)
            if f is not None:
                f.restype = ctypes.c_int
                return f
        raise HandoffError(f"the CUDA driver has none of {names}")

    def error_name(self, code: int) -> str:
        text = ctypes.c_char_p()
        if self.fn("cuGetErrorName")(ctypes.c_int(code), ctypes.byref(text)) == 0 and text.value:
            return text.value.decode()
        return f"CUDA error {code}"

    def call(self, name: str, *args, alias: tuple[str, ...] = ()) -> None:
        code = self.fn(*alias, name)(*args)
        if code != 0:
            raise HandoffError(f"{name}: {self.error_name(code)}")

    def context(self, ordinal: int) -> ctypes.c_void_p:
        """The device's primary context (the one torch's runtime uses), retained once."""
        with self.lock:
            if ordinal not in self.contexts:
                dev, ctx = ctypes.c_int(), ctypes.c_void_p()
                self.call("cuDeviceGet", ctypes.byref(dev), ctypes.c_int(ordinal))
                self.call("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), dev)
                self.contexts[ordinal] = ctx
            return self.contexts[ordinal]

    def push(self, ordinal: int) -> None:
        self.call("cuCtxPushCurrent", self.context(ordinal), alias=("cuCtxPushCurrent_v2",))

    def pop(self) -> None:
        self.call("cuCtxPopCurrent", ctypes.byref(ctypes.c_void_p()), alias=("cuCtxPopCurrent_v2",))

    def bus_id(self, ordinal: int) -> str:
        """The device's PCI bus id (asked of the driver once: every export and import needs it)."""
        if ordinal not in self.bus_ids:
            dev, buf = ctypes.c_int(), ctypes.create_string_buffer(32)
            self.call("cuDeviceGet", ctypes.byref(dev), ctypes.c_int(ordinal))
            self.call("cuDeviceGetPCIBusId", buf, ctypes.c_int(len(buf)), dev)
            self.bus_ids[ordinal] = buf.value.decode()
        return self.bus_ids[ordinal]

    def ordinal_of(self, bus_id: str) -> int:
        dev = ctypes.c_int()
        self.call("cuDeviceGetByPCIBusId", ctypes.byref(dev), ctypes.c_char_p(bus_id.encode()))
        return dev.value


_driver: _Driver | None = None
_driver_lock = threading.Lock()


def driver() -> _Driver:
    global _driver
    with _driver_lock:
        if _driver is None:
            _driver = _Driver()
        return _driver


def available(device: torch.device) -> bool:
    """Whether tokens on ``device`` can be handed off (a CUDA device and a loadable driver)."""
    if device.type != "cuda":
        return False
    try:
        driver()
    except HandoffError:
        return False
    return True


# ---------------------------------------------------------------------- the encoder's side
def export(tensor: torch.Tensor) -> dict:
    """A descriptor of a contiguous CUDA tensor's memory that another process on this host can map.

    The caller keeps ``tensor`` (and so its memory) alive until every importer is done; its values must be final
    (synchronise first)."""
    if tensor.device.type != "cuda" or not tensor.is_contiguous():
        raise HandoffError("only contiguous CUDA tensors can be handed off")
    drv, ordinal = driver(), tensor.device.index
    base, size, handle = ctypes.c_uint64(), ctypes.c_size_t(), _IpcHandle()
    drv.push(ordinal)
    try:
        drv.call("cuMemGetAddressRange", ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(tensor.data_ptr()),
                 alias=("cuMemGetAddressRange_v2",))
        drv.call("cuIpcGetMemHandle", ctypes.byref(handle), ctypes.c_uint64(base.value))
    finally:
        drv.pop()
    return {"handle": bytes(handle.reserved).hex(), "offset": tensor.data_ptr() - base.value,
            "nbytes": tensor.numel() * tensor.element_size(), "device": drv.bus_id(ordinal), "pid": os.getpid()}


# ---------------------------------------------------------------------- the DiT+decoder's side
def check_descriptor(desc) -> dict:
    """Raise HandoffError unless ``desc`` is a well-formed descriptor (from a segment anyone on the host wrote)."""
    if not isinstance(desc, dict) or set(desc) != DESC_KEYS:
        raise HandoffError(f"a device descriptor needs exactly the fields {sorted(DESC_KEYS)}")
    handle = desc["handle"]
    if not isinstance(handle, str) or not re.fullmatch(f"[0-9a-f]{{{2 * IPC_HANDLE_BYTES}}}", handle):
        raise HandoffError(f"device descriptor 'handle' must be {2 * IPC_HANDLE_BYTES} lowercase hex digits")
    for key, limit in LIMITS.items():
        if type(desc[key]) is not int or not 0 <= desc[key] < limit:
            raise HandoffError(f"device descriptor '{key}' must be an integer in [0, {limit})")
    if not isinstance(desc["device"], str) or not BUS_ID_RE.match(desc["device"]):
        raise HandoffError("device descriptor 'device' must be a PCI bus id like 0000:1b:00.0")
    return desc


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _open(drv: _Driver, ordinal: int, handle: _IpcHandle) -> int:
    ptr = ctypes.c_uint64()
    drv.push(ordinal)
    try:
        drv.call("cuIpcOpenMemHandle", ctypes.byref(ptr), handle, ctypes.c_uint(CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS),
                 alias=("cuIpcOpenMemHandle_v2",))
    finally:
        drv.pop()
    return ptr.value


def _mapped_bytes(drv: _Driver, ordinal: int, ptr: int) -> int:
    """Bytes mapped from ``ptr`` on (the exported allocation's size)."""
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    drv.push(ordinal)
    try:
        drv.call("cuMemGetAddressRange", ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr),
                 alias=("cuMemGetAddressRange_v2",))
    finally:
        drv.pop()
    return base.value + size.value - ptr


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def _close(drv: _Driver, ordinal: int, ptr: int) -> None:
    """Unmap; a failure is logged (the copy before it is done and good)."""
    try:
        drv.push(ordinal)
        try:
            drv.call("cuIpcCloseMemHandle", ctypes.c_uint64(ptr))
        finally:
            drv.pop()
    except HandoffError:
        log.warning("could not unmap handed-off memory", exc_info=True)


def import_copy(desc: dict, offset: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                peer: bool = False) -> torch.Tensor:
    """Copy ``shape`` elements of ``dtype`` at byte ``offset`` of the descriptor's memory into a new tensor on
    ``device`` (a CUDA device); returns once the copy is done.

    The memory is mapped into the encoder GPU's context (this process keeps one there) and copied with
    cuMemcpyPeer, or with ``peer`` into ``device``'s own context with peer access; either way the other is tried if
    the first cannot map it. The first is faster on 2x H100 with NVLink (1.3 against 1.9 ms for a 25 MB 1080p
    frame, mostly mapping and unmapping: bench/handoff_gpu.py)."""
    check_descriptor(desc)
    out = torch.empty(shape, dtype=dtype, device=device)
    nbytes = out.numel() * out.element_size()
    if offset < 0 or offset + nbytes > desc["nbytes"]:
        raise HandoffError(f"bytes {offset}..{offset + nbytes} are outside the {desc['nbytes']} handed off")
    start = desc["offset"] + offset  # from the mapping's base
    drv = driver()
    handle = _IpcHandle()
    handle.reserved = (ctypes.c_ubyte * IPC_HANDLE_BYTES).from_buffer_copy(bytes.fromhex(desc["handle"]))
    own = device.index if device.index is not None else torch.cuda.current_device()
    try:
        src = own if desc["device"].lower() == drv.bus_id(own).lower() else drv.ordinal_of(desc["device"])
    except HandoffError:  # a configuration problem (CUDA_VISIBLE_DEVICES, containers), not lost tokens
        raise HandoffError(f"the encoder's GPU {desc['device']} is not visible to this worker: give both workers "
                           "the same GPUs, or ask the encoder for host tokens (client --handoff host)") from None
    error = None
    for where in dict.fromkeys([own, src] if peer else [src, own]):
        try:
            ptr = _open(drv, where, handle)
            break
        except HandoffError as e:
            error = e
    else:
        if not _alive(desc["pid"]):
            raise TokensGone(f"the encoder worker (pid {desc['pid']}) that held these tokens has stopped")
        raise HandoffError(f"cannot map the encoder's GPU memory ({error}): workers in separate containers must "
                           "share the host's IPC namespace, or ask the encoder for host tokens (client --handoff host)")
    stream = ctypes.c_void_p(torch.cuda.current_stream(device).cuda_stream)
    try:
        try:
            mapped = _mapped_bytes(drv, where, ptr)
        except HandoffError as e:  # then the descriptor's own bounds (its file is the workers' user's, mode 0600)
            _warn_once(f"cannot query the size of mapped IPC memory, relying on the descriptor's bounds: {e}")
            mapped = None
        if mapped is not None and start + nbytes > mapped:  # never read past what was exported
            raise HandoffError(f"bytes {start}..{start + nbytes} are outside the {mapped} bytes exported")
        drv.push(own)
        try:
            at = ctypes.c_uint64(ptr + start)
            if where == own:
                drv.call("cuMemcpyDtoDAsync", ctypes.c_uint64(out.data_ptr()), at, ctypes.c_size_t(nbytes), stream,
                         alias=("cuMemcpyDtoDAsync_v2",))
            else:
                drv.call("cuMemcpyPeerAsync", ctypes.c_uint64(out.data_ptr()), drv.context(own), at,
                         drv.context(src), ctypes.c_size_t(nbytes), stream)
            drv.call("cuStreamSynchronize", stream)
        except HandoffError as e:
            raise CopyFailed(f"copying handed-off tokens onto {device} failed: {e}") from None
        finally:
            drv.pop()
    finally:
        _close(drv, where, ptr)
    return out

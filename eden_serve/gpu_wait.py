"""How a worker's threads wait for its GPU: asleep (the default) or spinning on a core.

CUDA decides this per context. Its default ("auto") spins whenever a process has fewer contexts than the host has
cores, which on a GPU host is always: every wait for the GPU (a synchronisation, a copy to the host, a CUDA graph
finishing) keeps one core at 100% for as long as the GPU works. A deployment runs several workers per GPU (two of
each model by default), each mostly waiting for the GPU, on a host whose cores the client also wants for decoding,
colour conversion and H.264 (x264 uses every core it gets): spinning workers take cores from the video encoding that
bounds the user's command (bench/NOTES.md, session 6).

``block`` makes the waiting thread sleep until the GPU signals (CU_CTX_SCHED_BLOCKING_SYNC): a core freed per
waiting worker, for a wake-up of tens of microseconds per wait (a worker waits a few times per batch of 30-60 ms).
``spin`` and ``yield`` are CUDA's other choices, ``auto`` its default. Set through the driver API on the device's
primary context (the one PyTorch uses) before the worker's first CUDA call; nothing happens on a CPU worker or where
the driver cannot be loaded.
"""
from __future__ import annotations

import ctypes
import logging

import torch

log = logging.getLogger(__name__)

# CUctx_flags: the scheduling bits of a context
MODES = {"auto": 0x00, "spin": 0x01, "yield": 0x02, "block": 0x04}
SCHED_MASK = 0x07


def _primary_context(device: torch.device):
    """(driver library, device handle, context flags, whether the context is active) of ``device``'s primary
    context, or a sentence saying why they cannot be had."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        return f"no CUDA driver library: {e}"
    handle, flags, active = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
    rc = cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(handle), device.index or 0) or \
        cuda.cuDevicePrimaryCtxGetState(handle, ctypes.byref(flags), ctypes.byref(active))
    if rc:
        return f"CUDA driver error {rc}"
    return cuda, handle, flags.value, bool(active.value)


def check_mode(mode: str) -> str:
    """``mode`` if it is one of MODES, else ValueError naming them (the setting's one check: build and load)."""
    if mode not in MODES:
        raise ValueError(f"gpu_wait must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def set_gpu_wait(device: torch.device, mode: str) -> str:
    """Make the threads of this process wait for ``device`` by ``mode`` (see MODES). Returns what was done, for the
    worker's log. Call before anything creates the device's context (later, the driver may refuse; that is logged
    and the worker carries on with CUDA's choice)."""
    check_mode(mode)
    if device.type != "cuda":
        return "CPU worker: no GPU waits"
    ctx = _primary_context(device)
    if isinstance(ctx, str):
        return f"gpu_wait {mode} not set ({ctx})"
    cuda, handle, flags, active = ctx
    # the _v2 entry point (what cuda.h calls since CUDA 11) also takes flags for an active context; the first does not
    set_flags = getattr(cuda, "cuDevicePrimaryCtxSetFlags_v2", None) or cuda.cuDevicePrimaryCtxSetFlags
    rc = set_flags(handle, ctypes.c_uint((flags & ~SCHED_MASK) | MODES[mode]))
    if rc:
        log.warning("gpu_wait %s not set on %s (CUDA driver error %d; context already active: %s)", mode, device, rc,
                    active)
        return f"gpu_wait {mode} not set (CUDA driver error {rc})"
    return f"GPU waits on {device}: {mode}"


def current_mode(device: torch.device) -> str | None:
    """The scheduling mode of ``device``'s primary context (None on a CPU or without the driver): for tests."""
    ctx = _primary_context(device) if device.type == "cuda" else "CPU"
    if isinstance(ctx, str):
        return None
    return {v: k for k, v in MODES.items()}.get(ctx[2] & SCHED_MASK)

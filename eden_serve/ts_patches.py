"""A fix for TorchServe 0.12's worker side, applied from our handlers (the project gets no more releases).

The worker reads each request from the frontend's socket with ``conn.recv(remaining)`` in a loop, appending every
packet to a growing bytearray: each call allocates a buffer as large as what is still missing (50 MB for a 1080p
pair) and every append may copy. ``read_exact`` reads straight into one preallocated buffer with ``recv_into``.
Same bytes, same end-of-stream behaviour (the worker exits when the frontend hangs up).
"""
from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)


def read_exact(conn, length: int) -> bytearray:
    data = bytearray(length)
    view = memoryview(data)
    while view:
        n = conn.recv_into(view)
        if n == 0:
            logging.info("Frontend disconnected.")
            sys.exit(0)
        view = view[n:]
    return data


def apply() -> bool:
    """Install ``read_exact`` as the worker's socket reader; False if this TorchServe has no such function."""
    try:
        from ts.protocol import otf_message_handler
    except ImportError:
        return False
    if not hasattr(otf_message_handler, "_retrieve_buffer"):
        log.warning("TorchServe's worker has no _retrieve_buffer: socket read patch not applied")
        return False
    otf_message_handler._retrieve_buffer = read_exact
    return True

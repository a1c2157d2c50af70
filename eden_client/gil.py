"""The interpreter lock during a run: the client's threads hand it over every 0.2 ms instead of every 5.

A run has many threads (the reader decoding ahead, requests in flight, the writer's conversions, the encoder) that
spend most of their time in native code without the lock and need it back for short stretches of Python. A thread
that wants the lock back waits until the one holding it lets go, which CPython forces only after the switch
interval: each return from native code can wait that long while another thread runs Python. With CPython's default
(5 ms) a 1080p frame's decode-and-convert, 3 ms alone, took 20 ms inside a run on a 2x H200 host with 22 of its 32
cores idle, and 1 ms made the 1080p command 1.4x faster (bench/NOTES.md, session 7). Measured beside one thread
running Python (session 11, a 2-core host): a 480p frame difference (~150 NumPy calls) 4.3 ms alone, 193 ms at 1 ms,
38 ms at 0.2 ms; writing an encoder request's four 480p frames to shared memory 3.1 ms alone, 20 at 1 ms, 5.8 at
0.2 ms; four threads running Python lost no measurable throughput at 0.2 ms. ``EDEN_SWITCH_INTERVAL_S`` sets another
interval (for measuring one against another).
"""
from __future__ import annotations

import contextlib
import os
import sys

SWITCH_INTERVAL_S = 0.0002


def switch_interval() -> float:
    """The interval a run uses: ``EDEN_SWITCH_INTERVAL_S`` if set to a positive number, else SWITCH_INTERVAL_S."""
    try:
        value = float(os.environ.get("EDEN_SWITCH_INTERVAL_S", ""))
    except ValueError:
        return SWITCH_INTERVAL_S
    return value if value > 0 else SWITCH_INTERVAL_S


@contextlib.contextmanager
def short_switches(interval_s: float | None = None):
    """Within the block the interpreter switches threads at least every ``interval_s`` (default:
    ``switch_interval()``; never longer than it was); the previous interval comes back after it."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, interval_s or switch_interval()))
    try:
        yield
    finally:
        sys.setswitchinterval(before)

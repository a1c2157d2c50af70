"""The interpreter lock during a run: the client's threads hand it over every millisecond instead of every five.

A run has many threads (the reader decoding ahead, requests in flight, the writer's conversions, the encoder) that
spend most of their time in native code without the lock and need it back for short stretches of Python. CPython's
default switch interval (5 ms) makes each such return wait for up to 5 ms while another thread runs Python: a 1080p
frame's decode-and-convert, 3 ms alone, took 20 ms inside a run on a 2x H200 host with 22 of its 32 cores idle
(bench/NOTES.md, session 7). A shorter interval bounds those waits at a small cost in switches.
"""
from __future__ import annotations

import contextlib
import sys

SWITCH_INTERVAL_S = 0.001


@contextlib.contextmanager
def short_switches(interval_s: float = SWITCH_INTERVAL_S):
    """Within the block the interpreter switches threads at least every ``interval_s`` (never longer than it was);
    the previous interval comes back after it."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, interval_s))
    try:
        yield
    finally:
        sys.setswitchinterval(before)

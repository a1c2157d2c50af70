"""The encoder's held device tokens: tokens an encoder on a GPU keeps in its memory for a device segment (the device
handoff, eden_serve/handoff.py), until the segment is released (unlinked by the client) or expires.

Each is freed under the segment's exclusive lock after the file is emptied, so a DiT+decoder holding a lease
(``ShmStore.lease``: a shared lock while it copies) finishes first, and a later one finds the file empty: nobody
reads memory the allocator has given to something else.
"""
from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from typing import Any, Iterator

log = logging.getLogger(__name__)


class HeldTokens:
    """Handed-off tokens by segment name: (tensor, bytes, time held, open descriptor of the segment for its lock)."""

    def __init__(self, store, max_bytes: int):
        self.store = store  # the worker's ShmStore (its folder and TTL)
        self.max_bytes = max_bytes
        self.entries: dict[str, tuple[Any, int, float, int]] = {}
        self.lock = threading.Lock()
        # one reap or drop at a time (the reaper thread; has_room and error paths on the handler's): a descriptor
        # is never closed under a reap that is about to lock or truncate it
        self.reaping = threading.RLock()

    def __contains__(self, name: str) -> bool:
        with self.lock:
            return name in self.entries

    def __iter__(self) -> Iterator[str]:
        with self.lock:
            return iter(list(self.entries))

    def __len__(self) -> int:
        with self.lock:
            return len(self.entries)

    def nbytes(self) -> int:
        with self.lock:
            return sum(entry[1] for entry in self.entries.values())

    def has_room(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more may be held (freeing what was released first if needed)."""
        if self.nbytes() + nbytes <= self.max_bytes:
            return True
        self.reap()
        return self.nbytes() + nbytes <= self.max_bytes

    def add(self, name: str, tensor, nbytes: int, fd: int, held_since: float | None = None) -> None:
        with self.lock:
            self.entries[name] = (tensor, nbytes, time.monotonic() if held_since is None else held_since, fd)

    def drop(self, name: str) -> None:
        """Free a handed-off segment's tokens now (no reader can be using them)."""
        with self.reaping:
            with self.lock:
                entry = self.entries.pop(name, None)
            if entry is not None:
                os.close(entry[3])

    def reap(self) -> int:
        """Free the tokens whose segment was released (unlinked) or is older than the TTL (then removed); returns
        how many."""
        with self.reaping:
            cutoff = time.monotonic() - self.store.ttl_s
            with self.lock:
                entries = list(self.entries.items())
            freed = 0
            for name, (_, _, created, fd) in entries:
                with self.lock:
                    if self.entries.get(name, (None,) * 4)[3] != fd:  # dropped meanwhile (released by an error)
                        continue
                if created < cutoff:
                    self.store.unlink(name)
                elif (self.store.root / name).exists():
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a DiT+decoder is copying from it: next round
                except OSError as e:
                    log.warning("handoff: cannot lock segment %s (%s): freeing its tokens", name, e)
                else:
                    os.ftruncate(fd, 0)
                self.drop(name)
                freed += 1
            return freed

    def start_reaper(self, period_s: float = 0.5) -> threading.Thread:
        """A daemon thread that reaps every ``period_s``."""
        def loop():
            while True:
                time.sleep(period_s)
                try:
                    self.reap()
                except Exception:  # noqa: BLE001 - keep reaping
                    log.warning("handoff reaper failed", exc_info=True)
        thread = threading.Thread(target=loop, name="eden-handoff-reaper", daemon=True)
        thread.start()
        return thread

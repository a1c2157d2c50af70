"""A sink's per-frame work (PNG encoding, colour conversion) on several threads, frames committed in order
(the sinks: eden_client/sinks.py)."""
from __future__ import annotations

import os
import threading
import time

import numpy as np


def usable_cores() -> int:
    """The cores this process may run on (its affinity: a container's or taskset's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 2


BACKGROUND_NICE = 5  # how much lower the writer's threads run than the rest of the client (and the servers)


def lower_priority(step: int = BACKGROUND_NICE) -> None:
    """Run the calling thread (and the threads it starts, x264's among them) ``step`` nice levels lower. The
    output's encoding takes most of a host's cores; at the same priority it delays the threads that keep the
    deployment fed (the scheduler, requests, decoding, TorchServe's workers) when they wake, and the GPUs wait.
    Lower, it gets what they leave, which is what it would get anyway. Linux keeps the nice level per thread;
    elsewhere (or where refused) nothing changes."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, min(19, os.getpriority(os.PRIO_PROCESS, 0) + step))
    except (AttributeError, OSError):
        pass


def writer_threads() -> int:
    """Threads for a sink's per-frame work: PNG encoding (30 ms to 0.25 s a 1080p frame on one core, smooth to
    noisy) or colour conversion. One per usable core: into a PNG folder this work is the client's limit (a 1080p
    run on one H200 kept 10.8 of 16 cores busy with 12 threads, bench/NOTES.md session 6); for a video the threads
    mostly wait, and x264 has threads of its own."""
    return max(2, min(32, usable_cores()))


class ParallelWriter:
    """A sink's ``write`` with its per-frame work spread over threads: ``prepare`` (PNG encoding, colour conversion)
    runs on ``threads`` threads while ``commit`` (the file, the video encoder) takes the results in order on one.

    ``write`` returns as soon as the frame is queued (it blocks only when ``depth`` frames are waiting, which bounds
    memory); an error from either step is raised by the next ``write`` or by ``close``.

    ``seconds`` says where the time went: "prepare" (summed over the threads), "commit" (the encoder or the file),
    "commit_waiting" (the committing thread waiting for the next frame to be written: the sink had nothing to do),
    "prepare_waiting" (... for a written frame's prepare to finish) and "write_blocked" (callers waiting for room:
    the sink was the slower side)."""

    _END = object()

    def __init__(self, sink, threads: int | None = None, depth: int | None = None):
        import queue
        from concurrent.futures import ThreadPoolExecutor
        self.sink = sink
        threads = threads or writer_threads()
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="eden-prepare", initializer=lower_priority)
        # frames waiting, at most 24 whatever the threads (a 4K frame is 25 MB)
        self.queue: queue.Queue = queue.Queue(depth or min(2 * threads, 24))
        self.error: BaseException | None = None
        self.discard = False
        self.seconds = {"prepare": 0.0, "commit": 0.0, "commit_waiting": 0.0, "prepare_waiting": 0.0,
                        "write_blocked": 0.0}
        self._prepare_lock = threading.Lock()
        self.thread = threading.Thread(target=self._commit, name="eden-commit", daemon=True)
        self.thread.start()

    def _prepare(self, image: np.ndarray):
        start = time.perf_counter()
        try:
            return self.sink.prepare(image)
        finally:
            with self._prepare_lock:
                self.seconds["prepare"] += time.perf_counter() - start

    def _commit(self) -> None:
        lower_priority()  # the encoder runs here (and its threads start here)
        while True:
            start = time.perf_counter()
            item = self.queue.get()
            got = time.perf_counter()
            self.seconds["commit_waiting"] += got - start
            if item is self._END:
                return
            if self.error is None and not self.discard:
                future, pts, duration = item
                try:
                    prepared = future.result()
                    ready = time.perf_counter()
                    self.seconds["prepare_waiting"] += ready - got
                    self.sink.commit(prepared, pts, duration)
                    self.seconds["commit"] += time.perf_counter() - ready
                except BaseException as e:  # noqa: BLE001 - raised in the caller
                    self.error = e

    def write(self, image: np.ndarray, pts: int, duration: int) -> None:
        if self.error is not None:
            raise self.error
        start = time.perf_counter()
        self.queue.put((self.pool.submit(self._prepare, image), pts, duration))
        self.seconds["write_blocked"] += time.perf_counter() - start

    def close(self, complete: bool = True) -> None:
        """Wait for every queued frame (or drop them when not ``complete``), then close the sink: kept if complete
        and nothing failed, discarded otherwise."""
        self.discard = not complete
        self.queue.put(self._END)
        self.thread.join()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.sink.close(complete and self.error is None)
        if complete and self.error is not None:
            raise self.error

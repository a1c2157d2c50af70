"""A torch.profiler trace of a live worker, for finding where a deployment's GPU time goes.

    EDEN_WORKER_PROFILE=/tmp/eden_profile:20:10 torchserve --start ...

Every worker started with this variable profiles its batches 20 to 29 (counted from its first, warm-up requests
included) and writes ``<dir>/<handler>_<pid>.txt``: the kernels and operators by their own GPU time, and the GPU time
per request (a request is a pair for the DiT+decoder, a chunk of frames for the encoder). Only that worker's own work
is seen: on a GPU shared by several workers, compare the per-request figure with the core in process
(``bench/kernels.py``) to see what sharing costs. Off unless the variable is set; the profiler slows the profiled
batches, so a profiled run is not a speed measurement.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ENV = "EDEN_WORKER_PROFILE"


class WorkerProfile:
    def __init__(self, spec: str, name: str):
        folder, _, rest = spec.partition(":")
        first, _, count = rest.partition(":")
        self.folder = Path(folder)
        self.first, self.count = int(first or 20), int(count or 10)
        self.path = self.folder / f"{name}_{os.getpid()}.txt"
        self.batch, self.requests, self.prof = 0, 0, None

    @classmethod
    def from_env(cls, name: str) -> "WorkerProfile | None":
        spec = os.environ.get(ENV, "")
        if not spec:
            return None
        try:
            return cls(spec, name)
        except ValueError:
            log.warning("%s=%r is not DIR[:FIRST_BATCH[:BATCHES]]: not profiling", ENV, spec)
            return None

    def before(self, requests: int) -> None:
        """Called at the start of each batch of ``requests`` requests."""
        if self.batch == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            try:
                self.prof = torch.profiler.profile(activities=activities)
                self.prof.start()
            except Exception:  # noqa: BLE001 - a diagnostic never costs a batch its answers
                log.warning("starting the worker profile failed: not profiling", exc_info=True)
                self.prof, self.first = None, -1
        if self.prof is not None:
            self.requests += requests

    def after(self) -> None:
        """Called at the end of each batch."""
        self.batch += 1
        if self.prof is None or self.batch < self.first + self.count:
            return
        prof, self.prof = self.prof, None
        try:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            prof.stop()
            events = prof.key_averages()
            gpu_us = sum(e.self_device_time_total for e in events  # kernels and copies: the GPU's own events
                         if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
            table = events.table(sort_by="self_device_time_total" if torch.cuda.is_available()
                                 else "self_cpu_time_total", row_limit=60, max_name_column_width=90)
            self.folder.mkdir(parents=True, exist_ok=True)
            self.path.write_text(
                f"batches {self.first}..{self.first + self.count - 1}: {self.requests} requests, own GPU time "
                f"{gpu_us / 1000:.1f} ms = {gpu_us / 1000 / max(self.requests, 1):.3f} ms per request\n\n{table}\n")
            log.info("worker profile written to %s", self.path)
        except Exception:  # noqa: BLE001 - a diagnostic never costs the worker
            log.warning("writing the worker profile failed", exc_info=True)

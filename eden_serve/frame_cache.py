"""The DiT+decoder's device token cache: frames of token segments kept on its device, so that the next pair using
a frame (every frame starts one pair and ends another) does not copy it again. A segment's bytes never change (it
is written once under a fresh name), so a cached frame is never stale. Least recently used out first."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any


class DeviceFrameCache:
    """(segment, frame index) -> that frame's tokens on the device [2, N, D], at most ``capacity`` of them."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.frames: OrderedDict[tuple[str, int], Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self.frames)

    def get(self, segment: str, k: int):
        """Frame k of ``segment`` if cached (now the most recently used), else None."""
        key = (segment, k)
        if key not in self.frames:
            return None
        self.frames.move_to_end(key)
        return self.frames[key]

    def put(self, segment: str, frames: dict[int, Any], last: int) -> None:
        """Keep ``frames`` (index -> tensor) of ``segment``, frame ``last`` as the most recently used; drop the least
        recently used past the capacity. A capacity of 0 keeps nothing."""
        if self.capacity <= 0:
            return
        for i in sorted(frames, key=lambda i: i == last):
            self.frames[(segment, i)] = frames[i]
        while len(self.frames) > self.capacity:
            self.frames.popitem(last=False)

"""Progress of one or many videos: frames, frames/s and ETA, per video and overall.

On a terminal one status line is redrawn in place (at most 5 times a second). Elsewhere (a log, a pipe, CI) lines
are printed only when a video starts and ends, plus an overall line every ``log_every`` seconds, so logs stay short
and greppable. ``quiet`` prints nothing but what the caller prints itself (errors, the final summary).
"""
from __future__ import annotations

import shutil
import sys
import threading
import time
from dataclasses import dataclass, field


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class _Item:
    name: str
    total: int  # expected output frames (0: unknown)
    done: int = 0
    started: float = field(default_factory=time.monotonic)

    def describe(self) -> str:
        elapsed = time.monotonic() - self.started
        fps = self.done / elapsed if elapsed > 0 else 0.0
        text = f"{self.name} {self.done}/{self.total or '?'} {fps:.1f} fps"
        if self.total and fps > 0:
            text += f" ETA {_duration((self.total - self.done) / fps)}"
        return text


class Progress:
    def __init__(self, total_frames: int = 0, total_items: int = 1, quiet: bool = False, stream=None,
                 tty: bool | None = None, log_every: float = 30.0):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.quiet = quiet
        self.total_frames = total_frames
        self.total_items = total_items
        self.finished_items = 0
        self.finished_frames = 0
        self.items: dict[int, _Item] = {}
        self.started = time.monotonic()
        self.log_every = log_every
        self._last_draw = 0.0
        self._last_log = time.monotonic()
        self._lock = threading.Lock()
        self._line_len = 0

    # ------------------------------------------------------------------ events
    def start(self, key: int, name: str, total: int) -> None:
        with self._lock:
            self.items[key] = _Item(name, total)
            if not self.tty:
                self._print(f"start {name} ({total or '?'} frames)")

    def update(self, key: int, done: int) -> None:
        with self._lock:
            self.items[key].done = done
            now = time.monotonic()
            if self.tty and now - self._last_draw >= 0.2:
                self._draw()
                self._last_draw = now
            elif not self.tty and now - self._last_log >= self.log_every:
                self._print(self._overall())
                self._last_log = now

    def finish(self, key: int, message: str) -> None:
        """An item ended (done, skipped or failed): ``message`` is printed as its line."""
        with self._lock:
            item = self.items.pop(key, None)
            self.finished_items += 1
            if item:
                self.finished_frames += max(item.done, item.total)
            self._print(message)

    def close(self) -> None:
        with self._lock:
            if self.tty and self._line_len and not self.quiet:
                self.stream.write("\r" + " " * self._line_len + "\r")
                self.stream.flush()
                self._line_len = 0

    # ------------------------------------------------------------------ rendering
    def _overall(self) -> str:
        done = self.finished_frames + sum(i.done for i in self.items.values())
        elapsed = time.monotonic() - self.started
        fps = done / elapsed if elapsed > 0 else 0.0
        text = f"[{self.finished_items}/{self.total_items}] {done}/{self.total_frames or '?'} frames {fps:.1f} fps"
        if self.total_frames and fps > 0 and done < self.total_frames:
            text += f" ETA {_duration((self.total_frames - done) / fps)}"
        return text

    def _draw(self) -> None:
        if self.quiet:
            return
        parts = [i.describe() for i in self.items.values()]
        line = " | ".join([self._overall(), *parts]) if self.total_items > 1 else (parts[0] if parts else "")
        width = shutil.get_terminal_size((100, 20)).columns - 1
        line = line[:width]
        self.stream.write("\r" + line + " " * max(0, self._line_len - len(line)))
        self.stream.flush()
        self._line_len = len(line)

    def _print(self, message: str) -> None:
        if self.quiet:
            return
        if self.tty and self._line_len:
            self.stream.write("\r" + " " * self._line_len + "\r")
            self._line_len = 0
        self.stream.write(message + "\n")
        self.stream.flush()

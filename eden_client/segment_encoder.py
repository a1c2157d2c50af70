"""One video stream made by several independent encoders, each taking whole segments of consecutive frames in turn.

x264's own threads (frame threads) stop scaling at a few cores a stream: alone on an H200 host it made 74-83 frames/s
of 1080p and 257-304 of 480p whether it had 16 or 32 cores, while two to six encoders on consecutive segments made
87-132 and 392-643 (bench/NOTES.md, session 9). This is how video tools spread one output over many cores ("chunked"
encoding): segment s goes to encoder s % count, each segment starts with a keyframe, and the packets come back in the
stream's order, so the file is one ordinary stream. The encoders have the same settings, hence the same stream
headers (checked on open).

The cost: a keyframe at every segment start (segments are 60-250 frames; x264's own keyframe interval is 250),
frames queued while an encoder finishes its previous segment, bounded by ``queued_frames`` (about 1 GiB of frames by
default, ``plan``), and a wait at the end for the last segment (made shorter where the total is known). Through the
user's command it paid at 720p and above (1080p: the run 6-13% faster, the whole command 2-5%), not at 480p, where
one x264 stream keeps up with the deployment (``plan`` keeps one there).
"""
from __future__ import annotations

import math
import os
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

from .parallel_writer import lower_priority

SEGMENT_CODECS = ("libx264", "libx264rgb")  # x265 and the others thread well enough on their own, or are untested
MAX_ENCODERS = 8
CORES_PER_ENCODER = 8  # what one x264 stream keeps busy at 1080p (12-14 of 16-32 vCPUs, at 74-83 frames/s)
MIN_SEGMENT, MAX_SEGMENT = 60, 250  # frames; x264's own keyframe interval is 250
TAIL_FRAMES = 16  # the shortest of the short segments at the end (longer than any B-frame reordering)
MAX_REORDER = 16  # the deepest B-frame reordering the time stamps allow for (x264: 2 with b-pyramid)
QUEUE_BYTES = 1 << 30  # frames waiting for their encoder, at most (less on a machine with less than 16 GiB)


@dataclass(frozen=True)
class Plan:
    encoders: int  # 1: one ordinary encoder, no segments
    segment_frames: int = 0
    threads: int = 0  # each encoder's own threads (0: the codec's choice)
    tail_threads: int = 0  # ... for the short segments at the end (see SegmentEncoder.length)

    @property
    def queued_frames(self) -> int:
        return self.encoders * self.segment_frames


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return 16 << 30


def plan(codec: str, width: int, height: int, cores: int, encoders: int | None = None,
         bytes_per_pixel: float = 1.5) -> Plan:
    """How many encoders for an output of this size on ``cores`` cores (``encoders``: the user's choice, None for
    automatic; either way no more than the frames waiting for them allow), how long their segments are, and how
    many threads each gets.

    Automatic: from 720p up, one encoder per 8 cores (about what one x264 stream keeps busy at 1080p), at most 8 and
    at most what the queue holds with segments of 60 frames (4K: one); below 720p, and for codecs other than x264,
    one (one x264 stream kept up with one or two H200s at 480p: more encoders only took cores from the rest of the
    client). Segments as long as the queue allows, 60-250 frames."""
    if codec not in SEGMENT_CODECS:
        return Plan(1)
    frame_bytes = width * height * bytes_per_pixel
    budget = min(QUEUE_BYTES, _memory_bytes() // 16)
    if encoders is None:
        encoders = cores // CORES_PER_ENCODER if width * height >= 1280 * 720 else 1
    encoders = min(encoders, int(budget // (MIN_SEGMENT * frame_bytes)))  # as many as the queue holds
    encoders = max(1, min(MAX_ENCODERS, encoders))
    if encoders == 1:
        return Plan(1)
    segment = int(max(MIN_SEGMENT, min(MAX_SEGMENT, budget // (encoders * frame_bytes))))
    threads = max(1, math.ceil(1.5 * cores / encoders))  # x264's own automatic count is 1.5 a core
    return Plan(encoders, segment, threads, max(1, math.ceil(1.5 * cores)))


class _Segment:
    """One segment's packets, in order, as its encoder gives them back."""

    def __init__(self, threads: int):
        self.threads = threads  # its encoder's
        self.packets: deque = deque()
        self.done = False


class SegmentEncoder:
    """``encode(frame)`` in the stream's order, like a codec context's, returning the packets that can be written
    now (the current segment's as they come, later segments' once the earlier ones are complete); ``flush()``
    returns the rest. ``make_context(threads)`` gives a new, identically configured encoder (one per segment),
    ``extradata`` the headers they must all make (those the container writes), ``total`` the frames expected (where
    known: the last segments are then made shorter, see ``length``).

    An encoder's error is raised by the next ``encode`` or ``flush``."""

    _STOP = object()

    def __init__(self, make_context: Callable, plan: Plan, extradata: bytes | None = None,
                 total: int | None = None):
        self.make_context = make_context
        self.plan = plan
        self.total = total
        self.segments: dict[int, _Segment] = {}
        self.head = 0  # the first segment whose packets have not all been returned
        self.frames = 0
        self.segment = -1  # the segment taking frames now
        self.segment_end = 0  # the frame it ends before
        self.error: BaseException | None = None
        self.extradata = extradata  # the stream headers every encoder must make (None: the first encoder's)
        # decoding time stamps as one encoder gives them (see _stamp): the frames' time stamps still needed, from
        # frame number _base on, the first ones, and the reordering depth, found from the first packet
        self._pts: deque = deque()
        self._base = 0
        self._first: list[int] = []
        self._depth: int | None = None
        self._opening = 0  # the first packets' decoding times run this far behind their frames'
        self._stamped = 0  # packets returned so far
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._room = threading.Semaphore(plan.queued_frames)
        self._queues = [deque() for _ in range(plan.encoders)]
        self._ready = [threading.Semaphore(0) for _ in range(plan.encoders)]
        self._abort = False
        self._threads = [threading.Thread(target=self._work, args=(i,), name=f"eden-encoder-{i}", daemon=True)
                         for i in range(plan.encoders)]
        for t in self._threads:
            t.start()

    # --- the caller's side (one thread) ---

    def length(self, start: int) -> tuple[int, int]:
        """The frames and encoder threads of the segment starting at frame ``start``. Within the last two segments'
        worth of the expected total, halves of what is left (down to 16 frames) with every thread: the last
        segment is encoded by one encoder after the input has ended, and the command waits for it (a 60-250 frame
        segment took 1 s more than one encoder's flush at 1080p, bench/NOTES.md session 9)."""
        full, left = self.plan.segment_frames, (self.total or 0) - start
        if left <= 0 or left > 2 * full:
            return full, self.plan.threads
        half = math.ceil(left / 2)
        # (never shorter than TAIL_FRAMES: more frames than expected may follow, and a segment's encoder must see
        # its reordering before it ends)
        return (half if half >= TAIL_FRAMES else max(left, TAIL_FRAMES)), self.plan.tail_threads

    def encode(self, frame) -> list:
        self._raise()
        if self.frames == self.segment_end:
            if self.segment >= 0:
                self._put(self.segment % self.plan.encoders, ("end", self.segment, None))
            self.segment += 1
            frames, threads = self.length(self.frames)
            self.segment_end = self.frames + frames
            with self._lock:
                self.segments[self.segment] = _Segment(threads)
        segment = self.segment
        while not self._room.acquire(timeout=0.5):  # bounded queue: wait for an encoder to take a frame
            self._raise()
        self._pts.append(frame.pts)
        if len(self._first) < MAX_REORDER + 1:
            self._first.append(frame.pts)
        self._put(segment % self.plan.encoders, ("frame", segment, frame))
        self.frames += 1
        return self._take(wait=False)

    def flush(self) -> list:
        """Every packet left, in order (waits for the encoders)."""
        try:
            if self.segment >= 0:
                self._put(self.segment % self.plan.encoders, ("end", self.segment, None))
            packets = self._take(wait=True)
        except BaseException:  # an encoder's error, Ctrl-C: what is still queued is dropped
            self.abort()
            raise
        self.close()
        return packets

    def close(self) -> None:
        """Stop the encoders, after what is queued for them (nothing is, after ``flush``; after an encoder's error
        or with ``abort`` it is dropped)."""
        for i in range(self.plan.encoders):
            self._put(i, self._STOP)
        for t in self._threads:
            t.join()

    def abort(self) -> None:
        self._abort = True
        self.close()

    def _put(self, worker: int, item) -> None:
        self._queues[worker].append(item)
        self._ready[worker].release()

    def _take(self, wait: bool) -> list:
        """Packets that can go out in order: the head segment's so far, and whole segments after it (all of them,
        waiting for the encoders, when ``wait``)."""
        out = []
        with self._changed:
            while True:
                if self.error is not None:
                    break
                seg = self.segments.get(self.head)
                if seg is None:
                    break
                while seg.packets:
                    out.append(self._stamp(seg.packets.popleft()))
                if seg.done:
                    del self.segments[self.head]
                    self.head += 1
                    continue
                if not wait:
                    break
                self._changed.wait(0.5)
        self._raise()
        return out

    def _stamp(self, packet):
        """The decoding time stamp one encoder gives the packet, x264's rule over the whole stream: with B-frames
        reordered ``d`` deep, packet n decodes at the time of frame n - d, and the first d packets at their own
        frame's time less the stream's opening delay (frame d's time less frame 0's). Each segment's encoder applies
        it to its own frames, which is wrong across segments: a segment starts its own opening delay, measured on
        its own first frames (a short last segment measured none), and frames unevenly spaced make that delay
        differ from segment to segment."""
        n = self._stamped
        if packet.dts is not None:
            if self._depth is None:  # the first packet: x264's opening delay says how deep it reorders
                self._opening = self._first[0] - packet.dts
                self._depth = next((d for d, t in enumerate(self._first) if t - self._first[0] == self._opening),
                                   None)
            if self._depth is None:  # (not x264's rule: keep the opening delay throughout)
                packet.dts = self._frame_pts(n) - self._opening
            elif n >= self._depth:
                packet.dts = self._frame_pts(n - self._depth)
            else:
                packet.dts = self._frame_pts(n) - self._opening
        self._stamped += 1
        keep = n + 1 - (self._depth or 0)  # the earliest frame a later packet can need
        while self._base < keep and self._pts:
            self._pts.popleft()
            self._base += 1
        return packet

    def _frame_pts(self, n: int) -> int:
        return self._pts[n - self._base]

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    # --- each encoder's thread ---

    def _work(self, index: int) -> None:
        lower_priority()  # background work, as the writer's other threads (and x264's threads start from here)
        queue, ready = self._queues[index], self._ready[index]
        context = None
        while True:
            ready.acquire()
            item = queue.popleft()
            if item is self._STOP:
                return
            kind, segment, frame = item
            if self._abort or self.error is not None:
                if kind == "frame":
                    self._room.release()
                continue
            try:
                if context is None:
                    context = self._open(self.segments[segment].threads)
                packets = context.encode(frame)  # the codec's threads and this call run without the lock
                if kind == "end":
                    context = None  # a new encoder for this worker's next segment: it starts with a keyframe
            except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
                with self._changed:
                    self.error = self.error or e
                    self._changed.notify_all()
                continue
            finally:
                if kind == "frame":
                    self._room.release()
            with self._changed:
                seg = self.segments[segment]
                seg.packets.extend(packets)
                seg.done = kind == "end"
                self._changed.notify_all()

    def _open(self, threads: int):
        context = self.make_context(threads)
        context.open()
        with self._lock:
            if self.extradata is None:
                self.extradata = context.extradata
            elif context.extradata != self.extradata:
                raise RuntimeError("the segment encoders made different stream headers (their settings differ)")
        return context

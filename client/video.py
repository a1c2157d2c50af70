"""Interpolating a stream of frames through the two served models, pipelined and memory-bounded.

For a factor m = 2, 4 or 8, input frames F0 .. F(N-1) give (N-1)*m + 1 output frames: for each consecutive pair
(F_i, F_i+1) the frame itself and m-1 in-between frames, then the last input frame once. EDEN makes midpoints, so
m = 4 and 8 recurse: the middle of (F_i, F_i+1) is made first, then the middles of each half, and so on.

Each frame goes to the encoder exactly once:

* input frames are sent in chunks of ``chunk`` consecutive frames (the blob holds their tokens and the differences
  between consecutive frames); the pair (F_i, F_i+1) is assembled from per-frame tokens
  (``wire.TokenBlob.pair``), its difference taken from the blob when both frames were in one chunk and computed
  here (``pipeline.frame_difference``, the same formula on the same pixels) when the pair spans two chunks;
* a generated middle frame that is itself an end of a finer pair (factor 4 and 8) is sent once, with whatever
  other such frames are waiting, and its pairs' differences are computed here.

Scheduling: one loop keeps up to ``max_inflight`` DiT+decoder requests and ``encoder_inflight`` encoder requests in
flight at once (the two models work at the same time), always serving the earliest segment first, and writes output
frames in order as soon as the earliest segment is complete. At most ``window`` segments (input pairs) are open, so
memory is bounded by about window x (m + 1) frames and their tokens whatever the video's length.

Scene cuts: a pair that ``scenes.SceneDetector`` calls a cut gets no generated frames; its in-between frames repeat
the pair's first frame (no morphing of two shots).

Seeds: the in-between frame with output index j uses ``frame_seed(seed, j)``, so a rerun makes the same frames.
"""
from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import numpy as np

from eden_serve import wire
from eden_serve.config import EdenConfig
from eden_serve.difference import frame_difference_uint8
from eden_serve.protocol import MAX_SEED

from .api import EncodedFrames, ServeError, TokensLost
from .frames_io import Frame
from .scenes import SceneDetector, thumbnail

FACTORS = (2, 4, 8)
_RELEASE = EdenConfig()  # the release constants of the difference input


def frame_seed(seed: int, index: int) -> int:
    """The noise seed of output frame ``index`` for a run seeded with ``seed`` (deterministic, spread out)."""
    digest = hashlib.blake2b(f"eden-video:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & MAX_SEED


def output_count(num_inputs: int, factor: int) -> int:
    """(N - 1) * m + 1: every input frame once, m - 1 new frames between each consecutive pair."""
    return (num_inputs - 1) * factor + 1 if num_inputs else 0


@dataclass
class Stats:
    """What a run did; ``encoded_frames`` counts frames sent to the encoder (each exactly once), ``reencoded``
    those sent again because the encoder worker holding their tokens on its GPU stopped."""
    input_frames: int = 0
    output_frames: int = 0
    cuts: int = 0
    encoder_requests: int = 0
    encoded_frames: int = 0
    token_bytes: int = 0
    ditdec_requests: int = 0
    reencoded: int = 0
    seconds: float = 0.0
    transport: str = ""  # which transport and handoff the client used, and why (client/transport.py)
    phases: dict = field(default_factory=dict)  # seconds of the command's phases: connect, open, run, finish

    @property
    def fps(self) -> float:
        return self.output_frames / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "output_fps": round(self.fps, 3)}

    def summary(self) -> str:
        return (f"{self.input_frames} -> {self.output_frames} frames in {self.seconds:.1f} s "
                f"({self.fps:.1f} frames/s); {self.cuts} scene cut{'s' * (self.cuts != 1)}; encoder: "
                f"{self.encoded_frames} frames in {self.encoder_requests} requests, "
                f"{self.token_bytes / 1e6:.1f} MB of tokens; DiT+decoder: {self.ditdec_requests} requests"
                + (f"; transport: {self.transport}" if self.transport else ""))


class _Node:
    """A frame the scheduler knows: its pixels and, once encoded, its tokens; ``next``/``next_difference``: the
    frame sent right after it in the same encoder request and the difference between the two (from the blob)."""
    __slots__ = ("image", "pts", "duration", "thumb", "token", "next", "next_difference", "last_use")

    def __init__(self, image: np.ndarray, pts: int = 0, duration: int = 0, thumb=None, last_use: int = 0):
        self.image, self.pts, self.duration, self.thumb = image, pts, duration, thumb
        self.token: tuple[EncodedFrames, int] | None = None  # (the encoder answer holding it, its index there)
        self.last_use = last_use  # the last segment that needs its tokens
        self.next: _Node | None = None
        self.next_difference = 0.0


class _Segment:
    """Input pair i: its m + 1 points (0 and m are the input frames), the intervals whose middle is still to make,
    and how many generations are running."""

    def __init__(self, index: int, left: _Node, right: _Node, factor: int, cut: bool):
        self.index = index
        self.points: dict[int, _Node] = {0: left, factor: right}
        self.todo: list[tuple[int, int]] = []
        self.running = 0
        if cut:
            self.points.update({k: left for k in range(1, factor)})
        else:
            self.todo.append((0, factor))

    @property
    def done(self) -> bool:
        return not self.todo and not self.running


def pair_difference(a: _Node, b: _Node) -> float:
    """The DiT's difference input for frames a -> b: from the encoder's blob if they were consecutive in one
    request, otherwise computed from the pixels with the release constants."""
    if a.next is b:
        return a.next_difference
    return frame_difference_uint8(a.image, b.image, _RELEASE)


class _Writer:
    """Runs ``write`` in a thread behind a bounded queue (video encoding overlaps the requests)."""

    def __init__(self, write: Callable, depth: int = 16):
        self.write_fn = write
        self.queue: queue.Queue = queue.Queue(depth)
        self.error: BaseException | None = None
        self.aborted = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None and not self.aborted:
                try:
                    self.write_fn(*item)
                except BaseException as e:  # noqa: BLE001 - raised in the scheduler
                    self.error = e

    def put(self, *item) -> None:
        if self.error:
            raise self.error
        self.queue.put(item)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error:
            raise self.error

    def abort(self) -> None:
        """Drop what is queued and stop (the run failed; the sink is discarded)."""
        self.aborted = True
        self.queue.put(None)
        self.thread.join()


class Interpolator:
    """Drives an ``EdenClient`` (``encode_frames`` / ``generate_pair``, over either transport) over a stream of
    frames. The encoder answers are released (their shared-memory segments removed) as soon as the last segment
    that needs their frames has been written."""

    def __init__(self, client, factor: int = 2, seed: int = 0, max_inflight: int = 16, chunk: int = 4,
                 encoder_inflight: int = 2, window: int | None = None, detector: SceneDetector | None = None,
                 token_dtype: str = "float16"):
        if factor not in FACTORS:
            raise ValueError(f"factor must be one of {FACTORS}, got {factor}")
        if not 1 <= chunk <= 16:
            raise ValueError(f"encoder chunk must be 1..16 frames (the server's max_frames), got {chunk}")
        if max_inflight < 1 or encoder_inflight < 1:
            raise ValueError("max_inflight and encoder_inflight must be at least 1")
        self.client = client
        self.factor = factor
        self.seed = seed
        self.max_inflight = max_inflight
        self.encoder_inflight = encoder_inflight
        self.chunk = chunk
        self.window = max(window or max_inflight + chunk, chunk + 1)
        self.detector = detector or SceneDetector(None)
        self.token_dtype = token_dtype
        self.reencoded = 0  # frames encoded again because their handed-off tokens were lost
        self._count_lock = threading.Lock()

    # ------------------------------------------------------------------ requests (run in the pool)
    def _encode(self, nodes: list[_Node]) -> list[tuple[EncodedFrames, list[_Node]]]:
        """Encode ``nodes`` in one request; if the answer would pass the server's response limit (413), in halves
        (and use smaller chunks from then on). Returns the blobs with the frames each holds."""
        try:
            return [(self.client.encode_frames([n.image for n in nodes], self.token_dtype), nodes)]
        except ServeError as e:
            if e.status != 413 or len(nodes) == 1:
                raise
        half = len(nodes) // 2
        self.chunk = min(self.chunk, half)
        return self._encode(nodes[:half]) + self._encode(nodes[half:])

    def _generate(self, a: _Node, b: _Node, index: int) -> np.ndarray:
        (ea, ia), (eb, ib) = a.token, b.token
        difference, seed = pair_difference(a, b), frame_seed(self.seed, index)
        try:
            image, _ = self.client.generate_pair(ea, ia, eb, ib, difference, seed)
        except TokensLost:  # the encoder worker holding these tokens on its GPU stopped: encode the two again
            with self._count_lock:
                self.reencoded += 2
            enc = self.client.encode_frames([a.image, b.image], self.token_dtype)
            try:
                image, _ = self.client.generate_pair(enc, 0, enc, 1, difference, seed)
            finally:
                self.client.release(enc)
        return image

    def _release_through(self, segment_index: float) -> None:
        """Release the encoder answers whose frames no segment up to ``segment_index`` (inclusive) still needs."""
        keep = []
        for last_use, enc in self._live:
            if last_use <= segment_index:
                self.client.release(enc)
            else:
                keep.append((last_use, enc))
        self._live = keep

    # ------------------------------------------------------------------ the loop
    def run(self, frames: Iterable[Frame], write: Callable[[np.ndarray, int, int], None],
            progress: Callable[[int], None] | None = None) -> Stats:
        """Interpolate ``frames`` (time stamps in the source's time base) and call ``write(image, pts, duration)``
        for each output frame in order (time stamps in the source's time base divided by the factor)."""
        describe = getattr(self.client, "describe_transport", None)
        stats = Stats(transport=describe() if describe else "")
        t0 = time.perf_counter()
        m = self.factor
        frames = iter(frames)
        segments: deque[_Segment] = deque()
        filling: list[_Node] = []  # input frames read but not yet sent to the encoder
        input_chunks: deque[list[_Node]] = deque()
        new_frames: deque[_Node] = deque()  # generated frames that must be encoded for the next level
        running: dict[Future, tuple] = {}
        encoding = 0
        last: _Node | None = None
        exhausted = False
        writer = _Writer(write)
        pool = ThreadPoolExecutor(self.max_inflight + self.encoder_inflight, thread_name_prefix="eden-request")
        self._live: list[tuple[int, EncodedFrames]] = []  # (last segment needing them, encoder answer)
        self.reencoded = 0
        self._written = -1  # the last segment written out
        try:
            while True:
                # read input while the window has room
                while not exhausted and len(segments) < self.window:
                    frame = next(frames, None)
                    if frame is None:
                        exhausted = True
                        break
                    thumb = None
                    if self.detector.enabled:  # (made in the decoding thread when it could: Frame.thumb)
                        thumb = frame.thumb if getattr(frame, "thumb", None) is not None else thumbnail(frame.image)
                    node = _Node(frame.image, frame.pts, frame.duration, thumb,
                                 last_use=stats.input_frames)  # segments i-1 and i use input frame i
                    if last is not None:
                        cut = self.detector.is_cut(last.thumb, node.thumb) if self.detector.enabled else False
                        stats.cuts += cut
                        segments.append(_Segment(stats.input_frames - 1, last, node, m, cut))
                    stats.input_frames += 1
                    last = node
                    filling.append(node)
                    if len(filling) >= self.chunk:  # (the chunk may shrink after a 413)
                        input_chunks.append(filling)
                        filling = []
                if filling and (exhausted or not (running or input_chunks or new_frames)):
                    input_chunks.append(filling)  # the end of the input, or nothing else can progress
                    filling = []

                # encoder requests: frames made for the next level first (they unblock the earliest segments)
                while encoding < self.encoder_inflight and (new_frames or input_chunks):
                    if new_frames:
                        nodes = [new_frames.popleft() for _ in range(min(self.chunk, len(new_frames)))]
                    else:
                        nodes = input_chunks.popleft()
                    running[pool.submit(self._encode, nodes)] = ("encode", nodes)
                    encoding += 1

                # DiT+decoder requests, earliest segment first
                generating = len(running) - encoding
                for seg in segments:
                    if generating >= self.max_inflight:
                        break
                    for p, q in list(seg.todo):
                        if generating >= self.max_inflight:
                            break
                        a, b = seg.points[p], seg.points[q]
                        if a.token is None or b.token is None:
                            continue
                        seg.todo.remove((p, q))
                        seg.running += 1
                        mid = (p + q) // 2
                        fut = pool.submit(self._generate, a, b, seg.index * m + mid)
                        running[fut] = ("generate", seg, p, q)
                        generating += 1

                # output, in order
                while segments and segments[0].done:
                    seg = segments.popleft()
                    left, right = seg.points[0], seg.points[m]
                    step = right.pts - left.pts
                    for k in range(m):
                        writer.put(seg.points[k].image, left.pts * m + k * step, step)
                        stats.output_frames += 1
                    if progress:
                        progress(stats.output_frames)
                    self._written = seg.index
                    self._release_through(seg.index)
                if exhausted and not segments:
                    if last is not None:
                        # shown for one output step, so the stream's average rate is exactly the input's x m
                        # (a lone frame keeps its own duration)
                        duration = max(last.duration, 1) * (m if stats.input_frames == 1 else 1)
                        writer.put(last.image, last.pts * m, duration)
                        stats.output_frames += 1
                        if progress:
                            progress(stats.output_frames)
                    break

                if not running:
                    continue
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    kind, *info = running.pop(fut)
                    if kind == "encode":
                        encoding -= 1
                        for enc, nodes in fut.result():
                            self._take_tokens(enc, nodes, stats)
                    else:
                        seg, p, q = info
                        seg.running -= 1
                        mid = (p + q) // 2
                        node = _Node(fut.result(), last_use=seg.index)
                        seg.points[mid] = node
                        stats.ditdec_requests += 1
                        if q - p > 2:  # ends of finer pairs: encode, then make their middles
                            new_frames.append(node)
                            seg.todo += [(p, mid), (mid, q)]
            writer.close()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            writer.abort()
            raise
        finally:
            self._release_through(float("inf"))
        pool.shutdown()
        stats.seconds = time.perf_counter() - t0
        stats.reencoded = self.reencoded
        return stats

    def _take_tokens(self, enc: EncodedFrames, nodes: list[_Node], stats: Stats) -> None:
        blob = enc.blob
        if blob.num_frames != len(nodes):
            self.client.release(enc)
            raise wire.WireError(f"the encoder answered {blob.num_frames} frames for {len(nodes)} sent")
        self._live.append((max(n.last_use for n in nodes), enc))
        self._release_through(self._written)  # frames of segments already written (scene cuts) are not needed
        for k, node in enumerate(nodes):
            node.token = (enc, k)
            if k + 1 < len(nodes):
                node.next, node.next_difference = nodes[k + 1], blob.differences[k]
        stats.encoder_requests += 1
        stats.encoded_frames += len(nodes)
        stats.token_bytes += blob.nbytes

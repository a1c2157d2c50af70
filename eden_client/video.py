"""Interpolating a stream of frames through the two served models, pipelined and memory-bounded.

Two ways to say what comes out, one machinery:

* a factor m = 2, 4 or 8: input frames F0 .. F(N-1) give (N-1)*m + 1 output frames: for each consecutive pair
  (F_i, F_i+1) the frame itself and m-1 in-between frames, then the last input frame once;
* a target rate R (``target_fps``, any positive rational, e.g. 60000/1001): output frame k is shown at
  t_k = t_0 + k/R (t_0: the first input frame's time), for every t_k up to the last input frame's time, so
  floor((t_last - t_0) * R) + 1 frames (the factor's count when R = m x a constant input rate). Frame k lies in
  the input interval [t_i, t_i+1) at the fraction u = (t_k - t_i) / (t_i+1 - t_i); u is rounded to the nearest
  multiple of 2^-D (D = ``max_depth``): 0 shows F_i itself, 1 shows F_i+1, anything else shows the generated frame
  at that dyadic time. A variable-rate input is sampled the same way on its own time stamps (constant-rate
  output).

EDEN makes midpoints only, so both recurse: a pair's positions are the integers 0 .. 2^D (0 and 2^D the input
frames, D = log2 m for a factor); a position p/2^d (reduced) is the middle of the interval [p-1, p+1]/2^d, made
from its two ends, which are generated first if they are not input frames. Only the positions an output frame
shows and their ancestors are generated, each once, shared by every output frame that needs it (a factor needs
all 2^D - 1). The time error is at most half a step of the finest level, 1 / (2^(D+1) x the input rate).

Each frame goes to the encoder once for its tokens:

* input frames are sent in chunks of ``chunk`` consecutive frames (the blob holds their tokens and the differences
  between consecutive frames); the pair (F_i, F_i+1) is assembled from per-frame tokens
  (``wire.TokenBlob.pair``), its difference taken from the blob when both frames were in one chunk. When the pair
  spans two chunks, over shared memory the second chunk's request carries F_i before its own frames (its "lead",
  ``lead_frames_default``) and the blob has that difference too; otherwise it is computed here
  (``difference.frame_difference_uint8``, the same formula on the same pixels);
* a generated middle frame that is itself an end of a finer pair (factor 4 and 8, most target rates) is sent once,
  with whatever other such frames are waiting, and its pairs' differences are computed here.

Scheduling: one loop keeps up to ``max_inflight`` DiT+decoder requests and ``encoder_inflight`` encoder requests in
flight at once (the two models work at the same time), always serving the earliest segment first, and writes output
frames in order as soon as the earliest segment is complete. At most ``window`` segments (input pairs) are open, so
memory is bounded by about window x (2 + the frames a pair generates: m - 1 for a factor, at most 2^D - 1 for a
target rate) frames and their tokens whatever the video's length.

Scene cuts: a pair that ``scenes.SceneDetector`` calls a cut gets no generated frames; its in-between frames repeat
the pair's first frame (no morphing of two shots).

Seeds: with a factor, the in-between frame with output index j uses ``frame_seed(seed, j)``; with a target rate,
the generated frame at dyadic position p/2^d of pair i uses ``frame_seed(seed, "i+p/2^d")`` (reduced): either way
the seed depends on where the frame is, never on the order requests complete, so a rerun makes the same frames.
"""
from __future__ import annotations

import hashlib
import math
import os
import queue
import threading
import time
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from typing import Callable, Iterable

import numpy as np

from eden_serve import wire
from eden_serve.config import EdenConfig
from eden_serve.difference import frame_difference_uint8
from eden_serve.protocol import MAX_SEED

from .api import EncoderAnswer, TokensLost
from .errors import ServeError
from .frames_io import Frame
from .gil import short_switches
from .scenes import SceneDetector, thumbnail

FACTORS = (2, 4, 8)
DEFAULT_MAX_DEPTH = 5  # time error <= 1 / (64 x the input rate): 0.65 ms at 24 fps, 0.52 ms at 30 fps
MAX_DEPTH = 10
MAX_CHUNK = 16  # the encoder's max_frames


@dataclass(frozen=True)
class Schedule:
    """How much the scheduler keeps in flight: DiT+decoder requests, encoder requests, frames per encoder request,
    and the most input pairs open at once (0: max_inflight + chunk), lowered where their frames would pass
    WINDOW_BYTES. The chunk is for frames of ``pixels`` (0: any size); ``fitted`` grows it for smaller frames, whose
    encoder requests cost the client about as much interpreter time each and carry fewer bytes."""
    max_inflight: int
    encoder_inflight: int
    chunk: int
    window: int = 0
    pixels: int = 0
    chunk_up_to: int = 0  # smaller frames: the chunk grows with 1 / pixels up to this (0: fixed)

    def fitted(self, pixels: int) -> Schedule:
        """The schedule for frames of ``pixels``: smaller than ``self.pixels``, chunks of proportionally more frames
        (up to chunk_up_to) and the encoder requests in flight for them (``encoder_requests``); larger frames,
        these numbers."""
        scale = self.pixels / pixels if self.pixels and pixels > 0 else 1.0
        chunk = min(max(self.chunk, round(self.chunk * scale)), max(self.chunk, self.chunk_up_to))
        return replace(self, encoder_inflight=self.encoder_requests(chunk), chunk=chunk)

    def encoder_requests(self, chunk: int) -> int:
        """Encoder requests in flight for a grown chunk: half as many once it holds twice the frames."""
        return self.encoder_inflight if chunk < 2 * self.chunk else max(1, self.encoder_inflight // 2)


# Defaults per transport, measured on H200s for 1080p frames (bench/NOTES.md, session 5). Shared memory: with 16
# DiT+decoder requests and 2 encoder requests of 4 frames in flight a 1080p run kept ~6 requests at the servers and two
# GPUs half idle (the encoder did not stay far enough ahead); 32 and 4 took two GPUs from 14.5 (32 / 2) to 11.3-14.3 ms
# a frame at 1080p and 480p from 5.3 to 3.9-4.4 ms (one GPU: 6.9 -> 5.7 ms); chunks of 8 were no better (1080p:
# 14.9-16.1 ms). Session 12, the user's command (bench/cli_speed.py, one H200): at 480p, where each encoder request
# is the client's own interpreter time more than its bytes, 2 requests of 16 frames made 5.62 ms a frame against
# 6.95 for 4 of 4 (4 of 8: 6.15, 2 of 8: 6.59; two GPUs 4 of 8: 5.52 against 6.70); at 1080p 4 of 8 = 4 of 4
# (14.83 / 14.73 ms): chunks grow for frames under 1080p, to 16 at 480p.
# HTTP: every request carries its tokens through TorchServe's frontend. Session 4: 32 / 4 (chunks of 4) took 1080p
# from 0.11 to 0.78 s a frame. Session 11 (the encoder's batches of one, frames named by hash, one H200): with 2
# encoder requests of 4 frames in flight (each answer 100 MB of float16 tokens at 1080p) the requests were at their
# limit 87-95% of the time; 4 requests of 2 frames took 1080p from 0.208 to 0.108 s a frame and 480p from 0.0235 to
# 0.019 (8 requests of 1 frame: 0.139 / 0.0176; bench/NOTES.md). Session 12, the command at 480p: 32 DiT+decoder
# requests in flight 25.3 ms a frame against 27.8 for 16 (8 encoder requests of 1 or 2 frames: 29.5 / 28.5); not the
# default: deploy/keyproxy.py, in front of remote replicas, admits 16 requests at a time (503 and a 1 s retry past
# that), and TorchServe queues 64 a model (job_queue_size), which `batch --jobs 2` with 32 each would fill.
# The window (session 10, bench/NOTES.md): with 36 pairs open, two GPUs at 1080p kept the window full 80% of the time
# (a pair stays open from its frames' encoding until it is written in order, ~0.4 s there) and made 10.1 ms a frame;
# 96 made 8.0 ms (one GPU: 14.6 -> 14.4, its GPU 90% busy either way). 96 open 1080p pairs hold ~1.2 GB of frames
# here and ~2.4 GB of float16 tokens at the servers (on the encoder's GPU with the device handoff).
FULL_HD = 1920 * 1080
SHM_SCHEDULE = Schedule(max_inflight=32, encoder_inflight=4, chunk=4, window=96, pixels=FULL_HD, chunk_up_to=16)
HTTP_SCHEDULE = Schedule(max_inflight=16, encoder_inflight=4, chunk=2)
WINDOW_BYTES = 2 << 30  # the open pairs' frames (inputs and generated) kept within this, down to max_inflight + chunk
TOKEN_WINDOW_BYTES = 3 << 30  # ... and their tokens at the servers (the shm folder's default quota is 4 GiB)


def default_schedule(transport: str) -> Schedule:
    return SHM_SCHEDULE if transport == "shm" else HTTP_SCHEDULE


_RELEASE = EdenConfig()  # the release constants of the difference input
_HALF = Fraction(1, 2)
DEFER = "defer"  # Interpolator._carry: not yet


def frame_seed(seed: int, index: int | str) -> int:
    """The noise seed of output frame ``index`` (factor runs) or of the generated frame at a pair's dyadic position
    ``"i+p/2^d"`` (target-rate runs) for a run seeded with ``seed`` (deterministic, spread out)."""
    digest = hashlib.blake2b(f"eden-video:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & MAX_SEED


def output_count(num_inputs: int, factor: int) -> int:
    """(N - 1) * m + 1: every input frame once, m - 1 new frames between each consecutive pair."""
    return (num_inputs - 1) * factor + 1 if num_inputs else 0


def target_count(first: Fraction, last: Fraction, rate: Fraction) -> int:
    """Output frames at ``rate`` for inputs shown from ``first`` to ``last`` (seconds): every t_0 + k/R <= last."""
    return math.floor((last - first) * rate) + 1


def max_time_error(input_rate: Fraction, max_depth: int) -> Fraction:
    """The largest time error of a target-rate run: half the finest dyadic step of an input interval, in seconds."""
    return 1 / (Fraction(input_rate) * 2 ** (max_depth + 1))


def _gcd(a: Fraction, b: Fraction) -> Fraction:
    """The largest time step that both rationals are integer multiples of (gcd(0, b) = b)."""
    if a == 0:
        return b
    return Fraction(math.gcd(a.numerator * b.denominator, b.numerator * a.denominator),
                    a.denominator * b.denominator)


@dataclass(frozen=True)
class TimeGrid:
    """The output times of a target-rate run: frame k at ``start + k / rate`` seconds, written with the integer
    time stamp ``(start + k / rate) / time_base``. The time base is 1/rate when the start is on that grid (a
    stream starting at 0), else the largest step both the start and 1/rate are multiples of, so every stamp and
    every duration is an exact integer."""
    rate: Fraction
    start: Fraction
    time_base: Fraction

    @classmethod
    def make(cls, rate, input_time_base, first_pts: int) -> "TimeGrid":
        rate = Fraction(rate)
        if rate <= 0:
            raise ValueError(f"the target frame rate must be positive, got {rate}")
        start = first_pts * Fraction(input_time_base)
        return cls(rate, start, _gcd(start, 1 / rate))

    @property
    def step(self) -> int:
        """One output frame's duration in the time base."""
        return int(1 / (self.rate * self.time_base))

    def time(self, k: int) -> Fraction:
        return self.start + k / self.rate

    def pts(self, k: int) -> int:
        stamp = self.time(k) / self.time_base
        assert stamp.denominator == 1
        return int(stamp)


def dyadic_path(q: int, span: int) -> list[int]:
    """The positions (of 0 .. span, span a power of 2) generated on the way to position ``q``: the middle of
    (0, span), then the middle of the half holding q, and so on until q (empty for 0 and span)."""
    path = []
    lo, hi = 0, span
    while 0 < q < span:
        mid = (lo + hi) // 2
        path.append(mid)
        if q == mid:
            break
        lo, hi = (lo, mid) if q < mid else (mid, hi)
    return path


@dataclass
class Stats:
    """What a run did; ``encoded_frames`` counts frames the encoder made tokens of (each once; ``lead_frames`` were
    sent for a difference only, and count here only where an encoder that predates them encoded them too),
    ``reencoded`` those sent again because the encoder worker holding their tokens on its GPU stopped."""
    input_frames: int = 0
    output_frames: int = 0
    lead_frames: int = 0  # frames sent before a chunk for their pair's difference alone (``lead_frames_default``)
    cuts: int = 0
    encoder_requests: int = 0
    encoded_frames: int = 0
    token_bytes: int = 0
    ditdec_requests: int = 0
    reencoded: int = 0
    # request body bytes the client sent (eden_client/api.py EdenClient.wire): to the DiT+decoder (over HTTP the tokens,
    # each frame once per worker with the frame cache; over shm the references) and to the encoder (the frames)
    wire_bytes: int = 0
    encoder_wire_bytes: int = 0
    frame_ref_hits: int = 0  # frames named by hash that the DiT+decoder held
    frame_ref_misses: int = 0  # ... that it did not (each miss resends that pair with both frames inline)
    frame_ref_races: int = 0  # ... of those, named while the request carrying them was still on its way
    seconds: float = 0.0
    max_time_error_ms: float = 0.0  # target-rate runs: the largest |time shown - time asked| of an output frame
    transport: str = ""  # which transport and handoff the client used, and why (eden_client/transport.py)
    schedule: dict = field(default_factory=dict)  # what was kept in flight (Schedule's fields; the chunk as ended)
    retries: dict = field(default_factory=dict)  # requests tried again, "model: reason" -> count (ModelClient.retries)
    # seconds of the command's phases: start (the interpreter and imports), connect, open, run, finish
    phases: dict = field(default_factory=dict)
    # seconds of the client's own work on the frames (eden_client/convert.py): read (decoding, colour conversion,
    # scene thumbnails), prepare (colour conversion or PNG, summed over threads), commit (the video encoder or the
    # files), commit_waiting (the writer idle, waiting for answers), prepare_waiting (the encoder waiting for a
    # frame's conversion or PNG), write_blocked (answers waiting for the writer)
    client_seconds: dict = field(default_factory=dict)
    pace: str = ""  # what set the run's pace when one side clearly did (eden_client/convert.py pace_note)
    encoders: int = 0  # a video output's encoders (eden_client/segment_encoder.py; 0: a PNG folder)

    @property
    def fps(self) -> float:
        return self.output_frames / self.seconds if self.seconds else 0.0

    @property
    def wire_bytes_per_generated_frame(self) -> float:
        return self.wire_bytes / self.ditdec_requests if self.ditdec_requests else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "output_fps": round(self.fps, 3),
                "wire_bytes_per_generated_frame": round(self.wire_bytes_per_generated_frame)}

    def summary(self) -> str:
        return (f"{self.input_frames} -> {self.output_frames} frames in {self.seconds:.1f} s "
                f"({self.fps:.1f} frames/s); {self.cuts} scene cut{'s' * (self.cuts != 1)}; encoder: "
                f"{self.encoded_frames} frames in {self.encoder_requests} request{'s' * (self.encoder_requests != 1)}, "
                f"{self.token_bytes / 1e6:.1f} MB of tokens; DiT+decoder: {self.ditdec_requests} requests"
                + (f", {self.wire_bytes_per_generated_frame / 1e6:.2f} MB sent per generated frame"
                   if self.wire_bytes else "")
                + (f"; time error <= {self.max_time_error_ms:.2f} ms" if self.max_time_error_ms else "")
                + (f"; retried: {', '.join(f'{k} x{n}' for k, n in sorted(self.retries.items()))}"
                   if self.retries else "")
                + (f"; transport: {self.transport}" if self.transport else "")
                + (f"; {self.encoders} video encoders on segments" if self.encoders > 1 else "")
                + (f"; {self.pace}" if self.pace else ""))


class _Node:
    """A frame the scheduler knows: its pixels and, once encoded, its tokens; ``next``/``next_difference``: the
    frame sent right after it in the same encoder request and the difference between the two (from the blob)."""
    __slots__ = ("image", "pts", "duration", "thumb", "token", "next", "next_difference", "last_use")

    def __init__(self, image: np.ndarray, pts: int = 0, duration: int = 0, thumb=None, last_use: int = 0):
        self.image, self.pts, self.duration, self.thumb = image, pts, duration, thumb
        self.token: tuple[EncoderAnswer, int] | None = None  # (the encoder answer holding it, its index there)
        self.last_use = last_use  # the last segment that needs its tokens
        self.next: _Node | None = None
        self.next_difference = 0.0


class _PairSpan:
    """Input pair i on a grid of ``span`` + 1 positions (0 and span are the input frames): ``plan`` lists its output
    frames (position shown, pts, duration), ``wanted`` the positions to generate (those shown and their
    ancestors), ``todo`` the intervals whose middle is still to make, ``running`` the generations in flight."""

    def __init__(self, index: int, left: _Node, right: _Node, span: int, plan: list[tuple[int, int, int]],
                 cut: bool):
        self.index = index
        self.span = span
        self.plan = plan
        self.points: dict[int, _Node] = {0: left, span: right}
        self.wanted: set[int] = set()
        self.todo: list[tuple[int, int]] = []
        self.running = 0
        shown = {q for q, _, _ in plan if 0 < q < span}
        if cut:  # no morphing across a cut: the in-between frames repeat the pair's first frame
            self.points.update({q: left for q in shown})
            return
        for q in shown:
            self.wanted.update(dyadic_path(q, span))
        if self.wanted:
            self.todo.append((0, span))

    def children(self, p: int, q: int) -> list[tuple[int, int]]:
        """The halves of (p, q) whose middle is wanted."""
        mid = (p + q) // 2
        return [(a, b) for a, b in ((p, mid), (mid, q)) if b - a >= 2 and (a + b) // 2 in self.wanted]

    @property
    def done(self) -> bool:
        return not self.todo and not self.running


LEAD_FRAMES_ENV = "EDEN_LEAD_FRAMES"  # "0": never (for comparisons: bench/NOTES.md session 13)


def lead_frames_default(client) -> bool:
    """Whether input chunks' encoder requests carry the frame before them: over shared memory, yes. Every pair whose
    frames are in two encoder requests needs the DiT's difference input, which the encoder computes for consecutive
    frames it is sent; without the frame before, the client computes it from the pixels (``pair_difference``):
    8-50 ms of NumPy a 1080p pair, in ~250 calls that each give the interpreter lock up and wait to take it back,
    in the request threads. It was the largest item of the two-GPU 1080p command's GIL profile (24% of the samples,
    one pair in four with chunks of 4; bench/NOTES.md session 13). The lead costs the client one copy into shared
    memory and the encoder one frame's upload and difference, no tokens (``EdenClient.encode_frames``). Over HTTP it
    would cost a frame's bytes on the network: no."""
    return getattr(client, "transport", "http") == "shm" and os.environ.get(LEAD_FRAMES_ENV, "1") != "0"


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


class _Occupancy:
    """What the scheduler kept in flight while it waited for answers, averaged over that time (levels: means;
    flags: the share of the time they held). Says which limit a run met: the window of open segments, the encoder
    requests, the DiT+decoder requests, or none (then the servers set the pace)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.seconds = 0.0
        self._state: dict | None = None
        self._since = 0.0

    def enter(self, **state) -> None:
        self._state, self._since = state, time.perf_counter()

    def leave(self) -> None:
        dt = time.perf_counter() - self._since
        self.seconds += dt
        for k, v in self._state.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * dt

    def means(self) -> dict[str, float]:
        return {k: round(v / self.seconds, 3) for k, v in self.sums.items()} if self.seconds else {}


class Interpolator:
    """Drives an ``EdenClient`` (``encode_frames`` / ``generate_pair``, over either transport) over a stream of
    frames. The encoder answers are released (their shared-memory segments removed) as soon as the last segment
    that needs their frames has been written."""

    def __init__(self, client, factor: int = 2, seed: int = 0, max_inflight: int | None = None,
                 chunk: int | None = None, encoder_inflight: int | None = None,
                 window: int | None = None, detector: SceneDetector | None = None,
                 token_dtype: str = "float16", target_fps: Fraction | None = None,
                 time_base: Fraction = Fraction(1), max_depth: int = DEFAULT_MAX_DEPTH, sharing: int = 1,
                 lead_frames: bool | None = None):
        """With ``target_fps`` (then ``factor`` is ignored) output frames are at that rate; ``time_base`` is the
        input's (seconds per pts unit), ``max_depth`` the deepest midpoint level (see the module's docstring).
        ``max_inflight``, ``chunk`` and ``encoder_inflight`` left None take the client's transport's
        ``default_schedule``, fitted to each run's frame size at its first frame (``fit``). ``sharing``: runs at
        once on this host and deployment (``batch --jobs``, Ray's ``--per-node``), which share the window's memory
        bounds. ``lead_frames``: each input chunk's encoder request also carries the frame before it, so that the
        encoder gives the difference of the pair they make (see ``lead_frames_default``)."""
        if target_fps is None and factor not in FACTORS:
            raise ValueError(f"factor must be one of {FACTORS}, got {factor}")
        if target_fps is not None and Fraction(target_fps) <= 0:
            raise ValueError(f"the target frame rate must be positive, got {target_fps}")
        if not 1 <= max_depth <= MAX_DEPTH:
            raise ValueError(f"max_depth must be 1..{MAX_DEPTH}, got {max_depth}")
        for name, value in (("max_inflight", max_inflight), ("encoder_inflight", encoder_inflight)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if chunk is not None and not 1 <= chunk <= MAX_CHUNK:
            raise ValueError(f"encoder chunk must be 1..{MAX_CHUNK} frames (the server's max_frames), got {chunk}")
        self.client = client
        self.factor = factor
        self.seed = seed
        self.schedule = default_schedule(getattr(client, "transport", "http"))
        self._asked = (max_inflight, encoder_inflight, chunk, window)  # (None: the schedule's, fitted to each run)
        self._chunk_cap = MAX_CHUNK  # (lowered by a 413: the server's response limit)
        self._apply(self.schedule)  # (until a run's first frame says its size)
        self.sharing = max(1, sharing)
        self.detector = detector or SceneDetector(None)
        self.token_dtype = token_dtype
        self.target_fps = None if target_fps is None else Fraction(target_fps)
        self.time_base = Fraction(time_base)
        self.max_depth = max_depth
        self.span = 2 ** max_depth if self.target_fps is not None else factor
        self.grid: TimeGrid | None = None  # target rate: set from the first frame
        self.first_time = self.last_time = None  # target rate: the input's first and last times (seconds)
        self.reencoded = 0  # frames encoded again because their handed-off tokens were lost
        self.lead_frames = lead_frames_default(client) if lead_frames is None else lead_frames
        self._lead_room = MAX_CHUNK  # chunks as long as this go without a lead (lowered by a 413 to one with a lead)
        self._count_lock = threading.Lock()

    def _apply(self, schedule: Schedule) -> None:
        """max_inflight, encoder_inflight, chunk and window from ``schedule`` where they were not asked for."""
        max_inflight, encoder_inflight, chunk, window = self._asked
        self.max_inflight = schedule.max_inflight if max_inflight is None else max_inflight
        self.chunk = min(self._chunk_cap, schedule.chunk if chunk is None else chunk)
        if encoder_inflight is None:  # (a chunk asked for keeps the transport's own number: fitting follows the chunk)
            encoder_inflight = self.schedule.encoder_inflight if chunk is not None else \
                self.schedule.encoder_requests(self.chunk)
        self.encoder_inflight = encoder_inflight
        least = self.max_inflight + self.chunk
        self.window = max(window or max(schedule.window, least), self.chunk + 1)  # (the most)
        self._fit_window = not window and self.window > least  # (each run, from its first frame)

    def _most_requests(self) -> int:
        """Requests a run may have in flight at once, whatever its frames' size (its pool's threads)."""
        max_inflight, encoder_inflight, _, _ = self._asked
        s = self.schedule
        return ((s.max_inflight if max_inflight is None else max_inflight)
                + (s.encoder_inflight if encoder_inflight is None else encoder_inflight))

    def fit(self, image: np.ndarray) -> int:
        """Set this run's schedule for frames like ``image``: the transport's (``Schedule.fitted`` to their pixels)
        where none was asked for. Returns the window: pairs open at once (``fitted_window``)."""
        self._apply(self.schedule.fitted(image.shape[0] * image.shape[1]))
        return self.fitted_window(image.nbytes) if self._fit_window else self.window

    def fitted_window(self, frame_bytes: int) -> int:
        """The window for RGB frames of ``frame_bytes``, never below what the requests in flight need (max_inflight
        + chunk). An open pair holds its first input frame and the frames it generates here (at most its span, a
        target rate's counted as 4: most conversions are under 4x), within WINDOW_BYTES, and the tokens of its
        encoded frames at the servers (on the encoder's GPU, or in the shared-memory folder with its 4 GiB quota),
        within TOKEN_WINDOW_BYTES: estimated from the released model's sizes, two float16 token sets of 768 values
        for every 16x16x3 patch, 4 bytes a pixel byte (int8: 2, float32: 8). Runs sharing the host divide both."""
        frames = self.span if self.target_fps is None else min(self.span, 4)
        per_pixel_byte = {"int8": 2, "float32": 8}.get(self.token_dtype, 4)
        fits = min(WINDOW_BYTES // self.sharing // max(1, frame_bytes * frames),
                   TOKEN_WINDOW_BYTES // self.sharing // max(1, frame_bytes * per_pixel_byte * max(1, frames // 2)))
        return max(self.max_inflight + self.chunk, min(self.window, fits))

    # ------------------------------------------------------------------ requests (run in the pool)
    def _encode(self, nodes: list[_Node], lead: _Node | None = None,
                inputs: bool = False) -> list[tuple[EncoderAnswer, list[_Node], _Node | None]]:
        """Encode ``nodes`` in one request, after ``lead`` (the input frame before them, sent only for the
        difference of the pair it makes with the first: see ``lead_frames``) where the request has room for it; if
        the answer would pass the server's limits (413), without the lead, then in halves (and use smaller chunks
        from then on). ``inputs``: the nodes are consecutive input frames (parts after the first are led by the
        frame before them). Returns the blobs with the frames each holds for its tokens and its lead (None: none);
        if a part fails, the answers of the parts before it are released."""
        if len(nodes) > self.chunk:  # formed before a 413 made the chunks smaller: do not send it to hear 413 again
            parts = [nodes[k:k + self.chunk] for k in range(0, len(nodes), self.chunk)]
            return self._encode_parts([(part, lead if k == 0 else self._lead(parts[k - 1][-1], inputs))
                                       for k, part in enumerate(parts)], inputs)
        if lead is not None and len(nodes) >= min(self._chunk_cap, self._lead_room):  # no room for it: computed here
            lead = None
        sent, led = (nodes, {}) if lead is None else ([lead, *nodes], {"lead": True})
        try:
            return [(self.client.encode_frames([n.image for n in sent], self.token_dtype, **led), nodes, lead)]
        except ServeError as e:
            if e.status != 413 or len(sent) == 1:
                raise
        if lead is not None:  # perhaps one frame over the server's max_frames: leads only for shorter chunks
            self._lead_room = min(self._lead_room, len(nodes))
            return self._encode(nodes, None, inputs)
        half = len(nodes) // 2
        self.chunk = self._chunk_cap = min(self.chunk, half)
        return self._encode_parts([(nodes[:half], None), (nodes[half:], self._lead(nodes[half - 1], inputs))], inputs)

    def _encode_parts(self, parts: list, inputs: bool) -> list:
        """``_encode`` of each (nodes, lead) in turn; if one fails, the answers of those before it are released."""
        answers = []
        try:
            for nodes, lead in parts:
                answers += self._encode(nodes, lead, inputs)
        except BaseException:
            self._release_answers(answers)
            raise
        return answers

    def _release_answers(self, answers: list) -> None:
        """Release the encoder answers of ``_encode``'s (answer, nodes, lead) results: no pair will use them."""
        for enc, *_ in answers:
            self.client.release(enc)

    def _release_when_answered(self, running: dict) -> None:
        """The encoder requests still in ``running`` (the run ended or failed): their answers, which no pair will
        use, are released as they come (their failures do not matter: nobody needs those tokens)."""
        def release(future: Future) -> None:
            if not future.cancelled() and future.exception() is None:
                self._release_answers(future.result())
        for future, (kind, *_) in list(running.items()):
            if kind == "encode":
                future.add_done_callback(release)
        running.clear()

    def _lead(self, node: _Node | None, inputs: bool = True) -> _Node | None:
        """``node`` as the lead of the chunk of input frames after it, where chunks have leads."""
        return node if self.lead_frames and inputs else None

    def _seed_key(self, segment: int, position: int) -> int | str:
        """What a generated frame's seed derives from: its output index for a factor (as always), its pair and
        reduced dyadic position for a target rate."""
        if self.target_fps is None:
            return segment * self.span + position
        return f"{segment}+{Fraction(position, self.span)}"

    def _generate(self, a: _Node, b: _Node, key: int | str, carry: bool | None = None) -> np.ndarray:
        (ea, ia), (eb, ib) = a.token, b.token
        difference, seed = pair_difference(a, b), frame_seed(self.seed, key)
        try:
            image, _ = self.client.generate_pair(ea, ia, eb, ib, difference, seed,
                                                 **({} if carry is None else {"carry": carry}))
        except TokensLost:  # the encoder worker holding these tokens on its GPU stopped: encode the two again
            with self._count_lock:
                self.reencoded += 2
            enc = self.client.encode_frames([a.image, b.image], self.token_dtype)
            try:
                image, _ = self.client.generate_pair(enc, 0, enc, 1, difference, seed)
            finally:
                self.client.release(enc)
        except ServeError as e:
            if e.status != 413:
                raise
            size = ea.blob.frame(ia).nbytes * 2
            raise ServeError(f"{e}. A pair of these frames' {self.token_dtype} tokens is {size / 2**20:.0f} MiB, "
                             f"over TorchServe's request limit (max_request_size): use --token-dtype float16 or "
                             f"--transport shm (client and servers on one host), or raise the limit", 413) from None
        return image

    def _carry(self, segments, k: int, p: int, q: int, exhausted: bool):
        """Over HTTP with frame references, which request carries each input frame (``EdenClient._generate_by_refs``):
        an even segment's input pair carries both its frames, an odd one names them once their carriers answered,
        so each frame goes inline once and no miss races a frame still on its way to another worker. An odd pair is
        sent only after the next segment's, so it never waits on a request not sent yet (DEFER until then). None:
        not an input pair, or no references."""
        if (p, q) != (0, self.span) or not getattr(self.client, "frame_refs", False):
            return None
        if segments[k].index % 2 == 0:
            return True
        if k + 1 < len(segments):
            return DEFER if (0, self.span) in segments[k + 1].todo else False
        return False if exhausted else DEFER

    def _release_through(self, segment_index: float) -> None:
        """Release the encoder answers whose frames no segment up to ``segment_index`` (inclusive) still needs."""
        keep = []
        for last_use, enc in self._live:
            if last_use <= segment_index:
                self.client.release(enc)
            else:
                keep.append((last_use, enc))
        self._live = keep

    # ------------------------------------------------------------------ what each pair shows
    def _plan(self, left: _Node, right: _Node, stats: Stats) -> list[tuple[int, int, int]]:
        """The output frames of the pair (left, right): (position shown, pts, duration), in order."""
        m = self.span
        if self.target_fps is None:  # m frames: the left one and m - 1 new ones, at the source's stamps x m
            step = right.pts - left.pts
            return [(k, left.pts * m + k * step, step) for k in range(m)]
        grid, plan = self.grid, []
        t_a, t_b = left.pts * self.time_base, right.pts * self.time_base
        while (t := grid.time(self._next_output)) < t_b:
            u = (t - t_a) / (t_b - t_a)  # in [0, 1): earlier frames went to earlier pairs
            q = math.floor(u * m + _HALF)  # the nearest multiple of 2^-D (m = span), 1 = the right frame
            error = abs(u - Fraction(q, m)) * (t_b - t_a)
            stats.max_time_error_ms = max(stats.max_time_error_ms, float(error) * 1000)
            plan.append((q, grid.pts(self._next_output), grid.step))
            self._next_output += 1
        return plan

    def _last_frame(self, last: _Node, stats: Stats) -> tuple[int, int] | None:
        """(pts, duration) of the last input frame's own output frame, or None if it has none."""
        if self.target_fps is None:
            # shown for one output step, so the stream's average rate is exactly the input's x m (a lone frame
            # keeps its own duration)
            m = self.span
            return last.pts * m, max(last.duration, 1) * (m if stats.input_frames == 1 else 1)
        grid = self.grid
        if stats.input_frames == 1:  # a lone frame keeps its own duration
            return grid.pts(0), max(1, round(max(last.duration, 1) * self.time_base / grid.time_base))
        if grid.time(self._next_output) == last.pts * self.time_base:  # the grid meets the last frame
            return grid.pts(self._next_output), grid.step
        return None

    # ------------------------------------------------------------------ the loop
    def run(self, frames: Iterable[Frame], write: Callable[[np.ndarray, int, int], None],
            progress: Callable[[int], None] | None = None) -> Stats:
        """Interpolate ``frames`` (time stamps in the source's time base) and call ``write(image, pts, duration)``
        for each output frame in order (time stamps in the source's time base divided by the factor, or in the
        target rate's ``TimeGrid.time_base``). The run's threads switch every 0.2 ms (``gil``)."""
        with short_switches():
            return self._run(frames, write, progress)

    def _run(self, frames: Iterable[Frame], write: Callable[[np.ndarray, int, int], None],
             progress: Callable[[int], None] | None) -> Stats:
        describe = getattr(self.client, "describe_transport", None)
        stats = Stats(transport=describe() if describe else "")
        wire_before = dict(getattr(self.client, "wire", None) or {})
        retries_before = self._retries()
        t0 = time.perf_counter()
        m = self.span
        self.grid = None
        self._next_output = 0  # target rate: the next output frame to place
        frames = iter(frames)
        segments: deque[_PairSpan] = deque()
        filling: list[_Node] = []  # input frames read but not yet sent to the encoder
        input_chunks: deque[tuple[_Node | None, list[_Node]]] = deque()  # (lead, frames): see _encode
        tail: _Node | None = None  # the last frame of the last input chunk (the next one's lead)
        new_frames: deque[_Node] = deque()  # generated frames that must be encoded for the next level
        running: dict[Future, tuple] = {}
        encoding = 0
        last: _Node | None = None
        exhausted = False
        writer = _Writer(write)
        occupancy = _Occupancy()
        window, fit = self.window, True  # (fitted to this run's frames when they come)
        pool = ThreadPoolExecutor(self._most_requests(), thread_name_prefix="eden-request")
        self._live: list[tuple[int, EncoderAnswer]] = []  # (last segment needing them, encoder answer)
        self.reencoded = 0
        self._written = -1  # the last segment written out
        try:
            while True:
                # read input while the window has room
                while not exhausted and len(segments) < window:
                    frame = next(frames, None)
                    if frame is None:
                        exhausted = True
                        break
                    if fit:
                        fit, window = False, self.fit(frame.image)
                    thumb = None
                    if self.detector.enabled:  # (made in the decoding thread when it could: Frame.thumb)
                        thumb = frame.thumb if getattr(frame, "thumb", None) is not None else thumbnail(frame.image)
                    node = _Node(frame.image, frame.pts, frame.duration, thumb,
                                 last_use=stats.input_frames)  # segments i-1 and i use input frame i
                    if self.target_fps is not None:
                        if self.grid is None:
                            self.grid = TimeGrid.make(self.target_fps, self.time_base, frame.pts)
                            self.first_time = frame.pts * self.time_base
                        self.last_time = frame.pts * self.time_base
                    if last is not None:
                        cut = self.detector.is_cut(last.thumb, node.thumb, getattr(frame, "similarity", None))
                        stats.cuts += cut
                        segments.append(_PairSpan(stats.input_frames - 1, last, node, m,
                                                 self._plan(last, node, stats), cut))
                    stats.input_frames += 1
                    last = node
                    filling.append(node)
                    if len(filling) >= self.chunk:  # (the chunk may shrink after a 413)
                        input_chunks.append((self._lead(tail), filling))
                        tail, filling = filling[-1], []
                if exhausted and stats.input_frames == 1:
                    filling = []  # a lone frame makes no pair: nothing to encode (nor an answer to release)
                    input_chunks.clear()
                if filling and (exhausted or not (running or input_chunks or new_frames)):
                    # the end of the input, or nothing else can progress
                    input_chunks.append((self._lead(tail), filling))
                    tail, filling = filling[-1], []

                # encoder requests: frames made for the next level first (they unblock the earliest segments)
                while encoding < self.encoder_inflight and (new_frames or input_chunks):
                    lead, inputs = None, not new_frames
                    if new_frames:
                        nodes = [new_frames.popleft() for _ in range(min(self.chunk, len(new_frames)))]
                    else:
                        lead, nodes = input_chunks.popleft()
                    running[pool.submit(self._encode, nodes, lead, inputs)] = ("encode", nodes)
                    encoding += 1

                # DiT+decoder requests, earliest segment first
                generating = len(running) - encoding
                for k, seg in enumerate(segments):
                    if generating >= self.max_inflight:
                        break
                    for p, q in list(seg.todo):
                        if generating >= self.max_inflight:
                            break
                        a, b = seg.points[p], seg.points[q]
                        if a.token is None or b.token is None:
                            continue
                        carry = self._carry(segments, k, p, q, exhausted)
                        if carry is DEFER:
                            continue
                        if carry:
                            self.client.claim([a.token, b.token])
                        seg.todo.remove((p, q))
                        seg.running += 1
                        mid = (p + q) // 2
                        fut = pool.submit(self._generate, a, b, self._seed_key(seg.index, mid), carry)
                        running[fut] = ("generate", seg, p, q)
                        generating += 1

                # output, in order
                while segments and segments[0].done:
                    seg = segments.popleft()
                    for q, pts, duration in seg.plan:
                        writer.put(seg.points[q].image, pts, duration)
                        stats.output_frames += 1
                    if progress:
                        progress(stats.output_frames)
                    self._written = seg.index
                    self._release_through(seg.index)
                if exhausted and not segments:
                    timing = self._last_frame(last, stats) if last is not None else None
                    if timing is not None:
                        writer.put(last.image, *timing)
                        stats.output_frames += 1
                        if progress:
                            progress(stats.output_frames)
                    break

                if not running:
                    continue
                generating = len(running) - encoding
                occupancy.enter(open_segments=len(segments), encoder_inflight=encoding, ditdec_inflight=generating,
                                window_full=not exhausted and len(segments) >= window,
                                encoder_at_limit=encoding >= self.encoder_inflight,
                                ditdec_at_limit=generating >= self.max_inflight)
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                occupancy.leave()
                for fut in done:
                    kind, *info = running.pop(fut)
                    if kind == "encode":
                        encoding -= 1
                        answers = fut.result()
                        for k, (enc, nodes, lead) in enumerate(answers):
                            try:
                                self._take_tokens(enc, nodes, stats, lead)
                            except BaseException:  # (it released its own answer) the rest are nobody's
                                self._release_answers(answers[k + 1:])
                                raise
                    else:
                        seg, p, q = info
                        seg.running -= 1
                        mid = (p + q) // 2
                        node = _Node(fut.result(), last_use=seg.index)
                        seg.points[mid] = node
                        stats.ditdec_requests += 1
                        finer = seg.children(p, q)
                        if finer:  # an end of finer pairs: encode it, then make their middles
                            new_frames.append(node)
                            seg.todo += finer
            self._release_when_answered(running)  # answers no pair waited for (every pair a scene cut)
            writer.close()
        except BaseException:
            self._release_when_answered(running)  # (the encoder requests still on their way)
            pool.shutdown(wait=False, cancel_futures=True)
            writer.abort()
            raise
        finally:
            self._release_through(float("inf"))
        pool.shutdown()
        stats.seconds = time.perf_counter() - t0
        stats.reencoded = self.reencoded
        stats.schedule = {"max_inflight": self.max_inflight, "encoder_inflight": self.encoder_inflight,
                          "chunk": self.chunk, "window": window, "occupancy": occupancy.means()}
        sent = dict(getattr(self.client, "wire", None) or {})  # (a client shared by runs counts them all)
        delta = {k: sent.get(k, 0) - wire_before.get(k, 0) for k in sent}
        stats.wire_bytes, stats.encoder_wire_bytes = delta.get("generate", 0), delta.get("encode", 0)
        stats.frame_ref_hits, stats.frame_ref_misses = delta.get("ref_hits", 0), delta.get("ref_misses", 0)
        stats.frame_ref_races = delta.get("ref_races", 0)
        stats.retries = {k: n for k, n in (self._retries() - retries_before).items() if n}
        return stats

    def _retries(self) -> Counter:
        """Retries the client's two model clients made so far, "model: reason" -> count."""
        out: Counter = Counter()
        for name in ("encoder", "ditdec"):
            for reason, n in dict(getattr(getattr(self.client, name, None), "retries", None) or {}).items():
                out[f"{name}: {reason}"] += n
        return out

    def _take_tokens(self, enc: EncoderAnswer, nodes: list[_Node], stats: Stats, lead: _Node | None = None) -> None:
        """The frames' tokens and the differences of their consecutive pairs, from ``enc``; with ``lead``, the
        difference of the pair it makes with the first too (the blob's ``lead_difference``; from an encoder that
        predates lead frames, which ignores the field and encodes the lead as a frame of its own, the blob's first
        difference)."""
        blob, first = enc.blob, 0
        if lead is not None and blob.lead_difference is None and blob.num_frames == len(nodes) + 1:
            first = 1  # (an older encoder: the lead's tokens came too)
        if blob.num_frames != first + len(nodes) or (lead is not None and not first and blob.lead_difference is None):
            self.client.release(enc)
            raise wire.WireError(f"the encoder answered {blob.num_frames} frames for {len(nodes)} sent"
                                 + (" after a lead frame" if lead is not None else ""))
        self._live.append((max(n.last_use for n in nodes), enc))
        self._release_through(self._written)  # frames of segments already written (scene cuts) are not needed
        if lead is not None:
            lead.next, lead.next_difference = nodes[0], (blob.differences[0] if first else blob.lead_difference)
        for k, node in enumerate(nodes):
            node.token = (enc, first + k)
            if k + 1 < len(nodes):
                node.next, node.next_difference = nodes[k + 1], blob.differences[first + k]
        stats.encoder_requests += 1
        stats.encoded_frames += first + len(nodes)
        stats.lead_frames += lead is not None
        stats.token_bytes += blob.nbytes

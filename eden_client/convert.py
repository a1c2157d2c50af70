"""One input (a video file or a folder of frames) -> one output (a video file or a folder of PNG frames)."""
from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import time
from dataclasses import dataclass, field
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Callable

from .frames_io import FramesError
from .parallel_writer import ParallelWriter, usable_cores
from .scenes import DEFAULT_THRESHOLD, SceneDetector, ssim, thumbnail
from .sinks import Encoding, VideoSink, open_sink
from .sources import Prefetch, open_source
from .video import DEFAULT_MAX_DEPTH, Interpolator, Stats, TimeGrid, output_count, target_count


@dataclass
class Options:
    """Everything a run needs besides the connection (the CLI flags of ``video`` and ``batch``)."""
    factor: int = 2
    seed: int = 0
    fps: Fraction | None = None  # frame rate of frame-folder input (default 25, as ffmpeg's image2)
    scene_threshold: float | None = DEFAULT_THRESHOLD  # None: no scene-cut detection
    # scheduling: None takes the transport's default (video.default_schedule)
    max_inflight: int | None = None
    encoder_chunk: int | None = None
    encoder_inflight: int | None = None
    token_dtype: str = "float16"
    encoding: Encoding = field(default_factory=Encoding)
    target_fps: Fraction | None = None  # an output rate instead of a factor (then ``factor`` is not used)
    max_depth: int = DEFAULT_MAX_DEPTH  # with target_fps: the deepest midpoint level
    sharing: int = 1  # runs made at once on this host and deployment (batch --jobs, Ray's --per-node)

    def shared_by(self, runs: int) -> "Options":
        """These options for one of ``runs`` runs made at once on this machine (``batch --jobs``, Ray's
        ``--per-node``): a video's encoders are planned on its share of the cores (``output_cores``,
        eden_client/segment_encoder.py), and its window of open pairs on its share of the memory bounds
        (eden_client/video.py ``fitted_window``)."""
        return dataclasses.replace(self, sharing=max(1, runs))

    def output_cores(self) -> int:
        """The cores one run's output encoding is planned on: its share of those this process may use."""
        return max(1, usable_cores() // self.sharing)

    def settings(self, video_output: bool) -> dict:
        """What decides the output's frames (recorded by ``batch`` next to each output): the timing, the seeds,
        the scene cuts, the token precision and, for a video, the codec settings."""
        timing = ({"target_fps": str(self.target_fps), "max_depth": self.max_depth} if self.target_fps is not None
                  else {"factor": self.factor})
        record = {**timing, "seed": self.seed, "fps": None if self.fps is None else str(self.fps),
                  "scene_threshold": self.scene_threshold, "token_dtype": self.token_dtype}
        if video_output:
            record.update(codec=self.encoding.codec, crf=self.encoding.crf, pix_fmt=self.encoding.pix_fmt,
                          preset=self.encoding.preset)
        return record


def expected_outputs(count: int, rate: Fraction, options: Options) -> int:
    """The output frames of ``count`` input frames at ``rate`` (exact for constant-rate input; the progress
    estimate otherwise)."""
    if options.target_fps is None or count <= 0:
        return output_count(count, options.factor)
    return math.floor((count - 1) * Fraction(options.target_fps) / Fraction(rate)) + 1


INPUT_THREADS = 3  # threads making the input's frames ready (session 10: the reading thread's limit at 480p)


def prepared(source, thumbnails: bool, threads: int = INPUT_THREADS):
    """The source's frames, in order, each made ready on one of ``threads`` threads while the next ones decode: its
    conversion to RGB (a video) or its decoding (a folder of images), and with ``thumbnails`` its scene-detection
    thumbnail (a video's from the decoded frame by swscale, a folder image's from its RGB pixels); the similarity
    (SSIM) of each thumbnail with the previous one is computed here, in order, rather than in the scheduler's
    thread, which every request waits on.

    The thread that decodes does nothing else: with conversion and thumbnails in it, it took 5.7 ms a 480p frame
    beside the command's ~40 other threads (1.3 ms alone) and set the command's pace at 480p (bench/NOTES.md,
    session 10); in session 7 the thumbnails made in it had held a two-GPU 1080p run 26% back."""
    tasks = (source.tasks(parallel=True, thumbnails=thumbnails) if hasattr(source, "tasks")
             else ((lambda f=f: f) for f in source))

    def ready(task):
        frame = task()
        if thumbnails and frame.thumb is None:
            frame.thumb = thumbnail(frame.image)
        return frame

    pending: collections.deque = collections.deque()  # futures of the frames, oldest first
    previous = None  # the last thumbnail handed out

    def oldest():
        nonlocal previous
        frame = pending.popleft().result()
        if thumbnails:
            frame.similarity = None if previous is None else ssim(previous, frame.thumb)
            previous = frame.thumb
        return frame

    with ThreadPoolExecutor(threads, thread_name_prefix="eden-input") as pool:
        try:
            for task in tasks:
                pending.append(pool.submit(ready, task))
                if len(pending) > 2 * threads:
                    yield oldest()
            while pending:
                yield oldest()
        finally:
            for future in pending:  # (stopped early: nothing more to make)
                future.cancel()


def _timed(frames, seconds: dict, key: str):
    """``frames``, adding the time spent making each one to ``seconds[key]``."""
    it = iter(frames)
    while True:
        start = time.perf_counter()
        frame = next(it, None)
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - start
        if frame is None:
            return
        yield frame


def pace_note(run_s: float, seconds: dict, encoding: Encoding | None, finish_s: float = 0.0) -> str:
    """What set a run's pace, from the writer's times, when one side clearly did (more than half the run): the
    answers waiting for the output's encoding, or the writer waiting for answers; "" otherwise. With a hint for the
    encoding case: x264's preset trades file size for speed at the same quality. And when the output was still being
    encoded well after the last answer (``finish_s``: the frames a writer queues, a whole short clip with several
    encoders, let the answers run ahead), how long."""
    if run_s <= 0:
        return ""
    note = ""
    if seconds.get("write_blocked", 0.0) > 0.5 * run_s:
        hint = ""
        if encoding is not None and encoding.codec in ("libx264", "libx265") and encoding.preset not in (
                "superfast", "ultrafast"):
            hint = f" ({encoding.codec} preset {encoding.preset or 'medium'}: --preset superfast is faster, for larger files)"
        elif encoding is None:
            hint = " (PNG files)"
        note = f"pace set by the output's encoding{hint}"
    elif seconds.get("commit_waiting", 0.0) > 0.5 * run_s:
        note = "pace set by the servers"
    if finish_s > max(0.5, 0.2 * run_s):
        note += ("; " if note else "") + f"the output's encoding ended {finish_s:.1f} s after the last answer"
    return note


def convert(src: Path, dst: Path, client, options: Options,
            on_start: Callable[[int], None] | None = None,
            on_progress: Callable[[int], None] | None = None) -> Stats:
    """Interpolate ``src`` into ``dst`` (written under a temporary name, renamed when complete; removed on error).
    ``client``: an EdenClient, or a call that makes one, made once the input has opened (so a problem with the input
    is said before a key or an address problem; its time is the "connect" phase). ``on_start`` gets the expected
    number of output frames, ``on_progress`` the number written so far."""
    if Path(src).resolve() == Path(dst).resolve():
        raise FramesError(f"{dst} is the input itself: pick another output")
    t0 = time.perf_counter()
    source = open_source(Path(src), options.fps)
    connect_s = None
    try:
        if callable(client):
            t = time.perf_counter()
            client = client()
            connect_s = time.perf_counter() - t
        meta = source.meta
        expected = expected_outputs(source.count, meta.rate, options)
        if on_start:
            on_start(expected)
        interpolator = Interpolator(client, options.factor, options.seed, options.max_inflight,
                                    options.encoder_chunk, options.encoder_inflight,
                                    detector=SceneDetector(options.scene_threshold),
                                    token_dtype=options.token_dtype, target_fps=options.target_fps,
                                    time_base=meta.time_base, max_depth=options.max_depth,
                                    sharing=options.sharing)
        client_seconds: dict = {}
        frames = Prefetch(_timed(prepared(source, thumbnails=options.scene_threshold is not None),
                                 client_seconds, "read"))
        complete = False
        try:
            stream = iter(frames)
            factor = options.factor
            if options.target_fps is not None:
                # the output's time base depends on where the stream starts: look at its first frame
                first = next(stream, None)
                grid = TimeGrid.make(options.target_fps, meta.time_base, 0 if first is None else first.pts)
                meta = dataclasses.replace(meta, rate=grid.rate, time_base=grid.time_base)
                factor = 1
                stream = itertools.chain([] if first is None else [first], stream)
            sink = ParallelWriter(open_sink(Path(dst), meta, factor, options.encoding, expected or None,
                                            options.output_cores()))
            t1 = time.perf_counter()
            try:
                stats = interpolator.run(stream, sink.write, on_progress)
                t2 = time.perf_counter()
                if options.target_fps is None:
                    want = output_count(stats.input_frames, options.factor)
                else:
                    want = (target_count(interpolator.first_time, interpolator.last_time, options.target_fps)
                            if stats.input_frames else 0)
                if stats.output_frames != want:
                    raise FramesError(f"internal error: {stats.output_frames} frames written for "
                                      f"{stats.input_frames} inputs, {want} expected")
                complete = True
            finally:
                sink.close(complete)
        finally:
            frames.close()
        # where the command's time went: opening input and output, the pipelined run, writing what was queued
        stats.phases.update(open=t1 - t0 - (connect_s or 0.0), run=t2 - t1, finish=time.perf_counter() - t2)
        if connect_s is not None:
            stats.phases["connect"] = connect_s
        stats.client_seconds = {k: round(v, 3) for k, v in {**client_seconds, **sink.seconds}.items()}
        video = isinstance(sink.sink, VideoSink)
        stats.pace = pace_note(t2 - t1, sink.seconds, options.encoding if video else None,
                               stats.phases["finish"])
        stats.encoders = sink.sink.plan.encoders if video else 0
        return stats
    finally:
        source.close()

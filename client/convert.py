"""One input (a video file or a folder of frames) -> one output (a video file or a folder of PNG frames)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

from .frames_io import Encoding, FramesError, ParallelWriter, Prefetch, open_sink, open_source
from .scenes import DEFAULT_THRESHOLD, SceneDetector, thumbnail
from .video import Interpolator, Stats, output_count


@dataclass
class Options:
    """Everything a run needs besides the connection (the CLI flags of ``video`` and ``batch``)."""
    factor: int = 2
    seed: int = 0
    fps: Fraction | None = None  # frame rate of frame-folder input (default 25, as ffmpeg's image2)
    scene_threshold: float | None = DEFAULT_THRESHOLD  # None: no scene-cut detection
    max_inflight: int = 16
    encoder_chunk: int = 4
    token_dtype: str = "float16"
    encoding: Encoding = field(default_factory=Encoding)


def _with_thumbnails(frames):
    """Frames with their scene-detection thumbnail made as they are decoded (off the scheduler's thread)."""
    for frame in frames:
        frame.thumb = thumbnail(frame.image)
        yield frame


def convert(src: Path, dst: Path, client, options: Options,
            on_start: Callable[[int], None] | None = None,
            on_progress: Callable[[int], None] | None = None) -> Stats:
    """Interpolate ``src`` into ``dst`` (written under a temporary name, renamed when complete; removed on error).
    ``on_start`` gets the expected number of output frames, ``on_progress`` the number written so far."""
    if Path(src).resolve() == Path(dst).resolve():
        raise FramesError(f"{dst} is the input itself: pick another output")
    t0 = time.perf_counter()
    source = open_source(Path(src), options.fps)
    try:
        if on_start:
            on_start(output_count(source.count, options.factor))
        interpolator = Interpolator(client, options.factor, options.seed, options.max_inflight,
                                    options.encoder_chunk, detector=SceneDetector(options.scene_threshold),
                                    token_dtype=options.token_dtype)
        sink = ParallelWriter(open_sink(Path(dst), source.meta, options.factor, options.encoding))
        frames = Prefetch(_with_thumbnails(source) if options.scene_threshold is not None else source)
        complete = False
        t1 = time.perf_counter()
        try:
            stats = interpolator.run(frames, sink.write, on_progress)
            t2 = time.perf_counter()
            if stats.output_frames != output_count(stats.input_frames, options.factor):
                raise FramesError(f"internal error: {stats.output_frames} frames written for {stats.input_frames} "
                                  f"inputs at x{options.factor}")
            complete = True
        finally:
            frames.close()
            sink.close(complete)
        # where the command's time went: opening input and output, the pipelined run, writing what was queued
        stats.phases.update(open=t1 - t0, run=t2 - t1, finish=time.perf_counter() - t2)
        return stats
    finally:
        source.close()

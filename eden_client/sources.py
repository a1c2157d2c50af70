"""Where frames come from: a folder of PNG/JPEG frames or a video file (PyAV), read one frame at a time, and a
prefetcher that decodes ahead in a thread (see eden_client/frames_io.py for the frames and their time stamps)."""
from __future__ import annotations

import functools
import re
import threading
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from eden_serve.images import ImageError, decode_image

from .frames_io import Frame, FramesError, VideoMeta, _sws_matrix, import_av
from .scenes import THUMB_SIZE

FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg")
DEFAULT_FOLDER_FPS = Fraction(25)  # what ffmpeg's image2 demuxer assumes for a folder of frames


def natural_key(name: str) -> list:
    """Sort key where digit runs compare as numbers: f2 before f10."""
    return [int(t) if t.isdecimal() else t.lower() for t in re.split(r"(\d+)", name)]


def frame_files(folder: Path) -> list[Path]:
    """The PNG/JPEG files of a folder (not hidden, not recursive), in natural order."""
    files = [p for p in folder.iterdir()
             if p.is_file() and p.suffix.lower() in FRAME_EXTENSIONS and not p.name.startswith(".")]
    return sorted(files, key=lambda p: natural_key(p.name))

class FolderSource:
    """A folder of PNG/JPEG frames at ``fps`` frames per second (grey, palette, 16-bit and alpha images are made
    8-bit RGB; alpha is dropped). Every frame must have the first frame's size."""

    def __init__(self, folder: Path, fps: Fraction = DEFAULT_FOLDER_FPS):
        self.path = Path(folder)
        self.files = frame_files(self.path)
        if not self.files:
            raise FramesError(f"{self.path}: no frames (expected PNG or JPEG files: {', '.join(FRAME_EXTENSIONS)})")
        self.fps = Fraction(fps)
        first = self._read(self.files[0])
        self.meta = VideoMeta(time_base=1 / self.fps, rate=self.fps, width=first.shape[1], height=first.shape[0])
        self._first = first

    @property
    def count(self) -> int:
        return len(self.files)

    def _read(self, path: Path) -> np.ndarray:
        try:
            return decode_image(path.read_bytes(), max_pixels=1 << 40, name=str(path))
        except OSError as e:
            raise FramesError(f"cannot read {path}: {e.strerror or e}") from None
        except ImageError as e:
            raise FramesError(str(e)) from None

    def __iter__(self) -> Iterator[Frame]:
        return (task() for task in self.tasks())

    def tasks(self, parallel: bool = False, thumbnails: bool = False) -> Iterator[Callable[[], Frame]]:
        """Each frame, in order, as a call that reads it (safe on any thread: ``prepared`` runs them on several;
        the thumbnails are made from the RGB image there)."""
        for i, path in enumerate(self.files):
            yield functools.partial(self._frame, i, path)

    def _frame(self, i: int, path: Path) -> Frame:
        size = self._first.shape
        image = self._first if i == 0 else self._read(path)
        if image.shape != size:
            raise FramesError(f"{path} is {image.shape[1]}x{image.shape[0]} but {self.files[0].name} is "
                              f"{size[1]}x{size[0]}: every frame of a folder must have one size (resize the "
                              f"frames or split the folder)")
        return Frame(image, i, 1)

    def close(self) -> None:
        pass


SOURCE_SWS_THREADS = 4  # slices of a YUV -> RGB conversion when one thread converts every frame (plain iteration);
# convert.prepared converts on several threads instead, one slice each


class VideoSource:
    """The first video stream of a file (cover art aside), decoded to 8-bit RGB with the stream's own matrix and
    range (so 10-bit and BT.709 video keep their colours); audio is left in the file for the sink to copy."""

    def __init__(self, path: Path):
        av = import_av()
        self.path = Path(path)
        try:
            self.container = av.open(str(self.path))
        except av.error.FFmpegError as e:
            raise FramesError(f"{self.path}: not a video FFmpeg can read ({e})") from None
        still = av.stream.Disposition.attached_pic
        moving = [s for s in self.container.streams.video if not s.disposition & still]  # not cover art
        if not moving:
            self.container.close()
            raise FramesError(f"{self.path}: has no video stream")
        self.stream = moving[0]
        self.stream.thread_type = "AUTO"
        cc = self.stream.codec_context
        rate = self.stream.average_rate or self.stream.guessed_rate or Fraction(25)
        self.color = {"color_range": cc.color_range, "colorspace": cc.colorspace,
                      "color_primaries": cc.color_primaries, "color_trc": cc.color_trc}
        self._decoded = self.container.decode(self.stream)
        try:
            first = next(self._decoded, None)
        except av.error.FFmpegError as e:
            self.container.close()
            raise FramesError(f"{self.path}: cannot decode the first frame ({e})") from None
        if first is None:
            self.container.close()
            raise FramesError(f"{self.path}: the video stream has no frames")
        depth = first.format.components[0].bits if first.format.components else 8
        self.meta = VideoMeta(time_base=Fraction(self.stream.time_base), rate=Fraction(rate), width=first.width,
                              height=first.height, rotation=int(round(first.rotation or 0)), color=self.color,
                              bit_depth=depth, audio_from=self.path if self.container.streams.audio else None)
        self._first = first
        # one converter per thread for the whole stream: PyAV's frame.to_ndarray(format=...) builds a new swscale
        # context, and with it a pool of one thread per core, for every frame
        self._converters = threading.local()
        self._step = max(1, round(1 / (self.meta.rate * self.meta.time_base)))  # nominal pts per frame

    @property
    def count(self) -> int:
        """Frames in the stream as the container says (an estimate from the duration if it does not say)."""
        if self.stream.frames:
            return self.stream.frames
        if self.stream.duration:
            return max(1, round(self.stream.duration * self.stream.time_base * self.meta.rate))
        if self.container.duration:  # microseconds (Matroska keeps no per-stream duration)
            return max(1, round(Fraction(self.container.duration, 1_000_000) * self.meta.rate))
        return 0

    def _converter(self, use: str):
        """This thread's swscale converter for ``use`` (each keeps its context from frame to frame)."""
        converter = getattr(self._converters, use, None)
        if converter is None:
            converter = import_av().video.reformatter.VideoReformatter()
            setattr(self._converters, use, converter)
        return converter

    def _range(self, frame) -> int:
        """The frame's colour range (FFmpeg's code): unknown means limited (video) unless the format is yuvj."""
        return self.color["color_range"] or (2 if frame.format.name.startswith("yuvj") else 1)

    def _rgb(self, frame, sws_threads: int = SOURCE_SWS_THREADS) -> np.ndarray:
        """The source's matrix and range -> full-range RGB, contiguous: PyAV's array is a view of the frame's padded
        rows (854x480: rows of 2592 bytes for 2562), which the encoder request would otherwise copy on its thread."""
        if frame.format.name == "rgb24":
            return np.ascontiguousarray(frame.to_ndarray())
        matrix = _sws_matrix(self.color["colorspace"])
        rgb = self._converter("rgb").reformat(frame, format="rgb24", src_colorspace=matrix, dst_colorspace=matrix,
                                              src_color_range=self._range(frame), dst_color_range=2,
                                              threads=sws_threads)
        return np.ascontiguousarray(rgb.to_ndarray())

    def __iter__(self) -> Iterator[Frame]:
        return (task() for task in self.tasks())

    def _thumb(self, frame) -> np.ndarray:
        """The scene-detection thumbnail straight from the decoded frame: swscale's area average to 32x32 full-range
        luma, in this thread's own converter, without the interpreter lock (0.07 ms a 480p frame, 0.3 at 1080p,
        against 1.2 and 5.8 ms through PIL from the RGB image, a third of that holding the lock). The measure of
        ``scenes.thumbnail`` (area-averaged luma, full range), within about one level (test)."""
        small = self._converter("thumbnail").reformat(frame, width=THUMB_SIZE, height=THUMB_SIZE, format="gray",
                                                      interpolation="AREA", src_color_range=self._range(frame),
                                                      dst_color_range=2, threads=1)
        return small.to_ndarray().astype(np.float64)

    def tasks(self, parallel: bool = False, thumbnails: bool = False) -> Iterator[Callable[[], Frame]]:
        """Each frame, in order, as a call that converts it to RGB (and with ``thumbnails`` makes its scene-detection
        thumbnail): decoding and the time stamps happen here, in order; the calls are safe on any thread (a converter
        per thread; ``parallel``: one slice each, as several threads convert at once)."""
        av = import_av()
        sws_threads = 1 if parallel else SOURCE_SWS_THREADS
        last = None
        frame = self._first
        while frame is not None:
            pts = frame.pts if frame.pts is not None else (0 if last is None else last + self._step)
            if last is not None and pts <= last:  # broken or duplicate stamps: keep time moving forward
                pts = last + 1
            yield functools.partial(self._frame, frame, pts, frame.duration or self._step, sws_threads, thumbnails)
            last = pts
            try:
                frame = next(self._decoded, None)
            except av.error.FFmpegError as e:
                raise FramesError(f"{self.path}: decoding failed after pts {last} ({e})") from None

    def _frame(self, frame, pts: int, duration: int, sws_threads: int, thumbnail: bool = False) -> Frame:
        return Frame(self._rgb(frame, sws_threads), pts, duration, thumb=self._thumb(frame) if thumbnail else None)

    def close(self) -> None:
        self.container.close()


def open_source(path: Path, fps: Fraction | None = None):
    """A folder -> FolderSource (at ``fps``, default 25), a file -> VideoSource."""
    path = Path(path)
    if path.is_dir():
        return FolderSource(path, fps or DEFAULT_FOLDER_FPS)
    if not path.exists():
        raise FramesError(f"{path}: no such video file or frame folder")
    return VideoSource(path)


class Prefetch:
    """Iterate ``iterable`` in a thread, ``depth`` items ahead (decoding overlaps the requests); errors are raised
    in the consumer."""

    _END = object()

    def __init__(self, iterable, depth: int = 4):
        import queue
        self.queue = queue.Queue(depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(iterable,), daemon=True)
        self.thread.start()

    def _run(self, iterable) -> None:
        try:
            for item in iterable:
                if self.stop.is_set():
                    return
                self.queue.put(item)
            self.queue.put(self._END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self.queue.put(e)

    def __iter__(self):
        while True:
            item = self.queue.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop the thread (drain so a blocked put returns)."""
        self.stop.set()
        while self.thread.is_alive():
            try:
                self.queue.get(timeout=0.1)
            except Exception:  # noqa: BLE001 - queue.Empty: nothing to drain yet
                pass

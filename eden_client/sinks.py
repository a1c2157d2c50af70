"""Where frames go: numbered PNG frames in a folder or a video file (PyAV), and the output's encoding settings
(see eden_client/frames_io.py for the frames and their metadata).

Every sink writes under a temporary name (``.NAME.partial``) and renames it when complete, so a file or folder with
its final name is always whole: that is what ``batch`` counts as done.
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from eden_serve.images import encode_png

from . import segment_encoder
from .frames_io import VIDEO_EXTENSIONS, FramesError, VideoMeta, _sws_matrix, import_av
from .parallel_writer import usable_cores

PARTIAL = ".partial"


def partial_path(final: Path) -> Path:
    """The temporary name a sink writes before renaming to ``final`` (same folder, hidden, same extension)."""
    return final.with_name(f".{final.stem}{PARTIAL}{final.suffix}")


def remove_partial(final: Path) -> None:
    """Remove what an interrupted run left for ``final`` (a link there is removed itself, never followed)."""
    tmp = partial_path(final)
    try:
        st = os.lstat(tmp)
    except FileNotFoundError:
        return
    except OSError as e:
        raise FramesError(f"{tmp}: cannot remove an earlier run's partial output: {e.strerror or e}") from None
    try:
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(tmp)
        else:
            tmp.unlink()
    except OSError as e:
        raise FramesError(f"{tmp}: cannot remove an earlier run's partial output: {e.strerror or e}") from None


def create_new(path: Path, folder: bool = False) -> None:
    """Create ``path`` as a new empty file (or folder) of this process: refused if anything is there, a planted
    link included, so the writes that follow cannot be redirected (O_CREAT | O_EXCL | O_NOFOLLOW; mkdir never
    follows a link either)."""
    try:
        if folder:
            os.mkdir(path)
        else:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666))
    except FileExistsError:
        raise FramesError(f"{path}: something appeared under this temporary name while it was being created "
                          "(another process writing the same output?): refusing to write through it") from None


def check_no_links(root: Path, path: Path) -> None:
    """Refuse ``path`` if it, or a folder between ``root`` and it, is a symbolic link: outputs stay inside
    ``root`` (``batch`` checks each output against OUT_DIR)."""
    root, path = Path(root), Path(path)
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        raise FramesError(f"{path} is not inside {root}") from None
    current = root
    for part in parts:
        current = current / part
        if current.is_symlink():
            raise FramesError(f"{current} is a symbolic link: refusing to write through it (outputs stay inside "
                              f"{root}); remove the link")


DISK_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def write_error(path: Path, e: OSError) -> FramesError:
    """An error writing the output, said plainly (full disk, read-only or forbidden location)."""
    return FramesError(f"{path}: cannot write the output: {e.strerror or e}")


def rgb24_frame(av, width: int, height: int):
    """A new rgb24 VideoFrame and a writable [height, width, 3] uint8 view of its pixels (rows as long as the plane's
    line size): filled with ``np.copyto``, which runs without the interpreter lock (PyAV's ``from_ndarray`` copies
    row by row holding it)."""
    frame = av.VideoFrame(width, height, "rgb24")
    plane = frame.planes[0]
    return frame, np.ndarray((height, width, 3), np.uint8, buffer=plane, strides=(plane.line_size, 3, 1))


class PngEncoder:
    """[H, W, 3] uint8 RGB -> PNG bytes, callable from several threads at once. FFmpeg's PNG encoder (PyAV) where
    PyAV is installed: it runs without the interpreter lock and takes 0.4-0.6x the CPU of Pillow's at the same zlib
    level (Pillow tries five row filters per row; docs/videos.md has the figures); Pillow otherwise. Both are
    lossless: the same pixels either way, not the same bytes."""

    def __init__(self, compress_level: int = 1):
        self.compress_level = compress_level
        try:
            import av
        except ImportError:
            av = None
        self.av = av if av is not None and "png" in av.codecs_available else None  # (an FFmpeg built without it)
        self._local = threading.local()  # each thread's encoder and RGB frame, reused while the size stays

    def __call__(self, image: np.ndarray) -> bytes:
        if self.av is None:
            return encode_png(image, self.compress_level)
        h, w = image.shape[:2]
        local = self._local
        if getattr(local, "size", None) != (h, w):
            local.codec = self.av.CodecContext.create("png", "w")
            local.codec.width, local.codec.height, local.codec.pix_fmt = w, h, "rgb24"
            local.codec.thread_count = 1  # one packet per frame, at once (the threads are ParallelWriter's)
            local.codec.options = {"compression_level": str(self.compress_level)}
            local.frame, local.pixels = rgb24_frame(self.av, w, h)
            local.size = (h, w)
        np.copyto(local.pixels, image)
        return b"".join(bytes(packet) for packet in local.codec.encode(local.frame))


class PngFolderSink:
    """Numbered PNG frames (00000000.png, 00000001.png, ...) in a folder, written under a temporary name and renamed
    when complete. Refuses an existing non-empty folder rather than mixing two runs' frames."""

    def __init__(self, folder: Path, compress_level: int = 1):
        self.path = Path(folder)
        if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            raise FramesError(f"{self.path} already exists and is not an empty folder: remove it or pick another "
                              f"output")
        self.tmp = partial_path(self.path)
        remove_partial(self.path)
        try:
            self.tmp.parent.mkdir(parents=True, exist_ok=True)
            create_new(self.tmp, folder=True)
        except OSError as e:
            raise write_error(self.path, e) from None
        self.encode = PngEncoder(compress_level)
        self.count = 0

    def prepare(self, image: np.ndarray) -> bytes:
        """The PNG file of a frame (thread-safe: ``ParallelWriter`` runs it on several threads)."""
        return self.encode(image)

    def commit(self, png: bytes, pts: int, duration: int) -> None:
        """Write the next frame's file (in order)."""
        try:
            (self.tmp / f"{self.count:08d}.png").write_bytes(png)
        except OSError as e:
            raise write_error(self.path, e) from None
        self.count += 1

    def write(self, image: np.ndarray, pts: int, duration: int) -> None:
        self.commit(self.prepare(image), pts, duration)

    def close(self, complete: bool = True) -> None:
        if not complete:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            if self.path.is_dir():
                self.path.rmdir()  # empty, checked above
            self.tmp.rename(self.path)
        except OSError as e:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise write_error(self.path, e) from None


@dataclass
class Encoding:
    """Output codec settings. Defaults: H.264 (plays everywhere), yuv420p (what players and browsers expect;
    yuv420p10le for 10/12-bit input, against banding), CRF 18 (the usual "visually lossless" point of x264), preset
    veryfast: at a constant CRF the preset trades file size for speed, not quality, and medium encodes 1080p about
    2.5-3.5x slower (docs/videos.md has the figures): it could not keep up with one GPU. Other CRF encoders get a
    high-quality default of their own scale (``DEFAULT_CRF``). ``encoders``: x264 streams made at once on
    consecutive segments (eden_client/segment_encoder.py; None: by the cores and the frame size)."""
    codec: str = "libx264"
    crf: int | None = None  # None: DEFAULT_CRF of the codec (encoders without CRF: their own default)
    pix_fmt: str | None = None  # None: yuv420p, or yuv420p10le when the input has more than 8 bits
    preset: str | None = "veryfast"
    encoders: int | None = None

    DEFAULT_CRF = {"libx264": 18, "libx264rgb": 18, "libx265": 20, "libvpx-vp9": 24, "libvpx": 10,
                   "libaom-av1": 24, "libsvtav1": 24}

    def options(self) -> dict:
        opts = {}
        crf = self.crf if self.crf is not None else self.DEFAULT_CRF.get(self.codec)
        if crf is not None:
            if self.codec not in self.DEFAULT_CRF:
                raise FramesError(f"--crf is not supported by codec {self.codec} (CRF codecs: "
                                  f"{', '.join(self.DEFAULT_CRF)})")
            opts["crf"] = str(crf)
            if self.codec.startswith("libvpx") or self.codec == "libaom-av1":
                opts["b"] = "0"  # constant quality, no bitrate cap
        if self.preset and self.codec in ("libx264", "libx264rgb", "libx265"):
            opts["preset"] = self.preset
        return opts


class VideoSink:
    """A video file: frames encoded with ``Encoding`` at the source's time stamps (scaled by the interpolation
    factor), the source's rotation and colour tags, and its audio streams copied packet for packet. ``cores``: the
    cores its encoders are planned on (default: all this process may use; less when outputs are written at once)."""

    def __init__(self, path: Path, meta: VideoMeta, factor: int, encoding: Encoding, frames: int | None = None,
                 cores: int | None = None):
        av = self.av = import_av()
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(self.path, e) from None
        self.tmp = partial_path(self.path)
        remove_partial(self.path)
        try:
            create_new(self.tmp)  # ours, empty: what FFmpeg opens next by name is this file, not a planted link
        except OSError as e:
            raise write_error(self.path, e) from None
        self.time_base = meta.time_base / factor
        fmt = self.path.suffix.lower().lstrip(".")
        fmt = {"mkv": "matroska", "m4v": "mp4"}.get(fmt, fmt)
        try:
            self.out = av.open(str(self.tmp), "w", format=fmt)
        except (av.error.FFmpegError, ValueError) as e:
            self.tmp.unlink(missing_ok=True)
            if getattr(e, "errno", None) in DISK_ERRNOS:
                raise write_error(self.path, OSError(e.errno, os.strerror(e.errno))) from None
            raise FramesError(f"{self.path}: cannot write this kind of file ({e}); use .mp4, .mkv or .mov") from None
        self.audio = None
        try:
            self._setup(meta, factor, encoding, fmt, cores or usable_cores())
        except BaseException:
            self._discard()
            raise
        self._durations: dict[int, int] = {}
        self._staging = threading.local()  # each writer thread's RGB frame, reused (see _rgb_frame)
        self.segments = None
        if self.plan.encoders > 1:
            try:
                self.stream.codec_context.open()  # the stream's headers, which every segment's encoder must match
                self.segments = segment_encoder.SegmentEncoder(self._new_encoder, self.plan,
                                                               self.stream.codec_context.extradata, frames)
            except BaseException:
                self._discard()
                raise

    def _setup(self, meta: VideoMeta, factor: int, encoding: Encoding, fmt: str, cores: int) -> None:
        """The video stream (codec, size, timing, colour, rotation; its encoders planned on ``cores``) and the audio
        copies."""
        av = self.av
        try:
            options = encoding.options()
            if fmt == "avi" and encoding.codec.startswith("libx26"):
                options["bf"] = "0"  # AVI has no presentation time stamps: no B-frame reordering
            self.stream = self.out.add_stream(encoding.codec, rate=meta.rate * factor, options=options)
            # frame threads (FFmpeg's default for PyAV is slice threads, which x264 scales poorly over many cores)
            self.stream.codec_context.thread_type = "AUTO"
        except (av.error.FFmpegError, ValueError) as e:
            raise FramesError(f"codec {encoding.codec!r} is not available ({e}); try libx264, libx265, libvpx-vp9 "
                              f"or ffv1") from None
        self.pix_fmt = encoding.pix_fmt or ("yuv420p10le" if meta.bit_depth > 8 else "yuv420p")
        try:
            fmt_info = av.VideoFormat(self.pix_fmt)
        except ValueError:
            raise FramesError(f"unknown pixel format {self.pix_fmt!r} (e.g. yuv420p, yuv420p10le, yuv444p)") from None
        # subsampled chroma needs even sides: pad by repeating the last row/column
        even = (fmt_info.chroma_width(2) < 2 or fmt_info.chroma_height(2) < 2) and not fmt_info.is_rgb
        self.width = meta.width + (meta.width % 2 if even else 0)
        self.height = meta.height + (meta.height % 2 if even else 0)
        self.stream.width, self.stream.height, self.stream.pix_fmt = self.width, self.height, self.pix_fmt
        self.stream.time_base = self.time_base
        self.stream.codec_context.time_base = self.time_base
        self.plan = segment_encoder.plan(encoding.codec, self.width, self.height, cores, encoding.encoders,
                                         bytes_per_pixel=fmt_info.padded_bits_per_pixel / 8)
        self._options = options
        if self.plan.encoders > 1:
            self.stream.codec_context.thread_count = 1  # never encodes: it only writes the stream's headers
        self.yuv = not fmt_info.is_rgb
        self.color = dict(meta.color)
        if self.yuv:
            if not self.color.get("color_range"):
                self.color["color_range"] = 1  # limited, the video default
            for name, value in self.color.items():
                if value:
                    setattr(self.stream.codec_context, name, value)
        if meta.rotation:
            self.stream.set_display_rotation(meta.rotation)
        self.audio = _AudioCopy(meta.audio_from, self.out, self.path) if meta.audio_from else None

    def prepare(self, image: np.ndarray):
        """An RGB frame -> the encoder's pixel format (thread-safe: ``ParallelWriter`` runs it on several threads;
        swscale works without the interpreter lock)."""
        av = self.av
        if image.shape[0] != self.height or image.shape[1] != self.width:
            image = np.pad(image, ((0, self.height - image.shape[0]), (0, self.width - image.shape[1]), (0, 0)),
                           mode="edge")
        frame = self._rgb_frame(image)
        # this thread's converter, kept (a new one per frame builds a swscale context and a pool of one thread per
        # core each time), one slice: the frames are already converted in parallel
        staging = self._staging
        if getattr(staging, "reformatter", None) is None:
            staging.reformatter = av.video.reformatter.VideoReformatter()
        convert = staging.reformatter.reformat
        if self.yuv:
            matrix = _sws_matrix(self.color.get("colorspace", 0))
            return convert(frame, format=self.pix_fmt, src_colorspace=matrix, dst_colorspace=matrix,
                           src_color_range=2, dst_color_range=self.color["color_range"], threads=1)
        return convert(frame, format=self.pix_fmt, threads=1)

    def _rgb_frame(self, image: np.ndarray):
        """``image`` [height, width, 3] in an rgb24 frame for swscale: this thread's own frame, reused, filled by a
        NumPy copy, which runs without the interpreter lock (PyAV's ``from_ndarray`` copies row by row holding it:
        4 ms of every 1080p frame that the client's other threads wait for). A fresh frame where the conversion
        would hand back its input (rgb24 out)."""
        av = self.av
        if not self.yuv and self.pix_fmt == "rgb24":
            return av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        staging = self._staging
        if getattr(staging, "frame", None) is None:
            staging.frame, staging.pixels = rgb24_frame(av, self.width, self.height)
        np.copyto(staging.pixels, image)
        return staging.frame

    def _new_encoder(self, threads: int):
        """An encoder set up as the stream's, for one segment (eden_client/segment_encoder.py)."""
        source = self.stream.codec_context
        context = self.av.CodecContext.create(source.name, "w")
        for name in ("width", "height", "pix_fmt", "time_base", "framerate", "flags", "color_range", "colorspace",
                     "color_primaries", "color_trc"):
            setattr(context, name, getattr(source, name))
        context.thread_type = "AUTO"
        context.thread_count = threads
        context.options = dict(self._options)
        return context

    def write(self, image: np.ndarray, pts: int, duration: int) -> None:
        """One RGB frame at ``pts`` (in the output time base, the source's divided by the factor)."""
        self.commit(self.prepare(image), pts, duration)

    def commit(self, frame, pts: int, duration: int) -> None:
        """Encode a prepared frame (in order) and mux what the encoders give back, with the audio up to it."""
        av = self.av
        frame.pts, frame.time_base = pts, self.time_base
        self._durations[pts] = duration
        try:
            if self.segments is not None:
                self._mux(self.segments.encode(frame))
                return
            if self.audio:
                self.audio.copy_until(pts * self.time_base)
            self._mux(self.stream.encode(frame))
        except (av.error.FFmpegError, RuntimeError) as e:
            raise self._error(e) from None

    def _mux(self, packets) -> None:
        for packet in packets:
            packet.duration = self._durations.pop(packet.pts, 0)
            if self.segments is not None:  # from an encoder of its own: the audio up to it, then the packet
                packet.stream = self.stream
                if self.audio:
                    self.audio.copy_until((packet.dts if packet.dts is not None else packet.pts) * self.time_base)
            self.out.mux(packet)

    def close(self, complete: bool = True) -> None:
        if not complete:
            self._discard()
            return
        try:
            self._mux(self.segments.flush() if self.segments is not None else self.stream.encode())
            if self.audio:
                self.audio.copy_until(None)
                self.audio.close()
            self.out.close()
        except (self.av.error.FFmpegError, RuntimeError) as e:
            self._discard()
            raise self._error(e) from None
        except BaseException:  # anything else (an encoder thread's own error, Ctrl-C): nothing partial stays
            self._discard()
            raise
        self.tmp.replace(self.path)

    def _error(self, e: Exception) -> FramesError:
        """An FFmpeg error while writing, with what to try (a disk problem is only that)."""
        if getattr(e, "errno", None) in DISK_ERRNOS:
            return write_error(self.path, OSError(e.errno, os.strerror(e.errno)))
        hint = f"try another --codec or --pix-fmt for {self.path.suffix}"
        if self.audio:
            codecs = ", ".join(sorted(self.audio.codecs))
            hint = (f"the copied audio ({codecs}) may not fit {self.path.suffix}: write .mkv, which takes any audio, "
                    f"or {hint}")
        return FramesError(f"{self.path}: FFmpeg could not write the file ({e}); {hint}")

    def _discard(self) -> None:
        for close in (getattr(getattr(self, "segments", None), "abort", None), getattr(self.audio, "close", None),
                      self.out.close):
            try:
                if close:
                    close()
            except Exception:  # noqa: BLE001 - the partial file is removed either way
                pass
        try:
            self.tmp.unlink(missing_ok=True)
        except OSError:  # e.g. the disk went read-only: what stays has the partial name, never the output's
            pass


class _AudioCopy:
    """The audio streams of a file, copied packet for packet (no re-encoding) into an output container, read from
    a second demuxer of the same file as the video advances so that nothing is held and the streams interleave."""

    def __init__(self, source: Path, out, out_path: Path):
        av = import_av()
        self.src = av.open(str(source))
        self.streams = {}
        for s in self.src.streams.audio:
            try:
                self.streams[s.index] = out.add_stream_from_template(s)
            except (av.error.FFmpegError, ValueError) as e:
                self.src.close()
                raise FramesError(f"the audio of {source} ({s.codec_context.name}) cannot be copied into "
                                  f"{out_path.suffix} ({e}): write .mkv instead") from None
        self.out = out
        self.codecs = {s.codec_context.name for s in self.src.streams.audio}
        self.packets = self.src.demux(list(self.src.streams.audio))
        self.pending = None

    def copy_until(self, time: Fraction | None) -> None:
        """Mux the audio packets that start before ``time`` seconds (None: all that are left)."""
        while True:
            packet = self.pending or next(self.packets, None)
            self.pending = None
            if packet is None:
                return
            if packet.dts is None:  # a demuxer's flush packet
                continue
            if time is not None and packet.pts is not None and packet.pts * packet.time_base > time:
                self.pending = packet
                return
            packet.stream = self.streams[packet.stream.index]
            self.out.mux(packet)

    def close(self) -> None:
        self.src.close()


def open_sink(path: Path, meta: VideoMeta, factor: int, encoding: Encoding, frames: int | None = None,
              cores: int | None = None):
    """A path with a video extension -> VideoSink (its encoders planned on ``cores``, default all); anything else ->
    a folder of PNG frames. ``frames``: how many are expected, where known."""
    path = Path(path)
    if path.suffix.lower() in VIDEO_EXTENSIONS:
        return VideoSink(path, meta, factor, encoding, frames, cores)
    return PngFolderSink(path)

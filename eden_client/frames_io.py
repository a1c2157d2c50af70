"""Frames in and out: video files (PyAV, imported only when a video is read or written), folders of frames, and the
metadata that has to survive the trip (time stamps, audio, rotation, colour).

Sources (eden_client/sources.py) yield ``Frame`` objects (an RGB uint8 array and its time stamp) one at a time and
never hold the video; sinks (eden_client/sinks.py, with eden_client/parallel_writer.py for their per-frame work on
several threads) take frames one at a time. Time is exact: a source has a ``time_base`` (a Fraction of a second) and
integer time stamps in it, a rate is a Fraction (29.97 fps is 30000/1001), never a rounded float. This module holds
what both sides share: the frame, the video's metadata, the error and PyAV.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".webm", ".avi", ".m4v")


class FramesError(RuntimeError):
    """An input or output the client cannot handle; the message says which file and what to do."""


def import_av():
    """PyAV, imported on first use so that frame folders work on machines without it."""
    try:
        import av
    except ImportError:
        raise FramesError("reading or writing video files needs PyAV: pip install av (frame folders and PNG "
                          "output work without it)") from None
    return av


@dataclass
class Frame:
    image: np.ndarray  # [H, W, 3] uint8 RGB
    pts: int  # time stamp in the source's time_base
    duration: int = 0  # how long it is shown, in time_base units (0: unknown)
    thumb: np.ndarray | None = None  # scene detection's thumbnail, made in the decoding thread (eden_client/scenes.py)
    similarity: float | None = None  # SSIM of the thumbnail with the previous frame's, made there too


@dataclass
class VideoMeta:
    """What a sink needs to reproduce: timing, orientation, colour tags and where the audio comes from."""
    time_base: Fraction
    rate: Fraction  # nominal frames per second (for VFR input: the average)
    width: int
    height: int
    rotation: int = 0  # counter-clockwise degrees of the display matrix
    color: dict = field(default_factory=dict)  # color_range, colorspace, color_primaries, color_trc (FFmpeg codes)
    bit_depth: int = 8
    audio_from: Path | None = None  # a file whose audio streams are copied into the output


# FFmpeg colour-space codes -> the matrix swscale converts with (unknown: BT.601, as ffmpeg does)
_SWS_MATRIX = {1: "itu709", 4: "fcc", 5: "itu601", 6: "smpte170m", 7: "smpte240m", 9: "bt2020", 10: "bt2020"}


def _sws_matrix(colorspace: int) -> str:
    return _SWS_MATRIX.get(colorspace, "itu601")

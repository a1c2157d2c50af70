"""Generated clips for tests and benchmarks: moving shapes, optionally with a hard cut, a sine-tone audio track,
variable frame timing, 10-bit pixels, rotation and colour tags. Writes video files with PyAV (imported on use) or
folders of PNG frames (no PyAV needed)."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

from eden_serve.images import encode_png

from eden_client.frames_io import import_av
from .samples import moving_shapes


def shot_b(num_frames: int, height: int, width: int) -> list[np.ndarray]:
    """A second shot unlike ``moving_shapes``: dark diagonal stripes drifting, a bright bar."""
    yy, xx = np.mgrid[0:height, 0:width]
    frames = []
    for t in range(num_frames):
        stripes = (((xx + yy + 2 * t) // 6) % 2) * 120 + 20
        f = np.stack([stripes, stripes // 3, 255 - stripes], axis=-1)
        f[height // 3: height // 3 + 6] = 250
        frames.append(f.astype(np.uint8))
    return frames


def clip_frames(num_frames: int, height: int = 48, width: int = 64, cut_at: int | None = None,
                step: float = 2.0) -> list[np.ndarray]:
    """Moving shapes; from frame ``cut_at`` on, another shot (a hard cut between cut_at-1 and cut_at)."""
    if cut_at is None:
        return moving_shapes(num_frames, height, width, step)
    return moving_shapes(cut_at, height, width, step) + shot_b(num_frames - cut_at, height, width)


def long_clip(num_frames: int, height: int, width: int, cut_every: int = 0):
    """Yield ``num_frames`` frames one at a time (nothing held): a disc circling and a bar sweeping over a gradient,
    with a new shot (other colours, other motion) every ``cut_every`` frames (0: one shot)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for t in range(num_frames):
        shot = t // cut_every if cut_every else 0
        rng = np.random.default_rng(shot)
        tint = rng.uniform(0.3, 1.0, 3).astype(np.float32)
        # each shot has another background: a gradient, diagonal stripes, rings
        ramp = (xx / width, ((xx + yy) // (height / 8)) % 2,
                (np.hypot(xx - width / 2, yy - height / 2) // (height / 10)) % 2)[shot % 3]
        f = (np.stack([ramp, 1 - ramp, 0.5 + 0 * ramp], axis=-1) * 200 + 30) * tint
        angle = 0.05 * t * (1 + shot % 3)
        cx, cy = width * (0.5 + 0.3 * np.cos(angle)), height * (0.5 + 0.3 * np.sin(angle))
        f[(xx - cx) ** 2 + (yy - cy) ** 2 < (height * 0.12) ** 2] = rng.uniform(0, 255, 3)
        bar = (t * 4 * (1 + shot % 2)) % width
        f[:, int(bar):int(bar) + max(2, width // 40)] = 250
        yield f.clip(0, 255).astype(np.uint8)


def write_frame_folder(folder: Path, frames, pattern: str = "f{}.png") -> list[Path]:
    """PNG frames (any iterable of them) named f0.png, f1.png, ... (by default not zero-padded: the client's order
    must be natural)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, f in enumerate(frames):
        paths.append(folder / pattern.format(i))
        paths[-1].write_bytes(encode_png(f))
    return paths


def write_video(path: Path, frames: list[np.ndarray], rate: Fraction = Fraction(30000, 1001),
                pts: list[int] | None = None, time_base: Fraction | None = None, audio: bool = True,
                codec: str = "libx264", pix_fmt: str = "yuv420p", rotation: int = 0, color: dict | None = None,
                audio_rate: int = 48000) -> None:
    """Encode ``frames`` (RGB uint8) to ``path``; time stamps ``pts`` in ``time_base`` (default: constant
    ``rate``); a 440 Hz stereo AAC tone (or PCM in .avi) as long as the video; display rotation; colour tags
    (FFmpeg codes for color_range, colorspace, color_primaries, color_trc) also used for the RGB->YUV matrix."""
    av = import_av()
    time_base = time_base or 1 / Fraction(rate)
    pts = pts if pts is not None else list(range(len(frames)))
    out = av.open(str(path), "w")
    v = out.add_stream(codec, rate=rate)
    v.width, v.height, v.pix_fmt = frames[0].shape[1], frames[0].shape[0], pix_fmt
    v.time_base = v.codec_context.time_base = time_base
    color = color or {}
    for name, value in color.items():
        setattr(v.codec_context, name, value)
    if rotation:
        v.set_display_rotation(rotation)
    if audio:
        pcm = Path(path).suffix.lower() == ".avi"
        a = out.add_stream("pcm_s16le" if pcm else "aac", rate=audio_rate)
        a.layout = "stereo"
    matrix = {1: "itu709", 9: "bt2020"}.get(color.get("colorspace"), "itu601")
    for p, f in zip(pts, frames):
        frame = av.VideoFrame.from_ndarray(f, "rgb24").reformat(
            format=pix_fmt, src_colorspace=matrix, dst_colorspace=matrix, src_color_range=2,
            dst_color_range=color.get("color_range") or 1)
        frame.pts, frame.time_base = p, time_base
        for packet in v.encode(frame):
            out.mux(packet)
    for packet in v.encode():
        out.mux(packet)
    if audio:
        end = (pts[-1] + (pts[-1] - pts[-2] if len(pts) > 1 else 1)) * time_base
        total, t = int(audio_rate * end), 0
        while t < total:
            k = min(1024, total - t)
            x = np.sin(2 * np.pi * 440 * np.arange(t, t + k) / audio_rate).astype(np.float32)
            samples = (np.stack([x, x]) * 20000).astype(np.int16).T.reshape(1, -1) if pcm else np.stack([x, x])
            af = av.AudioFrame.from_ndarray(samples, format="s16" if pcm else "fltp", layout="stereo")
            af.sample_rate, af.pts = audio_rate, t
            for packet in a.encode(af):
                out.mux(packet)
            t += k
        for packet in a.encode():
            out.mux(packet)
    out.close()

"""Sub-commands of python -m eden_client: video and batch commands (issue 3).

    video INPUT -o OUTPUT [--factor 2|4|8 | --target-fps RATE] ...   a video or frame folder -> a video or PNGs
    batch IN_DIR OUT_DIR [--factor N | --target-fps RATE] [--jobs N]  every video and frame folder, resumable
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from fractions import Fraction
from pathlib import Path

from .frames_io import VIDEO_EXTENSIONS, FramesError
from .scenes import DEFAULT_THRESHOLD
from .sinks import Encoding
from .video import DEFAULT_MAX_DEPTH, MAX_CHUNK, MAX_DEPTH

# the usual decimal shorthands of the NTSC rates mean the exact rationals
_NTSC = {"23.976": Fraction(24000, 1001), "23.98": Fraction(24000, 1001), "29.97": Fraction(30000, 1001),
         "47.952": Fraction(48000, 1001), "59.94": Fraction(60000, 1001), "119.88": Fraction(120000, 1001)}


def parse_rate(text: str) -> Fraction:
    """'30000/1001', '25', '12.5' -> an exact Fraction; '29.97', '23.976', '59.94' mean x000/1001."""
    try:
        rate = _NTSC.get(text.strip()) or Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a frame rate (e.g. 25, 30000/1001, 29.97)") from None
    if rate <= 0:
        raise argparse.ArgumentTypeError(f"frame rate must be positive, got {text}")
    return rate


def add_interpolation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("interpolation")
    how = g.add_mutually_exclusive_group()
    how.add_argument("--factor", type=int, choices=(2, 4, 8), default=None,
                     help="output frames per input frame: (N-1)*factor+1 frames out (default 2)")
    how.add_argument("--target-fps", type=parse_rate, default=None, metavar="RATE",
                     help="an output frame rate instead of a factor, any rational (60, 60000/1001, 59.94, 50): "
                          "each output frame at its exact time, the input frame where the times meet, else the "
                          "generated frame at the nearest dyadic time of its interval (see --max-depth)")
    g.add_argument("--max-depth", type=int, default=None,
                   help=f"with --target-fps: the deepest level of recursive midpoints, 1..{MAX_DEPTH} (default "
                        f"{DEFAULT_MAX_DEPTH}: times within 1/(2^(depth+1) x input rate) of the exact ones, 0.65 ms at "
                        f"24 fps; each level costs up to one more model call per output frame)")
    g.add_argument("--seed", type=int, default=0,
                   help="base noise seed; frame j uses a seed derived from it and j, so reruns are identical")
    g.add_argument("--fps", type=parse_rate, default=None,
                   help="frame rate of frame-folder input (default 25, as ffmpeg; e.g. 30000/1001 or 29.97); "
                        "video files keep their own time stamps")
    g.add_argument("--scene-threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"a pair is a scene cut when the SSIM of its 32x32 luma thumbnails is below this "
                        f"(default {DEFAULT_THRESHOLD}); cuts repeat the frame instead of morphing")
    g.add_argument("--no-scene-detect", action="store_true", help="interpolate across scene cuts too")
    g.add_argument("--max-inflight", type=int, default=None,
                   help="DiT+decoder requests in flight at once (default: 32 over shared memory, 16 over HTTP; "
                        "measured on H200s, docs/speed.md)")
    g.add_argument("--encoder-inflight", type=int, default=None,
                   help="encoder requests in flight at once (default: 4; over shared memory 2 for frames of 720p and "
                        "below, whose default chunks hold 8 frames or more)")
    g.add_argument("--encoder-chunk", type=int, default=None,
                   help=f"frames per encoder request, 1..{MAX_CHUNK} (default over shared memory: 4 at 1080p and "
                        "up, more for smaller frames, 16 at 480p: each request costs the client the same whatever "
                        "its frames; 2 over HTTP, where smaller answers pass TorchServe's frontend faster; each "
                        "frame is encoded once either way, and over shared memory each request also carries the frame before "
                        "its chunk for that pair's difference)")
    g.add_argument("--token-dtype", choices=["float16", "float32", "int8"], default="float16",
                   help="precision of the tokens sent from the encoder to the DiT+decoder (default %(default)s: "
                        "half the bytes of float32; int8: 8 bits and a scale per token, about half of float16, "
                        "docs/tokens-across-hosts.md)")
    g = p.add_argument_group("output video")
    g.add_argument("--codec", default="libx264", help="FFmpeg encoder (default libx264, i.e. H.264)")
    g.add_argument("--crf", type=int, default=None,
                   help="constant quality (default 18 for libx264: visually lossless; 20 for libx265, 24 for "
                        "libvpx-vp9/AV1)")
    g.add_argument("--pix-fmt", default=None,
                   help="pixel format (default yuv420p, which plays everywhere; yuv420p10le for 10/12-bit input)")
    g.add_argument("--preset", default="veryfast",
                   help="x264/x265 preset (default veryfast; medium makes files a little smaller, 2.5-3.5x "
                        "slower; superfast is faster, for larger files: at 1080p on 16 cores the encoding, not the "
                        "GPU, sets the pace)")
    g.add_argument("--encoders", type=int, default=None,
                   help="x264 encoders at once, each on its own consecutive segments of the output, each segment "
                        "starting with a keyframe (one x264 stream keeps only 12-14 cores busy at 1080p; default: from "
                        "720p up one per 8 usable cores, at most 8; below 720p one; never more than ~1 GiB of frames "
                        "waiting for them allows)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def seconds_since_start() -> float | None:
    """Seconds since this process started (Linux /proc, 10 ms ticks; None elsewhere)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time, ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def options_from(args):
    from .convert import Options
    if args.encoder_chunk is not None and not 1 <= args.encoder_chunk <= MAX_CHUNK:
        raise FramesError(f"--encoder-chunk must be 1..{MAX_CHUNK}, got {args.encoder_chunk}")
    for flag in ("max_inflight", "encoder_inflight"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise FramesError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.max_depth is not None and args.target_fps is None:
        raise FramesError("--max-depth goes with --target-fps (a --factor sets its own depth: log2 of it)")
    if args.encoders is not None and args.encoders < 1:
        raise FramesError(f"--encoders must be at least 1, got {args.encoders}")
    max_depth = DEFAULT_MAX_DEPTH if args.max_depth is None else args.max_depth
    if not 1 <= max_depth <= MAX_DEPTH:
        raise FramesError(f"--max-depth must be 1..{MAX_DEPTH}, got {max_depth}")
    return Options(factor=args.factor or 2, target_fps=args.target_fps, max_depth=max_depth,
                   seed=args.seed, fps=args.fps,
                   scene_threshold=None if args.no_scene_detect else args.scene_threshold,
                   max_inflight=args.max_inflight, encoder_chunk=args.encoder_chunk,
                   encoder_inflight=args.encoder_inflight, token_dtype=args.token_dtype,
                   encoding=Encoding(args.codec, args.crf, args.pix_fmt, args.preset, args.encoders))


def cmd_video(args) -> int:
    from .connection import connect
    from .convert import convert
    from .progress import Progress
    src, dst = Path(args.input), Path(args.output)
    if dst.suffix and dst.suffix.lower() not in VIDEO_EXTENSIONS:
        print(f"client: {dst}: a video output needs one of {', '.join(VIDEO_EXTENSIONS)}; a name without an "
              f"extension is a folder of PNG frames", file=sys.stderr)
        return 2
    started = seconds_since_start()  # the interpreter's start and the imports, before any work
    try:
        options = options_from(args)
        progress = Progress(quiet=args.quiet)
        # connected once the input has opened (a bad input is said first), before "start ..." (a missing key file
        # is said before any work)
        stats = convert(src, dst, lambda: connect(args), options,
                        on_start=lambda total: progress.start(0, src.name, total),
                        on_progress=lambda done: progress.update(0, done))
        progress.close()
        if started is not None:
            stats.phases["start"] = started
    except FramesError as e:
        print(f"client: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"client: interrupted; {dst} was not written", file=sys.stderr)
        return 130
    print(f"wrote {dst}: {stats.summary()}")
    if args.stats_json:
        Path(args.stats_json).write_text(json.dumps(stats.as_dict(), indent=1))
    return 0


def cmd_batch(args) -> int:
    from .batch import check_folders, run_batch, summary_table
    from .connection import connect
    in_dir = Path(args.in_dir)
    try:
        check_folders(in_dir, Path(args.out_dir))  # before anything is asked of the servers
        options = options_from(args)
        runner = None
        if args.ray:  # the inputs spread over a Ray cluster, each on a node's own deployment (eden_client/cluster.py)
            from .cluster import runner as ray_runner
            runner = ray_runner(args, options)
        jobs, code = run_batch(in_dir, Path(args.out_dir), None if runner else connect(args), options,
                               args.jobs, args.quiet, runner=runner)
    except FramesError as e:
        print(f"client: {e}", file=sys.stderr)
        return 2
    if not jobs:
        print(f"client: no video files ({', '.join(VIDEO_EXTENSIONS)}) or frame folders under {args.in_dir}",
              file=sys.stderr)
        return 2
    print(summary_table(jobs))
    return code


def register(sub) -> None:
    """Add this module's sub-commands to the argparse sub-parsers ``sub`` (called by eden_client.cli.main)."""
    from .connection import add_connection_args

    p = sub.add_parser("video", help="interpolate a video file or a folder of frames",
                       description="Interpolate a video file (mp4, mkv, mov, webm, avi) or a folder of PNG/JPEG "
                                   "frames. OUTPUT with a video extension is a video (audio, rotation and colour "
                                   "tags of the input kept); without one, a folder of numbered PNG frames.")
    p.add_argument("input", help="video file or folder of frames")
    p.add_argument("-o", "--output", required=True, help="output video (.mp4, .mkv, .mov, ...) or PNG folder")
    p.add_argument("--stats-json", default=None, help="also write the run's counts and timings here")
    add_interpolation_args(p)
    add_connection_args(p)
    p.set_defaults(fn=cmd_video)

    p = sub.add_parser("batch", help="interpolate every video and frame folder under a folder (resumable)",
                       description="Every video file and frame folder under IN_DIR, recursively, into the same "
                                   "tree under OUT_DIR. What is already complete is skipped, so rerunning after a "
                                   "crash or Ctrl-C resumes; exit code 1 if any input failed.")
    p.add_argument("in_dir")
    p.add_argument("out_dir")
    p.add_argument("--jobs", type=int, default=2,
                   help="inputs processed at the same time (default 2: the next input fills the deployment's pipeline "
                        "while one drains)")
    add_interpolation_args(p)
    add_connection_args(p)
    from .cluster import add_args as add_cluster_args
    add_cluster_args(p)
    p.set_defaults(fn=cmd_batch)

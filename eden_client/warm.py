"""``warm``: run a deployment's slow first minute before users do.

    python -m eden_client warm [--sizes 480x854,1080x1920] [--frames 17] [--rounds 3] [connection flags]

Right after ``torchserve --start`` the first videos are slow: TorchServe's frontend (Java) moves large bodies several
times slower until its JIT has compiled the paths they take (bench/NOTES.md, sessions 2 and 6), and each worker pays
for the first request at a size. This sends what a user's run sends, over the transport a user's run would choose
(``--transport``, default auto), on a short generated clip per size, ``--rounds`` times: the encoder's token answers
and the DiT+decoder's token requests, with enough requests in flight that every worker sees every size. It prints
each round's seconds per generated frame (the last rounds show the warm speed) and exits 0 when every round
completed. The clip is smooth moving shapes made here (no file read, nothing written).

Run it once after the models are READY (``status --wait``): over HTTP, as a two-host deployment uses, it is where the
warming matters; with shared memory it still warms the workers at each size.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from eden_serve.limits import parse_size

from .connection import add_connection_args, connect
from .frames_io import Frame

DEFAULT_SIZES = "480x854,1080x1920"


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """"480x854,1080x1920" -> [(480, 854), (1080, 1920)] (height x width)."""
    sizes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            h, w = parse_size(part)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if h < 16 or w < 16 or h * w > 8192 * 8192:
            raise argparse.ArgumentTypeError(f"{part}: each side at least 16 pixels, at most 8192x8192")
        sizes.append((h, w))
    if not sizes:
        raise argparse.ArgumentTypeError("no size given")
    return sizes


def clip(height: int, width: int, frames: int, shift: int = 0) -> list[Frame]:
    """``frames`` smooth frames of a bright square moving over a gradient (``shift`` moves the whole clip, so each
    round sends frames the DiT+decoder's frame cache has not seen)."""
    y, x = np.mgrid[0:height, 0:width]
    background = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1),
                           np.full_like(x, 96)], axis=-1).astype(np.uint8)
    side = max(4, min(height, width) // 4)
    out = []
    for i in range(frames):
        image = np.roll(background, shift, axis=1)  # (a new array)
        top = (height - side) * i // max(1, frames - 1)
        left = (width - side) * i // max(1, frames - 1)
        image[top:top + side, left:left + side] = (240, 220, 40)
        out.append(Frame(image, pts=i, duration=1))
    return out


def warm(client, sizes: list[tuple[int, int]], frames: int = 17, rounds: int = 3, token_dtype: str = "float16",
         say=print) -> dict:
    """Interpolate a ``frames``-frame clip at each size ``rounds`` times with ``client``; seconds per generated frame
    of each round, by size ("HxW" -> [s, ...])."""
    from .video import Interpolator
    report: dict = {}
    for h, w in sizes:
        interp = Interpolator(client, token_dtype=token_dtype)
        seconds = []
        for r in range(rounds):
            t = time.perf_counter()
            interp.run(clip(h, w, frames, shift=r), lambda *a: None)
            seconds.append((time.perf_counter() - t) / (frames - 1))
            say(f"warm {h}x{w} round {r + 1}/{rounds}: {seconds[-1]:.4f} s a generated frame")
        report[f"{h}x{w}"] = [round(s, 5) for s in seconds]
    return report


def cmd_warm(args) -> int:
    if args.frames < 2 or args.rounds < 1:
        print("client: warm needs --frames >= 2 and --rounds >= 1", file=sys.stderr)
        return 2
    client = connect(args)
    say = (lambda *a: None) if args.json else (lambda m: print(m, flush=True))
    say(f"transport: {client.describe_transport()}")
    t = time.perf_counter()
    report = warm(client, args.sizes, args.frames, args.rounds, args.token_dtype, say)
    total = time.perf_counter() - t
    if args.json:
        json.dump({"transport": client.transport, "seconds_per_generated_frame": report,
                   "total_s": round(total, 3)}, sys.stdout)
        print()
    else:
        print(f"warmed {len(report)} size(s) in {total:.1f} s")
    return 0


def register(sub) -> None:
    """Add the ``warm`` sub-command to the argparse sub-parsers ``sub`` (called by eden_client.cli.main)."""
    p = sub.add_parser("warm", help="warm a freshly started deployment (frontend and workers) before users come",
                       description=__doc__.split("\n\n")[2].replace("\n", " "))
    p.add_argument("--sizes", type=parse_sizes, default=parse_sizes(DEFAULT_SIZES),
                   help=f"frame sizes HEIGHTxWIDTH, comma separated (default {DEFAULT_SIZES})")
    p.add_argument("--frames", type=int, default=17, help="frames of each size's clip (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="times each clip is sent (default: %(default)s)")
    p.add_argument("--token-dtype", choices=["float16", "float32", "int8"], default="float16",
                   help="precision of the tokens, as your runs use it (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object (for scripts) instead of lines")
    add_connection_args(p)
    p.set_defaults(fn=cmd_warm)

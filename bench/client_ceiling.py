"""What the client alone can sustain: `eden_client.convert` against a deployment that answers at once.

    python bench/client_ceiling.py [--sizes 480x854:300,1080x1920:120] [--outputs mp4,png] [--content smooth,noise]

The "deployment" costs nothing (tokens of the right shape, a prepared middle frame), so the output frames per second
are the ceiling of the client's own work for that input and output: decoding, colour conversion, scene thumbnails,
pair differences, scheduling, PNG encoding or H.264. `--content noise` answers frames of noise (what random weights
make: slow to compress) instead of smooth ones. Compare with the deployment's raw-sink rate (bench/cli_speed.py):
the client keeps up when its ceiling is well above it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from eden_client.api import EncoderAnswer  # noqa: E402
from eden_client.convert import Options, convert  # noqa: E402
from eden_dev import clips  # noqa: E402
from eden_dev.samples import moving_shapes  # noqa: E402
from eden_serve import wire  # noqa: E402


class InstantDeployment:
    """Stands in for EdenClient: answers at once (tokens of the right grid and a tiny width, a prepared frame)."""
    transport = "none (instant stand-in)"

    def __init__(self, frame: np.ndarray):
        self.frame = frame

    def describe_transport(self) -> str:
        return self.transport

    def encode_frames(self, frames, dtype="float16"):
        n, (h, w) = len(frames), frames[0].shape[:2]
        gh, gw = -(-h // 32) * 2, -(-w // 32) * 2
        tokens = np.zeros((n, 2, gh * gw, 4), np.float16)
        blob = wire.TokenBlob(tokens, (h, w), (0, gw * 16 - w, 0, gh * 16 - h), 16, [0.5] * n, [0.2] * n,
                              [0.0] * (n - 1), "")
        return EncoderAnswer(blob, None)

    def generate_pair(self, first, i, second, j, difference=None, seed=None):
        return self.frame.copy(), seed  # (the real client copies the answer out of shared memory too)

    def release(self, encoded):
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="480x854:300,1080x1920:120")
    ap.add_argument("--outputs", default="mp4,png")
    ap.add_argument("--content", default="smooth,noise")
    ap.add_argument("--workdir", default="/tmp/eden_ceiling")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for spec in args.sizes.split(","):
        size, n = spec.split(":")
        h, w = (int(v) for v in size.split("x"))
        clip = moving_shapes(int(n), h, w, step=h / 40)
        src = work / f"in_{size}.mp4"
        clips.write_video(src, clip, Fraction(30000, 1001))
        for content in args.content.split(","):
            frame = clip[len(clip) // 2] if content == "smooth" else \
                np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
            for kind in args.outputs.split(","):
                dst = work / (f"out_{size}.mp4" if kind == "mp4" else f"out_{size}_png")
                shutil.rmtree(dst, ignore_errors=True) if dst.is_dir() else dst.unlink(missing_ok=True)
                t = time.perf_counter()
                stats = convert(src, dst, InstantDeployment(frame), Options())
                seconds = time.perf_counter() - t
                key = f"{size} {kind} {content}"
                results[key] = {"output_fps": stats.output_frames / seconds,
                                "s_per_generated_frame": seconds / (int(n) - 1), "phases_s": stats.phases}
                print(key, json.dumps(results[key], default=float), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()

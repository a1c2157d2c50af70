"""The main job on an embedded default, end to end on CPU with a real TorchServe (./run.sh demo runs
python -m eden_dev.demo [--checkpoint eden.pt]):

checkpoint (yours, or a small random-weight one in the official layout) -> split_weights -> build the two archives
-> start TorchServe -> interpolate a generated pair, then a generated clip x2, through both models -> stop TorchServe.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from eden_client.api import EdenClient
from eden_client.errors import ServeError
from eden_client.keys import KeySource
from eden_serve.checkpoint import make_random_checkpoint, split_checkpoint
from eden_serve.config import CheckpointError, EdenConfig

from .clips import write_video
from .launcher import TorchServe
from .samples import moving_shapes

DEMO_CONFIG = EdenConfig(hidden_dim=128, num_heads=2, dit_depth=2, decoder_depth=1)


def step(text: str) -> float:
    print(f"==> {text}", flush=True)
    return time.perf_counter()


def run_demo(args) -> int:
    from eden_serve.archives import build

    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(args.checkpoint) if args.checkpoint else work / "eden_random.pt"
    if not args.checkpoint:
        step(f"no checkpoint given: making a small RANDOM-WEIGHT checkpoint in the official layout at {checkpoint} "
             "(hidden 128, 2 DiT blocks; its frames look like noise: pass --checkpoint eden.pt for real ones)")
        make_random_checkpoint(checkpoint, DEMO_CONFIG, seed=0)
    step(f"split_weights {checkpoint}")
    try:
        cfg = split_checkpoint(checkpoint, work / "weights")
    except (CheckpointError, FileNotFoundError) as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2
    print(f"    hidden {cfg.hidden_dim}, {cfg.num_heads} heads, {cfg.dit_depth} DiT / {cfg.decoder_depth} decoder blocks")
    step("build_archives (CPU placement)")
    build(work / "weights", work / "model_store", gpus=0)
    frames = moving_shapes(2)
    inputs = []
    for i, f in enumerate(frames):
        inputs.append(work / f"sample_frame{i}.png")
        Image.fromarray(f).save(inputs[-1])
    t = step("start TorchServe (token authorization on, loopback only)")
    with TorchServe(work / "serve", work / "model_store") as ts:
        print(f"    ready in {time.perf_counter() - t:.1f} s: inference {ts.inference_url}, "
              f"management {ts.management_url}, key file {ts.key_file}")
        client = EdenClient.connect(ts.inference_url, encoder_keys=KeySource(key_file=ts.key_file))
        t = step(f"interpolate {inputs[0].name} + {inputs[1].name} through eden_encoder -> eden_ditdec (seed {args.seed})")
        blob = client.encode([p.read_bytes() for p in inputs])
        png, seed = client.generate(blob, args.seed)
        out = work / "middle.png"
        out.write_bytes(png)
        print(f"    {len(blob) / 1e3:.0f} kB of float16 tokens, {time.perf_counter() - t:.2f} s -> {out}")
        clip, video = work / "sample_clip.mp4", work / "sample_clip_x2.mp4"
        write_video(clip, moving_shapes(12, 192, 256))  # 12 frames at 30000/1001 fps with an audio track
        # the command a user runs, as a subprocess with its defaults (--transport auto: shared memory, since the
        # server is on this host), not the library in this process
        command = [sys.executable, "-m", "eden_client", "video", str(clip), "-o", str(video), "--seed", str(args.seed),
                   "--encoder-url", ts.inference_url, "--key-file", str(ts.key_file), "--quiet"]
        step(f"interpolate the generated clip {clip.name} x2: python -m eden_client video {clip.name} -o {video.name}")
        r = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            print(f"demo: the video command failed (exit {r.returncode}):\n{r.stderr[-3000:]}", file=sys.stderr)
            return 1
        print(f"    {r.stdout.strip()}")
        step("stop TorchServe")
    print(f"demo done: {out}, {video}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m eden_dev.demo",
        description="split, archive, serve on CPU and interpolate a generated sample, then stop")
    ap.add_argument("--checkpoint", default=None,
                    help="official EDEN checkpoint (default: a small random-weight one made on the spot)")
    ap.add_argument("--workdir", default="build/demo", help="where the demo writes everything")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        return run_demo(args)
    except ServeError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

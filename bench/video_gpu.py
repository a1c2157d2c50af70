"""Video throughput of the deployment on a GPU host (e.g. nvidia-h200-x2; needs no PyAV):

    python bench/video_gpu.py [--checkpoint eden.pt] [--seconds 30] [--factor 2] [--max-inflight 8] [--out DIR]

1. generates a 30 s 480p clip at 30000/1001 fps as a folder of PNG frames (three shots: two hard cuts);
2. real-size weights (yours, or random in the official layout) -> split -> archives for the GPUs seen (encoder on
   GPU 0, DiT+decoder on the others) -> TorchServe;
3. runs the video client over the folder (x2 by default) into a folder of PNG frames, as ``python -m eden_client video``
   does, and prints output frames/s with the client's counts (encoder requests and frames, token bytes, cuts).
Writes the summary as JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from fractions import Fraction
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "archive_scripts")]

from build_archives import build  # noqa: E402
from eden_client.api import EdenClient  # noqa: E402
from eden_client.convert import Options, convert  # noqa: E402
from eden_client.keys import KeySource  # noqa: E402
from eden_dev.clips import long_clip, write_frame_folder  # noqa: E402
from eden_dev.launcher import TorchServe  # noqa: E402
from eden_serve import checkpoint  # noqa: E402
from eden_serve.config import EdenConfig  # noqa: E402

RATE = Fraction(30000, 1001)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="official EDEN checkpoint (default: random weights)")
    ap.add_argument("--out", default="build/video_gpu")
    ap.add_argument("--work", default="/tmp/eden_video_gpu", help="clip, weights, archives, output frames")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=854)
    ap.add_argument("--factor", type=int, choices=(2, 4, 8), default=2)
    ap.add_argument("--max-inflight", type=int, default=16)
    ap.add_argument("--encoder-chunk", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4, help="TorchServe batch size of both models")
    ap.add_argument("--workers", type=int, default=2, help="workers per model and GPU")
    ap.add_argument("--transport", choices=("shm", "http"), default="shm")
    args = ap.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count()
    summary: dict = {"gpus": gpus, "names": [torch.cuda.get_device_name(i) for i in range(gpus)],
                     "torch": torch.__version__}

    num_frames = round(args.seconds * RATE)
    clip = work / "clip"
    if len(list(clip.glob("*.png"))) != num_frames:
        t = time.perf_counter()
        write_frame_folder(clip, long_clip(num_frames, args.height, args.width, cut_every=num_frames // 3 + 1),
                           pattern="{:06d}.png")
        print(f"generated {num_frames} frames {args.width}x{args.height} in {time.perf_counter() - t:.0f} s",
              flush=True)

    ckpt = Path(args.checkpoint) if args.checkpoint else work / "eden_random.pt"
    if not args.checkpoint and not ckpt.is_file():
        checkpoint.make_random_checkpoint(ckpt, EdenConfig(), seed=0)
    checkpoint.split_checkpoint(ckpt, work / "weights")
    build(work / "weights", work / "store", gpus=gpus, batch_size=args.batch_size, workers=args.workers)

    result = work / f"x{args.factor}"
    shutil.rmtree(result, ignore_errors=True)
    with TorchServe(work / "serve", work / "store") as ts:
        client = EdenClient.connect(ts.inference_url, encoder_keys=KeySource(key_file=ts.key_file),
                                    transport=args.transport)
        options = Options(factor=args.factor, fps=RATE, max_inflight=args.max_inflight,
                          encoder_chunk=args.encoder_chunk)
        last = [time.perf_counter()]

        def progress(n: int) -> None:
            if time.perf_counter() - last[0] > 10:
                last[0] = time.perf_counter()
                print(f"  {n} frames written", flush=True)

        stats = convert(clip, result, client, options, on_progress=progress)
        summary["workers"] = {name: [{k: w.get(k) for k in ("pid", "gpu", "status")}
                                     for w in ts.describe(name)["workers"]]
                              for name in ("eden_encoder", "eden_ditdec")}
    summary["clip"] = {"frames": num_frames, "rate": str(RATE), "size": [args.height, args.width],
                       "seconds": float(num_frames / RATE)}
    summary["settings"] = {"factor": args.factor, "max_inflight": args.max_inflight, "transport": args.transport,
                           "workers": args.workers,
                           "encoder_chunk": args.encoder_chunk, "batch_size": args.batch_size,
                           "checkpoint": args.checkpoint or "random weights"}
    summary["run"] = stats.as_dict()
    summary["run"]["realtime_factor"] = round(stats.output_frames / (RATE * args.factor) / stats.seconds, 3)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps({k: v for k, v in summary.items() if k != "workers"}, indent=1, default=str))
    print(f"video x{args.factor}: {stats.summary()}")


if __name__ == "__main__":
    main()

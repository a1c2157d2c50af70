"""GPU smoke run of the two-GPU deployment (run on the GPU host, e.g. nvidia-h200-x2):

    python bench/gpu_smoke.py [--checkpoint eden.pt] [--out DIR] [--requests 10]

1. the tiny fixture through the core on cuda:0 against the official values;
2. real-size weights (yours, or random in the official layout) -> split -> archives for the GPUs seen -> TorchServe;
3. placement: which GPU each worker process sits on, read from nvidia-smi's compute apps (by pid, matched to the
   worker pids of the management API) and from the X-Eden-Device header each handler answers with;
4. a 480p pair round trip, timed per request (encoder, DiT+decoder), with the in-process model time beside it.
Prints a summary and writes it as JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "archive_scripts")]

from build_archives import build  # noqa: E402
from eden_client.api import EdenClient  # noqa: E402
from eden_client.keys import KeySource  # noqa: E402
from eden_dev.launcher import TorchServe  # noqa: E402
from eden_dev.samples import moving_shapes  # noqa: E402
from eden_serve import checkpoint, images, pipeline, tokens, wire  # noqa: E402
from eden_serve.config import EdenConfig  # noqa: E402


def fixture_check(device) -> dict:
    from safetensors.torch import load_file
    from PIL import Image
    fx = ROOT / "tests/fixtures/eden_tiny"
    w = Path("/tmp/eden_smoke_tiny")
    checkpoint.split_checkpoint(fx / "eden_tiny.pt", w)
    enc, gen = checkpoint.load_encoder(w, device), checkpoint.load_generator(w, device)
    exp = load_file(fx / "expected.safetensors")
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(fx / f"frame{i}.png").convert("RGB")).copy())
                     for i in (0, 1)]).permute(0, 3, 1, 2).float().div(255).to(device)
    encoded, diffs = pipeline.encode_frames(enc, x)
    geo = pipeline.Geometry.for_size(90, 120, enc.cfg)
    pairs = pipeline.PairBatch(encoded.dit[None], encoded.dec[None], encoded.mean[None], encoded.std[None], diffs[0], geo)
    frame = pipeline.interpolate(gen, pairs, pipeline.make_noise(geo, 16, 0, device)).cpu()
    return {"tokens_max_abs_diff": float((encoded.dit.cpu() - exp["cond_dit"]).abs().max()),
            "frame_max_abs_diff": float((frame - exp["frame"]).abs().max())}


def gpu_of_pids() -> dict[int, int]:
    """pid -> GPU index, from nvidia-smi."""
    uuids = dict(line.split(", ") for line in subprocess.run(
        ["nvidia-smi", "--query-gpu=uuid,index", "--format=csv,noheader"], capture_output=True, text=True,
        check=True).stdout.strip().splitlines())
    apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_uuid,used_memory", "--format=csv,noheader"],
                          capture_output=True, text=True, check=True).stdout.strip().splitlines()
    out = {}
    for line in apps:
        pid, uuid, _mem = line.split(", ")
        out[int(pid)] = int(uuids[uuid])
    return out


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--out", default="build/gpu_smoke")
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=854)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"gpus": torch.cuda.device_count(),
                     "names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                     "torch": torch.__version__}
    summary["fixture_on_cuda0"] = fixture_check(torch.device("cuda", 0))
    print("fixture on cuda:0:", summary["fixture_on_cuda0"], flush=True)

    work = Path("/tmp/eden_smoke")
    ckpt = Path(args.checkpoint) if args.checkpoint else work / "eden_random.pt"
    work.mkdir(parents=True, exist_ok=True)
    if not args.checkpoint:
        checkpoint.make_random_checkpoint(ckpt, EdenConfig(), seed=0)
    cfg = checkpoint.split_checkpoint(ckpt, work / "weights")
    build(work / "weights", work / "store", gpus=torch.cuda.device_count(), batch_size=1)

    frames = moving_shapes(2, args.height, args.width, step=12)
    pngs = [images.encode_png(f) for f in frames]
    with TorchServe(work / "serve", work / "store") as ts:
        client = EdenClient.connect(ts.inference_url, encoder_keys=KeySource(key_file=ts.key_file))
        pids = {name: ts.worker_pids(name) for name in ("eden_encoder", "eden_ditdec")}
        gpus = gpu_of_pids()
        summary["placement_nvidia_smi"] = {name: {p: gpus.get(p) for p in ps} for name, ps in pids.items()}
        r_enc = client.encoder.predict(files={"frame0": pngs[0], "frame1": pngs[1]})
        blob = r_enc.content
        r_dec = client.ditdec.predict(data=blob, headers={"X-Eden-Seed": "0"})
        summary["placement_handler_header"] = {"eden_encoder": r_enc.headers.get("X-Eden-Device"),
                                               "eden_ditdec": r_dec.headers.get("X-Eden-Device")}
        print("placement:", summary["placement_nvidia_smi"], summary["placement_handler_header"], flush=True)
        enc_t, dec_t = [], []
        for i in range(args.requests):
            blob, t1 = timed(client.encode, pngs)
            (png, _), t2 = timed(client.generate, blob, i)
            enc_t.append(t1)
            dec_t.append(t2)
        (out / "middle_480p.png").write_bytes(png)
        summary["round_trip"] = {
            "size": [args.height, args.width], "token_bytes_float16": len(blob), "requests": args.requests,
            "encoder_ms_median": 1000 * statistics.median(enc_t), "encoder_ms_min": 1000 * min(enc_t),
            "ditdec_ms_median": 1000 * statistics.median(dec_t), "ditdec_ms_min": 1000 * min(dec_t),
            "output_shape": list(images.decode_image(png, 10**8).shape)}
        summary["torchserve_log_tail"] = ts.log_tail(5)[-3000:]

    # the same work in process on one GPU, for the model's share of those times
    dev = torch.device("cuda", 0)
    enc, gen = checkpoint.load_encoder(work / "weights", dev), checkpoint.load_generator(work / "weights", dev)
    x = torch.from_numpy(np.stack(frames)).to(dev).permute(0, 3, 1, 2).float() / 255
    t_enc, t_gen = [], []
    for i in range(args.requests):
        torch.cuda.synchronize()
        t = time.perf_counter()
        encoded, diffs = pipeline.encode_frames(enc, x)
        geo = pipeline.Geometry.for_size(args.height, args.width, cfg)
        (b,) = tokens.to_blobs(encoded, diffs, geo)
        torch.cuda.synchronize()
        t_enc.append(time.perf_counter() - t)
        t = time.perf_counter()
        b = wire.from_bytes(b.to_bytes())
        pairs = tokens.pair_batch([b], [tokens.tokens_tensor(b, dev)], geo)
        f = pipeline.to_uint8(pipeline.interpolate(gen, pairs, pipeline.make_noise(geo, 16, i, dev)))
        t_gen.append(time.perf_counter() - t)
    summary["in_process_cuda0"] = {"encoder_ms_median": 1000 * statistics.median(t_enc),
                                   "ditdec_ms_median": 1000 * statistics.median(t_gen)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "torchserve_log_tail"}, indent=1))


if __name__ == "__main__":
    main()

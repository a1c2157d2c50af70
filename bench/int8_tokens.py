"""8-bit tokens against float32 tokens: PSNR of the generated frame, and the bytes a generated frame costs on the wire.

Real-size architecture (EdenConfig()) with random weights (checkpoint.make_random_checkpoint, ~630 MB, made once
under --work), in process on the CPU (or a GPU with --device cuda): two frames of a moving-shapes clip are encoded
once in float32; the pair's tokens are then passed through each wire dtype (float16, int8 with a scale per token as
the wire format does, and for comparison int8 with a scale per channel) and the DiT+decoder makes the middle frame
with the same seed from each. PSNR is against the frame made from the float32 tokens.

Bytes per generated frame: the DiT+decoder request body of a pair (what EdenClient sends over HTTP), and with the
frame cache, where a video of chunk 4 at x2 sends each frame's tokens once (about one frame of tokens per pair).

    python bench/int8_tokens.py --sizes 256x448 480x854 --out bench/results/int8_tokens_cpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from eden_dev.samples import moving_shapes  # noqa: E402
from eden_serve import checkpoint, framerefs, pipeline, tokens  # noqa: E402
from eden_serve.config import EdenConfig  # noqa: E402


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def per_channel(x: torch.Tensor) -> torch.Tensor:
    """int8 with one absmax scale per channel of each frame's token stream (over its N tokens), back to float."""
    scale = x.abs().amax(dim=-2, keepdim=True) / 127
    return torch.where(scale > 0, x / scale, torch.zeros_like(x)).round().clamp(-127, 127) * scale


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["256x448", "480x854"])
    p.add_argument("--seeds", type=int, default=3, help="noise seeds per size (PSNR is their mean and minimum)")
    p.add_argument("--work", default="/tmp/eden_int8_bench", help="where the random checkpoint is kept")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt, weights = work / "eden_random.pt", work / "weights"
    if not (weights / "config.json").exists():
        if not ckpt.exists():
            checkpoint.make_random_checkpoint(ckpt, EdenConfig(), seed=0)
        checkpoint.split_checkpoint(ckpt, weights)
    device = torch.device(args.device)
    encoder = checkpoint.load_encoder(weights, device)
    generator = checkpoint.load_generator(weights, device)
    cfg = generator.cfg
    results = []
    for size in args.sizes:
        h, w = map(int, size.split("x"))
        frames = moving_shapes(2, h, w, step=6.0)
        x = torch.stack([torch.from_numpy(f).permute(2, 0, 1).float() / 255 for f in frames]).to(device)
        encoded, (diff,) = pipeline.encode_frames(encoder, x)
        geo = pipeline.Geometry.for_size(h, w, cfg)
        wire32 = tokens.wire_tensor(encoded, "float32")  # [2, 2, N, D]
        variants = {"float32": wire32, "float16": wire32.half().float(),
                    "int8": tokens.dequantize(tokens.quantize(wire32)), "int8_per_channel": per_channel(wire32)}
        rel = {k: float((v - wire32).norm() / wire32.norm()) for k, v in variants.items()}
        out, seconds = {k: [] for k in variants}, time.perf_counter()
        for seed in range(args.seeds):
            for name, t in variants.items():
                pairs = pipeline.PairBatch(dit=t[None, :, 0], dec=t[None, :, 1], mean=encoded.mean[None],
                                           std=encoded.std[None], difference=diff[:1], geometry=geo)
                noise = pipeline.make_noise(geo, cfg.latent_dim, seed, device)
                out[name].append(pipeline.to_uint8(pipeline.interpolate(generator, pairs, noise))[0].numpy())
        seconds = time.perf_counter() - seconds
        scores = {k: [psnr(a, b) for a, b in zip(out[k], out["float32"])] for k in variants if k != "float32"}
        sizes = {}
        for dtype in ("float32", "float16", "int8"):
            (blob,) = tokens.to_blobs(encoded, [diff], geo, dtype, cfg.encoder_fingerprint)
            one = blob.frame(0)
            sizes[dtype] = {
                "pair_blob_bytes": blob.nbytes,  # the pair sent whole (no cache)
                # with the cache: one new frame per pair, the other named by hash
                "pair_body_one_inline_one_ref": len(framerefs.build([one.to_bytes(), "0" * 32], diff.item())),
            }
        results.append({"size": size, "tokens_per_frame": int(wire32.shape[2]), "hidden_dim": cfg.hidden_dim,
                        "token_relative_error": rel,
                        "psnr_vs_float32_db": {k: {"mean": round(float(np.mean(v)), 2), "min": round(min(v), 2)}
                                               for k, v in scores.items()},
                        "bytes_per_generated_frame": sizes, "seconds": round(seconds, 1)})
        print(json.dumps(results[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": str(device), "weights": "random, real size (EdenConfig())",
                                              "seeds": args.seeds, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

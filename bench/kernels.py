"""Issue 11's benchmark, one command on a GPU host (one GPU is enough):

    python bench/kernels.py --out build/kernels/kernels.json [--quick] [--cache-dir DIR] [--budget-s 420]

Random real-size weights (as bench/speed.py). For each shape (480x854, 1080x1920 at batch 1 and 4; 2160x3840 at
batch 1 and 2), the DiT+decoder core in process, the way the handler calls it (eden_serve.acceleration.Accelerator
over the pipeline functions, on a batch of pair tokens that went through float16 like the wire):
  - ms per generated frame (CUDA events, after warm-up), the first call's seconds (compile / capture), peak GPU
    memory, PSNR of the frames (8-bit, as served) against float32 with the same seeds and tokens;
  - a torch.profiler pass: kernel time per frame by category (attention by backend, gemm, norm, softmax, casts,
    copies/layout, elementwise, fused (compiled) kernels, ...) and by module (DiT context/blocks: self-attention,
    temporal attention, MLP; decoder context/blocks; heads), GPU busy share, the top kernels.
Variants: eager ones in this process (baseline = today's path; each SDPA backend forced first; weights cast once;
CUDA graphs), compiled ones each in a fresh subprocess with a timeout (clean compiler state): the worker start
(DitDecService.initialize with a fake TorchServe context: compile + warm-up of the configured sizes) with a cold
compile cache and again with the warm one, the first requests after it, then compile variants alone and combined.
Also SDPA alone per attention shape and backend. Variants run in order of importance until --budget-s is spent;
every result goes to --out as soon as it exists (progress on stdout).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from eden_dev.handler_context import HandlerContext  # noqa: E402
from eden_serve import acceleration, checkpoint, limits, model, pipeline, tokens  # noqa: E402
from eden_serve.acceleration import Accelerator, KernelSettings  # noqa: E402
from eden_serve.config import EdenConfig  # noqa: E402

T0 = float(os.environ.get("EDEN_BENCH_START") or time.time())  # subprocesses count from the parent's start
SHAPES = [(480, 854, 1), (480, 854, 4), (1080, 1920, 1), (1080, 1920, 4), (2160, 3840, 1), (2160, 3840, 2)]
QUICK_SHAPES = SHAPES[:4]
WORKER_KERNELS = "compile_mode=default,fused_ops=1,cuda_graphs=1,cast_weights=1"
EAGER_VARIANTS = {  # name: kernel settings (run in this process)
    "baseline": "",
    "sdpa_cudnn": "attention_backend=cudnn",
    "cuda_graphs": "cuda_graphs=1",
    "cast_weights": "cast_weights=1",
    "sdpa_flash": "attention_backend=flash",
    "sdpa_efficient": "attention_backend=efficient",
    "eager_combined": "cuda_graphs=1,cast_weights=1,attention_backend=cudnn",
}
COMPILED_VARIANTS = {  # name: kernel settings (each in a subprocess)
    "compile_combined": "compile_mode=default,fused_ops=1,cuda_graphs=1,cast_weights=1",
    "compile": "compile_mode=default",
    "compile_combined_cudnn": "compile_mode=default,fused_ops=1,cuda_graphs=1,cast_weights=1,attention_backend=cudnn",
    "compile_fused": "compile_mode=default,fused_ops=1",
    "compile_graphs": "compile_mode=default,cuda_graphs=1",
    "max_autotune_combined": "compile_mode=max-autotune-no-cudagraphs,fused_ops=1,cuda_graphs=1,cast_weights=1",
    "compile_combined_float8": "compile_mode=default,fused_ops=1,cuda_graphs=1,cast_weights=1,float8=1",
}
QUICK_EAGER = ("baseline", "sdpa_cudnn", "cuda_graphs")
QUICK_COMPILED = ("compile_combined", "compile")


def say(*args) -> None:
    print(f"[{time.time() - T0:6.1f}s]", *args, flush=True)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 100.0 if mse == 0 else min(100.0, float(10 * np.log10(255.0 ** 2 / mse)))


def shape_name(h, w, b) -> str:
    return f"{h}x{w}_b{b}"


# ---------------------------------------------------------------------------------------------------- inputs
def prepare(work: Path, shapes, device, extra_sizes=()) -> Path:
    """Random real-size weights, and per size: tokens of a moving clip (through float16, as the wire), noise per
    pair (the official recipe, seed = pair index), float32 frames of those pairs (the quality reference), and a
    token blob of pair 0 for the handler. -> the weights folder."""
    from eden_dev.samples import moving_shapes
    weights = work / "weights"
    if not (weights / checkpoint.DITDEC_FILE).exists():
        ckpt = work / "eden_random.pt"
        checkpoint.make_random_checkpoint(ckpt, EdenConfig(), seed=0)
        checkpoint.split_checkpoint(ckpt, weights)
        ckpt.unlink()
        say("random real-size weights in", weights)
    enc = checkpoint.load_encoder(weights, device)
    gen = checkpoint.load_generator(weights, device)
    cfg = gen.cfg
    sizes = {}
    for h, w, b in shapes:
        sizes[(h, w)] = max(b, sizes.get((h, w), 0))
    for h, w in [(720, 1280), *extra_sizes]:  # 720p: a size the worker is not warmed for
        sizes.setdefault((h, w), 1)
    for (h, w), bmax in sizes.items():
        path, meta = work / f"inputs_{h}x{w}.pt", work / f"inputs_{h}x{w}.json"
        if path.exists() and meta.exists() and json.loads(meta.read_text()).get("batch", 0) >= bmax:
            continue
        clip = moving_shapes(bmax + 1, h, w, step=h / 40)
        x = torch.from_numpy(np.stack(clip)).to(device).permute(0, 3, 1, 2).float() / 255
        encoded, (diffs,) = pipeline.encode_frames(enc, x)
        geo = pipeline.Geometry.for_size(h, w, cfg)
        (blob,) = tokens.to_blobs(pipeline.EncodedFrames(encoded.dit[:2], encoded.dec[:2], encoded.mean[:2],
                                                         encoded.std[:2]), [diffs[:1]], geo, "float16",
                                  cfg.encoder_fingerprint)
        (work / f"blob_{h}x{w}.bin").write_bytes(blob.to_bytes())
        idx = torch.arange(bmax, device=device)
        pair = torch.stack([idx, idx + 1], dim=1)
        data = {"dit": encoded.dit.half()[pair].cpu(), "dec": encoded.dec.half()[pair].cpu(),
                "mean": encoded.mean[pair].cpu(), "std": encoded.std[pair].cpu(), "difference": diffs[:bmax].cpu(),
                "noise": torch.cat([pipeline.make_noise(geo, cfg.latent_dim, i, "cpu") for i in range(bmax)])}
        pairs = pairs_on(data, geo, bmax, device)
        with torch.inference_mode():
            ref = pipeline.interpolate(gen, pairs, data["noise"].to(device), torch.float32)
        data["reference_uint8"] = pipeline.to_uint8(ref)
        torch.save(data, path)
        meta.write_text(json.dumps({"batch": bmax}))
        del pairs, ref, x, encoded
        say(f"inputs and float32 reference for {h}x{w} (batch up to {bmax})")
    del enc, gen
    torch.cuda.empty_cache()
    return weights


def pairs_on(data: dict, geo, b: int, device) -> pipeline.PairBatch:
    return pipeline.PairBatch(data["dit"][:b].to(device).float(), data["dec"][:b].to(device).float(),
                              data["mean"][:b].to(device), data["std"][:b].to(device),
                              data["difference"][:b].to(device).float(), geo)


# ---------------------------------------------------------------------------------------------------- profile
def categorize(kernel: str, ops: list[str], ranges: list[str]) -> str:
    """A kernel's category from its name, the aten ops it was launched under (outermost first) and the ranges."""
    k = kernel.lower()
    chain = " ".join(ops).lower()  # every enclosing op (autocast's casts run inside aten::linear, copy_ in _to_copy)
    inner = ops[-1].lower() if ops else ""
    attention_kernel = any(s in k for s in ("flash", "fmha", "sdpa", "attention", "mem_eff"))
    if attention_kernel or "sdpa" in ranges or "scaled_dot_product" in chain:
        if "_to_copy" in chain:
            return "cast"
        if "cudnn" in k or "cudnn" in chain or "fprop" in k:
            return "attention:cudnn"
        if "flash" in k or "flash" in chain:
            return "attention:flash"
        if "fmha" in k or "cutlassf" in k or "efficient" in chain or "mem_eff" in k:
            return "attention:efficient"
        return "attention:math/other"
    if k.startswith("triton_"):
        if k.startswith("triton_tem"):
            return "gemm (triton)"
        return "fused pointwise (compiled)" if k.startswith("triton_poi") else "fused reduction/norm (compiled)"
    if "_to_copy" in chain:
        return "cast"
    if any(s in inner for s in ("::mm", "addmm", "bmm", "matmul", "linear")) or any(
            s in k for s in ("gemm", "xmma", "nvjet", "cublas", "gemv", "splitk", "cutlass", "sm90_", "sm80_")):
        return "gemm"
    if "layer_norm" in chain or "layer_norm" in k or "layernorm" in k:
        return "norm"
    if "softmax" in chain or "softmax" in k:
        return "softmax"
    if "upsample" in chain or "upsample" in k or "bicubic" in k:
        return "upsample"
    if any(s in chain for s in ("copy_", "::cat", "clone", "contiguous", "::stack", "reshape")) or "copy" in k \
            or "catarray" in k or "memcpy" in k:
        return "copy/layout"
    if "reduce" in k or any(s in inner for s in ("::sum", "::mean", "::std")):
        return "reduction"
    if "memset" in k or "fill" in k:
        return "fill"
    if "elementwise" in k or "vectorized" in k or "unrolled" in k:
        return "elementwise"
    return "other"


MODULE_RANGES = ("dit.context", "dit.head", "dit.block", "decoder.head", "decoder.context", "decoder.block")
SUB_RANGES = ("self_attn", "temporal_attn", "mlp")


def module_of(ranges: list[str]) -> str:
    outer = next((r for r in ranges if r in MODULE_RANGES), None)
    if outer is None:
        return "graph replay" if "graph" in ranges else "pipeline/other"
    inner = next((r for r in ranges if r in SUB_RANGES), None)
    return f"{outer}/{inner}" if inner else outer


def parse_trace(path: Path, frames: int) -> dict:
    """Chrome trace of a profiled window -> kernel ms per generated frame by category, module and kernel."""
    events = json.loads(path.read_text()).get("traceEvents", [])
    by_tid = defaultdict(list)  # CPU side: ranges, ops and launches per thread
    kernels = []
    for e in events:
        if e.get("ph") != "X":
            continue
        cat = e.get("cat", "")
        if cat in ("kernel", "gpu_memcpy", "gpu_memset"):
            kernels.append(e)
        elif cat in ("user_annotation", "cpu_op", "cuda_runtime", "cuda_driver"):
            by_tid[(e.get("pid"), e.get("tid"))].append(e)
    launch_ctx = {}  # correlation -> (ranges outermost first, innermost op)
    iter_spans = []
    for evs in by_tid.values():
        evs.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
        stack = []
        for e in evs:
            ts = e["ts"]
            while stack and stack[-1]["ts"] + stack[-1].get("dur", 0) < ts:
                stack.pop()
            cat = e.get("cat")
            if cat in ("cuda_runtime", "cuda_driver"):
                corr = (e.get("args") or {}).get("correlation")
                if corr is not None:
                    ranges = [s["name"] for s in stack if s.get("cat") == "user_annotation"]
                    ops = [s["name"] for s in stack if s.get("cat") == "cpu_op"]
                    if "graphlaunch" in e.get("name", "").lower():
                        ranges.append("graph")
                    launch_ctx[corr] = (ranges, ops)
                continue
            if cat == "user_annotation" and e["name"] == "eden.iter":
                iter_spans.append((ts, ts + e.get("dur", 0)))
            stack.append(e)
    by_cat, by_mod, by_kernel, attention = defaultdict(float), defaultdict(float), defaultdict(float), defaultdict(float)
    by_mod_cat = defaultdict(float)
    intervals = []
    for k in kernels:
        dur = k.get("dur", 0) / 1000.0  # ms
        ranges, ops = launch_ctx.get((k.get("args") or {}).get("correlation"), ([], []))
        name = k.get("name", "")
        cat = "memcpy/memset" if k.get("cat") != "kernel" else categorize(name, ops, ranges)
        mod = module_of(ranges)
        by_cat[cat] += dur
        by_mod[mod] += dur
        by_mod_cat[f"{mod} | {cat}"] += dur
        by_kernel[name[:120]] += dur
        if cat.startswith("attention"):
            attention[f"{mod} | {cat}"] += dur
        intervals.append((k["ts"], k["ts"] + k.get("dur", 0)))
    busy = 0.0
    if intervals and iter_spans:
        lo, hi = min(a for a, _ in iter_spans), max(b for _, b in iter_spans)
        end = lo
        for a, b in sorted(intervals):
            a, b = max(a, end, lo), min(b, hi)
            if b > a:
                busy += b - a
                end = b
        wall_ms = (hi - lo) / 1000.0
    else:
        wall_ms = 0.0

    def per_frame(d, top=None):
        items = sorted(d.items(), key=lambda kv: -kv[1])[:top]
        return {k: round(v / frames, 4) for k, v in items}

    total = sum(by_cat.values())
    return {"kernel_ms_per_frame": round(total / frames, 4),
            "profiled_wall_ms_per_frame": round(wall_ms / frames, 4) if wall_ms else None,
            "gpu_busy_share": round(busy / 1000.0 / wall_ms, 3) if wall_ms else None,
            "by_category": per_frame(by_cat), "by_module": per_frame(by_mod), "attention": per_frame(attention),
            "by_module_and_category": per_frame(by_mod_cat, 40), "top_kernels": per_frame(by_kernel, 15)}


def compiler_counters() -> dict:
    """What torch.compile did in this process: graphs compiled, graph breaks, recompilations (expected: 4 graphs, no
    breaks: DiT and decoder block, batch 1 and batch >= 2)."""
    try:
        from torch._dynamo.utils import counters
        return {"stats": dict(counters["stats"]), "graph_breaks": dict(counters["graph_break"]),
                "recompiles": dict(counters.get("recompiles", {}))}
    except Exception as e:  # noqa: BLE001
        return {"error": str(e)}


# ---------------------------------------------------------------------------------------------------- one variant
def run_variant(name: str, kernels: str, weights: Path, work: Path, shapes, device, profile: bool = True,
                stream_to=None) -> dict:
    """The core with ``kernels`` over every shape: timing, memory, quality, profile."""
    settings = KernelSettings.parse(kernels)
    out = {"kernels": settings.to_dict(), "shapes": {}}
    gen = checkpoint.load_generator(weights, device)
    cfg = gen.cfg
    t = time.perf_counter()
    accel = Accelerator(gen, settings, device, torch.bfloat16)
    out["setup_s"] = round(time.perf_counter() - t, 3)
    compiled = accel.compile_mode != "off"
    for h, w, b in shapes:
        key = shape_name(h, w, b)
        try:
            out["shapes"][key] = one_shape(accel, cfg, work, h, w, b, device, profile, compiled, f"{name}_{key}")
            r = out["shapes"][key]
            say(f"{name} {key}: {r['ms_per_frame']:.2f} ms/frame, first call {r['first_call_s']:.2f} s, "
                f"PSNR {r['psnr_db_vs_float32']:.1f} dB, kernels {r.get('profile', {}).get('kernel_ms_per_frame')} "
                f"ms/frame, busy {r.get('profile', {}).get('gpu_busy_share')}")
        except Exception as e:  # noqa: BLE001 - keep the other shapes
            out["shapes"][key] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
            say(f"{name} {key}: FAILED {type(e).__name__}: {e}")
            if isinstance(e, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
        out["compiler"] = compiler_counters()
        if stream_to:
            stream_to(out)
    del accel, gen
    torch.cuda.empty_cache()
    return out


@torch.inference_mode()
def one_shape(accel, cfg, work, h, w, b, device, profile, compiled, trace_name) -> dict:
    data = torch.load(work / f"inputs_{h}x{w}.pt")
    geo = pipeline.Geometry.for_size(h, w, cfg)
    pairs = pairs_on(data, geo, b, device)
    noise = data["noise"][:b].to(device)

    def call():
        return accel.interpolate(pairs, noise)

    cuda = device.type == "cuda"
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    frames = pipeline.to_uint8(call())  # compiles / captures on first use
    first = time.perf_counter() - t
    first_peak = torch.cuda.max_memory_allocated(device) if cuda else 0
    quality = float(np.mean([psnr(a, r) for a, r in zip(frames.numpy(), data["reference_uint8"][:b].numpy())]))
    t = time.perf_counter()
    call()
    sync(device)
    est = time.perf_counter() - t
    iters = int(min(30, max(3, 0.4 / max(est, 1e-4))))
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    ms = timed(call, iters, device) / iters / b
    t = time.perf_counter()
    for _ in range(2):
        pipeline.to_uint8(call())
    with_copy = (time.perf_counter() - t) / 2 / b * 1000
    row = {"ms_per_frame": round(ms, 3), "ms_per_frame_with_copy_out": round(with_copy, 3), "iters": iters,
           "first_call_s": round(first, 3), "psnr_db_vs_float32": round(quality, 2),
           "peak_gpu_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
           "peak_gpu_mem_gib_first_call": round(first_peak / 2**30, 2) if cuda else None,
           "gpu_mem_allocated_gib": round(torch.cuda.memory_allocated(device) / 2**30, 2) if cuda else None,
           "compile_mode": accel.compile_mode, "cuda_graphs": accel.graphs_on, "graph_error": accel.graph_error}
    if profile:
        row["profile"] = profile_shape(call, b, device, work / f"trace_{trace_name}.json")
    return row


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call, iters: int, device) -> float:
    """Milliseconds of ``iters`` calls: CUDA events on a GPU (the device's timeline, gaps included)."""
    if device.type != "cuda":
        t = time.perf_counter()
        for _ in range(iters):
            call()
        return (time.perf_counter() - t) * 1000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        call()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end)


def profile_shape(call, b, device, trace: Path, iters: int = 2) -> dict:
    from torch.profiler import ProfilerActivity, profile, record_function
    model.PROFILE_RANGES = True  # (inside compiled blocks there are none: a compiled block is one range)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        with profile(activities=activities) as prof:
            for _ in range(iters):
                with record_function("eden.iter"):
                    call()
                    sync(device)
        prof.export_chrome_trace(str(trace))
    finally:
        model.PROFILE_RANGES = False
    try:
        return parse_trace(trace, iters * b)
    finally:
        trace.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------- attention
@torch.inference_mode()
def attention_shapes(shapes, cfg, device) -> dict:
    """SDPA alone per backend for the model's two self-attention shapes (q as a slice of a qkv view, as in the
    model): ms per call, or why the backend refused."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    h, D = cfg.num_heads, cfg.hidden_dim
    out = {}
    for H, W, B in shapes:
        geo = pipeline.Geometry.for_size(H, W, cfg)
        N, n = geo.grid[0] * geo.grid[1], geo.latent_tokens
        for kind, (T, Tq) in {"dit_self": (n, n), "decoder_self": (N + n, N)}.items():
            qkv = torch.randn(B, T, 3, h, D // h, device=device, dtype=torch.bfloat16)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            q = q[:, :, :Tq]
            row = {}
            for name, be in backends.items():
                if name == "math" and B * h * Tq * T * 4 > 8 * 2**30:
                    row[name] = "skipped (score matrix over 8 GiB)"
                    continue
                try:
                    with sdpa_kernel([be]):
                        for _ in range(2):
                            torch.nn.functional.scaled_dot_product_attention(q, k, v)
                        torch.cuda.synchronize(device)
                        reps = 5
                        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        s.record()
                        for _ in range(reps):
                            torch.nn.functional.scaled_dot_product_attention(q, k, v)
                        e.record()
                        torch.cuda.synchronize(device)
                    ms = s.elapsed_time(e) / reps
                    flops = 4 * B * h * Tq * T * (D // h)
                    row[name] = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)}
                except Exception as ex:  # noqa: BLE001
                    row[name] = f"refused: {type(ex).__name__}: {str(ex)[:160]}"
            out[f"{shape_name(H, W, B)}/{kind} (q {Tq}, kv {T})"] = row
            del qkv, q, k, v
    torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------------- worker start
def worker_start(weights: Path, work: Path, kernels: str, cache_dir: str, sizes: list[str], batch: int,
                 stream=lambda result: None) -> dict:
    """DitDecService as TorchServe starts it (initialize: load + compile + warm-up), then requests: the first at a
    warmed size, again, and one at a size it was not warmed for."""
    from eden_serve import images
    from eden_serve.serving import DitDecService
    eden = {**KernelSettings.parse(kernels).to_dict(), "warmup_sizes": sizes, "compile_cache_dir": cache_dir,
            "shm_dir": "", "fast_socket_reads": False}
    ctx = HandlerContext(weights, eden, gpu_id=0, batch_size=batch)
    svc = DitDecService()
    t = time.perf_counter()
    svc.initialize(ctx)
    out = {"initialize_s": round(time.perf_counter() - t, 3), "kernels_active": svc.accel.active,
           "compile_mode": svc.accel.compile_mode, "settings": eden,
           "warmup": getattr(getattr(svc, "warmup", None), "seconds", None)}
    say(f"worker initialized in {out['initialize_s']} s (accelerated: {svc.accel.active})")
    stream(out)
    for label, size in (("first_request", sizes[-1]), ("second_request", sizes[-1]),
                        ("first_request_unwarmed_720x1280", "720x1280")):
        try:
            body = (work / f"blob_{size}.bin").read_bytes()
            ctx.headers = [{"X-Eden-Seed": "0", "X-Eden-Format": "raw"}]
            ctx.status = {}
            t = time.perf_counter()
            (answer,) = svc.handle([{"body": body}], ctx)
            seconds = time.perf_counter() - t
            row = {"size": size, "s": round(seconds, 4), "status": ctx.status.get(0, 200)}
            if row["status"] == 200:
                frame = images.decode_image(bytes(answer), 10**9)
                ref = torch.load(work / f"inputs_{size}.pt")["reference_uint8"][0].numpy()
                row["psnr_db_vs_float32"] = round(psnr(frame, ref), 2)
            else:
                row["answer"] = bytes(answer)[:300].decode(errors="replace")
        except Exception as e:  # noqa: BLE001
            row = {"size": size, "error": f"{type(e).__name__}: {e}"}
        out[label] = row
        out["compiler"] = compiler_counters()
        say(f"worker {label} at {size}: {row}")
        stream(out)
    return out


# ---------------------------------------------------------------------------------------------------- child
def child(args) -> None:
    """One compiled variant or one worker start, in a fresh process; writes its JSON to --out."""
    import logging
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"[{args.child}] %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("eden_serve").addHandler(handler)
    logging.getLogger("eden_serve").setLevel(logging.INFO)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")  # (CPU: a dry run)
    acceleration.use_compile_cache(args.cache_dir)
    weights, work = Path(args.workdir) / "weights", Path(args.workdir)
    out = Path(args.out)

    def stream(result):
        out.write_text(json.dumps(result, indent=1, default=str))

    if args.child == "worker":
        stream(worker_start(weights, work, args.kernels, args.cache_dir, args.worker_sizes.split(","),
                            args.worker_batch, stream))
    else:
        shapes = [tuple(int(v) for v in s.replace("_b", "x").split("x")) for s in args.shapes.split(",")]
        run_variant(args.child, args.kernels, weights, work, shapes, device, profile=True, stream_to=stream)


def run_child(kind: str, kernels: str, args, timeout_s: float, extra: list[str]) -> dict:
    out = Path(args.workdir) / f"child_{kind}_{int(time.time() * 1000)}.json"
    err = out.with_suffix(".stderr")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--kernels", kernels, "--out", str(out),
           "--workdir", args.workdir, "--cache-dir", args.cache_dir, *extra]
    say(f"subprocess {kind} ({kernels}), time limit {timeout_s:.0f} s")
    t = time.perf_counter()
    env = {**os.environ, "EDEN_BENCH_START": str(T0)}
    try:
        with open(err, "w") as stderr:  # its progress goes straight to our stdout
            r = subprocess.run(cmd, timeout=max(timeout_s, 1), stdout=None, stderr=stderr, cwd=ROOT, env=env)
        status = {"returncode": r.returncode}
    except subprocess.TimeoutExpired:
        status = {"timed_out_after_s": round(timeout_s)}
    tail = err.read_text(errors="replace")[-4000:] if err.exists() else ""
    if status.get("returncode") or "timed_out_after_s" in status or "Traceback" in tail or "ERROR" in tail:
        status["stderr_tail"] = tail
    try:
        result = json.loads(out.read_text()) if out.exists() else {}
    except ValueError:  # killed while writing
        result = {"error": "the subprocess' JSON is incomplete"}
    result["process"] = {**status, "wall_s": round(time.perf_counter() - t, 1)}
    say(f"subprocess {kind} done: {result['process']}")
    return result


# ---------------------------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="build/kernels/kernels.json")
    ap.add_argument("--workdir", default="/tmp/eden_kernels")
    ap.add_argument("--cache-dir", default="/tmp/eden_kernels/compile_cache",
                    help="persistent compile cache; emptied at the start unless --keep-cache (cold start measured)")
    ap.add_argument("--keep-cache", action="store_true")
    ap.add_argument("--quick", action="store_true", help="480p and 1080p only, fewer variants")
    ap.add_argument("--shapes-only", default="", metavar="HxW_bB,...",
                    help="measure these shapes only, e.g. 2160x3840_b1,2160x3840_b2 (default: all, or --quick's)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="no new variant starts after this many seconds")
    ap.add_argument("--variants", default="", help="comma list of variant names to run (default: all, by priority)")
    ap.add_argument("--worker-kernels", default=WORKER_KERNELS, help="kernel settings of the worker-start runs")
    ap.add_argument("--worker-sizes", default="480x854,1080x1920", help="warm-up sizes of the worker-start runs")
    ap.add_argument("--worker-batch", type=int, default=4, help="batchSize of the worker-start runs")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--cpu-dry-run", default="", metavar="WEIGHTS_DIR",
                    help="run the orchestration on a CPU with these (small) split weights")
    # internal: one subprocess' job
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--kernels", default="", help=argparse.SUPPRESS)
    ap.add_argument("--shapes", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes_only:
        shapes = [tuple(int(v) for v in t.strip().replace("_b", "x").split("x")) for t in args.shapes_only.split(",")]
    if args.cpu_dry_run:  # the orchestration on a CPU with small weights: nothing is accelerated there
        device, shapes = torch.device("cpu"), [(64, 96, 1), (64, 96, 2)]
        args.worker_sizes = "64x96"
        if not (work / "weights").exists():
            shutil.copytree(args.cpu_dry_run, work / "weights")
    elif not torch.cuda.is_available():
        raise SystemExit("bench/kernels.py needs a CUDA GPU")
    else:
        device = torch.device("cuda", 0)
    if not args.keep_cache:
        shutil.rmtree(args.cache_dir, ignore_errors=True)
    Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
    shapes_arg = ",".join(shape_name(*s) for s in shapes)
    chosen = set(filter(None, args.variants.split(",")))
    summary = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
               "torch": torch.__version__,
               "triton": acceleration.compile_supported(device), "cudnn": torch.backends.cudnn.version(),
               "c_compiler": shutil.which("gcc") or shutil.which("cc"),  # Triton builds its launchers with one
               "quick": args.quick, "shapes": [shape_name(*s) for s in shapes], "variants": {}, "skipped": {}}

    def save():
        summary["elapsed_s"] = round(time.time() - T0, 1)
        out.write_text(json.dumps(summary, indent=1, default=str))

    def wanted(name: str, quick_set) -> bool:
        if chosen:
            return name in chosen
        return not args.quick or name in quick_set

    def budget_left() -> float:
        return args.budget_s - (time.time() - T0)

    say(f"{summary['device']}, torch {torch.__version__}, triton {summary['triton']}, shapes {summary['shapes']}")
    weights = prepare(work, shapes, device, [limits.parse_size(s) for s in args.worker_sizes.split(",")])
    cfg = checkpoint.load_config(weights)
    save()

    def eager(name: str) -> None:
        if not wanted(name, QUICK_EAGER):
            return
        if budget_left() <= 0:
            summary["skipped"][name] = "time budget spent"
            return
        say(f"variant {name} ({EAGER_VARIANTS[name] or 'today'})")
        try:
            summary["variants"][name] = run_variant(
                name, EAGER_VARIANTS[name], weights, work, shapes, device, profile=not args.no_profile,
                stream_to=lambda r: (summary["variants"].__setitem__(name, r), save()))
        except Exception as e:  # noqa: BLE001
            summary["variants"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            say(f"variant {name} FAILED: {e}")
        save()

    def compiled(name: str, kernels: str, cap_s: float) -> None:
        if not wanted(name, QUICK_COMPILED):
            return
        if budget_left() <= 20:
            summary["skipped"][name] = "time budget spent"
            return
        torch.cuda.empty_cache()
        summary["variants"][name] = run_child(name, kernels, args, min(cap_s, budget_left() + 40),
                                              ["--shapes", shapes_arg])
        save()

    def worker(label: str) -> None:
        if chosen and "worker_start" not in chosen:
            return
        if budget_left() <= 20:
            summary["skipped"][label] = "time budget spent"
            return
        torch.cuda.empty_cache()
        summary[label] = run_child("worker", args.worker_kernels, args, min(300, budget_left() + 60),
                                   ["--worker-sizes", args.worker_sizes, "--worker-batch", str(args.worker_batch)])
        save()

    eager("baseline")
    if wanted("attention_shapes", ("attention_shapes",)):
        try:
            summary["attention_shapes"] = attention_shapes(shapes, cfg, device)
            say("attention per shape and backend:", json.dumps(summary["attention_shapes"], indent=1))
        except Exception as e:  # noqa: BLE001
            summary["attention_shapes"] = {"error": f"{type(e).__name__}: {e}"}
        save()
    worker("worker_start_cold_cache")
    worker("worker_start_warm_cache")
    compiled("compile_combined", COMPILED_VARIANTS["compile_combined"], 180)
    eager("sdpa_cudnn")
    eager("cuda_graphs")
    compiled("compile", COMPILED_VARIANTS["compile"], 150)
    eager("cast_weights")
    compiled("compile_combined_cudnn", COMPILED_VARIANTS["compile_combined_cudnn"], 150)
    eager("sdpa_flash")
    eager("eager_combined")
    compiled("compile_fused", COMPILED_VARIANTS["compile_fused"], 120)
    eager("sdpa_efficient")
    compiled("compile_graphs", COMPILED_VARIANTS["compile_graphs"], 120)
    compiled("compile_combined_float8", COMPILED_VARIANTS["compile_combined_float8"], 150)
    if not args.quick:
        compiled("max_autotune_combined", COMPILED_VARIANTS["max_autotune_combined"], 200)
    save()
    try:
        print_table(summary)
    except Exception:  # noqa: BLE001 - the JSON is what counts
        traceback.print_exc()
    say("wrote", out)


def print_table(summary: dict) -> None:
    print(f"\n{'variant':>24} {'shape':>16} {'ms/frame':>9} {'kernel ms':>9} {'busy':>5} {'first s':>8} "
          f"{'PSNR':>6} {'GiB':>6}", flush=True)
    for name, v in summary["variants"].items():
        for shape, r in (v.get("shapes") or {}).items():
            if "error" in r:
                print(f"{name:>24} {shape:>16} error: {r['error'][:60]}")
                continue
            p = r.get("profile") or {}
            print(f"{name:>24} {shape:>16} {r['ms_per_frame']:9.2f} {p.get('kernel_ms_per_frame') or 0:9.2f} "
                  f"{p.get('gpu_busy_share') or 0:5.2f} {r['first_call_s']:8.2f} {r['psnr_db_vs_float32']:6.1f} "
                  f"{r.get('peak_gpu_mem_gib') or 0:6.1f}")
    for label in ("worker_start_cold_cache", "worker_start_warm_cache"):
        w = summary.get(label)
        if w:
            print(f"{label}: initialize {w.get('initialize_s')} s, first request {w.get('first_request')}, "
                  f"unwarmed size {w.get('first_request_unwarmed_720x1280')}", flush=True)


if __name__ == "__main__":
    main()

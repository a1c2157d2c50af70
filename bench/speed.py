"""Issue 5's benchmark, one command on the GPU host (2 GPUs: encoder on 0, DiT+decoder on 1):

    python bench/speed.py [--checkpoint eden.pt] [--sizes 480x854,1080x1920] [--frames 41,21] [--out DIR]

For each size, over one generated clip (frames already in memory), in the same run:
  (a) reference  bench/reference.py: the official inference.py loop (monolithic model, float32, batch 1, cuda:0);
  (b) fast       the eden_serve core in process on cuda:0: each frame encoded once, pairs batched, bf16 autocast;
  (c) deployed   client -> TorchServe eden_encoder (GPU 0) -> TorchServe eden_ditdec (GPU 1) through the video
                 client's scheduler (eden_client.video.Interpolator): "shm" = shared-memory transport with the tokens
                 handed off GPU to GPU (the default), "shm_host" = the same with the token bytes through tmpfs,
                 "http" = the inline HTTP transport (at --http-sizes only); the sink writes raw RGB frames to a file.
Reports seconds per generated frame (wall clock / frames the model made), the ratio to (a), PSNR of (b) and (c)
against (a) with the same seeds, GPU utilisation during (c), and a per-stage breakdown of (c): handler stages from
the X-Eden-Stages answers (encode, serialize, denoise, decode, png, and "transfer": the token copies inside serialize
and parse), request round trips, and what is left of them (transport and queueing). Writes summary.json to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "archive_scripts"), str(ROOT / "bench")]

from build_archives import build, handler_settings, kernel_settings  # noqa: E402
from eden_serve.archives import DEFAULT_PROFILE, ENCODER_BATCH_SIZE, PROFILES  # noqa: E402
from reference import load_reference, time_clip  # noqa: E402

from eden_client.api import EdenClient  # noqa: E402
from eden_client.frames_io import Frame  # noqa: E402
from eden_client.keys import KeySource  # noqa: E402
from eden_client.video import Interpolator, frame_seed  # noqa: E402
from eden_dev.launcher import TorchServe  # noqa: E402
from eden_dev.samples import moving_shapes  # noqa: E402
from eden_serve import acceleration, checkpoint, pipeline  # noqa: E402
from eden_serve.config import EdenConfig  # noqa: E402

SEED = 0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def mean_psnr(frames: list, reference: list) -> float:
    return float(np.mean([min(psnr(a, b), 100.0) for a, b in zip(frames, reference)]))


class GpuSampler:
    """nvidia-smi utilisation samples per GPU while running."""

    def __init__(self, period_ms: int = 100):
        self.cmd = ["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits",
                    f"-lms={period_ms}"]

    def __enter__(self):
        self.samples = defaultdict(list)
        if not shutil.which("nvidia-smi"):
            self.proc = None
            return self
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            try:
                idx, util = (int(x) for x in line.split(","))
                self.samples[idx].append(util)
            except ValueError:
                pass

    def __exit__(self, *exc):
        if self.proc:
            self.proc.terminate()
            self.proc.wait()

    def mean(self) -> dict:
        return {f"gpu{i}": round(statistics.mean(v), 1) for i, v in sorted(self.samples.items()) if v}


def serve_pids(management_url: str, key_file: Path) -> dict:
    """TorchServe's processes by role: each model's workers (from the management API) and the frontend (their
    parent), for CpuSampler."""
    import requests
    key = json.loads(Path(key_file).read_text())["management"]["key"]
    pids: dict = {}
    for name in ("eden_encoder", "eden_ditdec"):
        try:
            r = requests.get(f"{management_url}/models/{name}", headers={"Authorization": f"Bearer {key}"}, timeout=5)
            pids[name] = [int(w["pid"]) for w in r.json()[0]["workers"] if w.get("pid")] if r.ok else []
        except (requests.RequestException, ValueError, KeyError, IndexError):
            pids[name] = []
    workers = pids["eden_encoder"] + pids["eden_ditdec"]
    try:
        pids["frontend"] = [psutil.Process(workers[0]).ppid()] if workers else []
    except psutil.Error:
        pids["frontend"] = []
    return pids


class CpuSampler:
    """CPU time spent while running, as cores kept busy on average: the cores this process may use (all of their
    users), this process, its children waited for meanwhile (a CLI run as a subprocess), and named groups of other
    processes (``groups()`` -> name -> pids, read at the start: TorchServe's frontend and each model's workers)."""

    def __init__(self, groups=None):
        self.groups = groups

    @staticmethod
    def _busy(times) -> float:
        return sum(times) - times.idle - getattr(times, "iowait", 0.0)

    @staticmethod
    def _cpu(pid: int) -> float:
        try:
            t = psutil.Process(pid).cpu_times()
            return t.user + t.system
        except psutil.Error:
            return float("nan")

    def _host(self) -> float:
        per_cpu = psutil.cpu_times(percpu=True)
        return sum(self._busy(per_cpu[c]) for c in self.cpus if c < len(per_cpu))

    def __enter__(self):
        self.cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            list(range(psutil.cpu_count()))
        self.pids = self.groups() if self.groups else {}
        self.start = {name: sum(self._cpu(p) for p in pids) for name, pids in self.pids.items()}
        self.t0, self.host0, self.me0 = time.perf_counter(), self._host(), os.times()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        me = os.times()
        self.wall = wall
        self.result = {"cores_of_this_process": len(self.cpus),
                       "host_busy": round((self._host() - self.host0) / wall, 2),
                       "this_process": round((me.user + me.system - self.me0.user - self.me0.system) / wall, 2),
                       "children": round((me.children_user + me.children_system - self.me0.children_user
                                          - self.me0.children_system) / wall, 2)}
        for name, pids in self.pids.items():
            self.result[name] = round((sum(self._cpu(p) for p in pids) - self.start[name]) / wall, 2)

    def cores(self) -> dict:
        """Cores kept busy on average by each (host_busy: every process on this process's cores)."""
        return self.result


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def run_reference(sd, cfg, clip, device) -> tuple[float, list]:
    model = load_reference(sd, cfg, device)
    geo = pipeline.Geometry.for_size(*clip[0].shape[:2], cfg)
    seconds, out = time_clip(model, clip, lambda i: pipeline.make_noise(geo, cfg.latent_dim,
                                                                         frame_seed(SEED, 2 * i + 1), device), device)
    del model
    return seconds, out


def run_fast(weights, clip, device, batch: int = 4, chunk: int = 8, kernels: dict | None = None) -> tuple[float, list]:
    """The serving code in this process (no TorchServe): ``kernels`` as the archives get them (kernel_settings)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    enc = checkpoint.load_encoder(weights, device)
    gen = checkpoint.load_generator(weights, device)
    cfg = gen.cfg
    H, W = clip[0].shape[:2]
    geo = pipeline.Geometry.for_size(H, W, cfg)
    accel = acceleration.Accelerator(gen, acceleration.KernelSettings.from_mapping(kernels or {}), device, dtype)
    accel.warm_up([(H, W)], sorted({batch, (len(clip) - 1) % batch or batch}))  # as a worker does at start

    def go():
        dit, dec, mean, std, diffs = [], [], [], [], []
        for s in range(0, len(clip), chunk):  # each frame once; differences across chunk boundaries computed here
            x = torch.from_numpy(np.stack(clip[s:s + chunk])).to(device).permute(0, 3, 1, 2).float() / 255
            e, (d,) = pipeline.encode_frames(enc, x)
            if dit:
                prev = torch.from_numpy(clip[s - 1]).to(device).permute(2, 0, 1)[None].float() / 255
                diffs.append(pipeline.frame_difference(prev, x[:1], cfg).flatten())
            dit.append(e.dit.half())
            dec.append(e.dec.half())
            mean.append(e.mean)
            std.append(e.std)
            diffs.append(d)
        dit, dec, mean, std, diffs = (torch.cat(v) for v in (dit, dec, mean, std, diffs))
        frames = []
        for s in range(0, len(clip) - 1, batch):
            idx = torch.arange(s, min(s + batch, len(clip) - 1), device=device)
            pair = torch.stack([idx, idx + 1], dim=1)  # [B, 2]
            pairs = pipeline.PairBatch(dit[pair].float(), dec[pair].float(), mean[pair], std[pair], diffs[idx], geo)
            noise = torch.cat([pipeline.make_noise(geo, cfg.latent_dim, frame_seed(SEED, 2 * int(i) + 1), device)
                               for i in idx.tolist()])
            frames.append(pipeline.to_uint8(accel.interpolate(pairs, noise)))
        return [f for batch_frames in frames for f in batch_frames.numpy()]

    go()  # warm-up (kernels, position embeddings)
    sync(device)
    t = time.perf_counter()
    out = go()
    seconds = time.perf_counter() - t
    del enc, gen
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds / (len(clip) - 1), out


def in_flight(timeline: list, start: float, end: float) -> dict:
    """Mean number of requests of each kind in flight over [start, end], and the share of that time with no
    DiT+decoder request in flight (the GPU 1 side starved)."""
    out = {}
    for kind in ("encode", "generate"):
        spans = [(a, b) for k, a, b in timeline if k == kind]
        out[f"mean_{kind}"] = round(sum(min(b, end) - max(a, start) for a, b in spans if b > start and a < end)
                                    / (end - start), 2)
    events = sorted([(a, 1) for k, a, b in timeline if k == "generate"] +
                    [(b, -1) for k, a, b in timeline if k == "generate"])
    idle, level, last = 0.0, 0, start
    for t, step in events:
        if level == 0 and t > last:
            idle += min(t, end) - max(last, start) if t > start else 0
        level += step
        last = t
    if level == 0 and end > last:
        idle += end - max(last, start)
    out["share_without_generate"] = round(idle / (end - start), 3)
    return out


def run_deployed(ts: TorchServe, clip, transport: str, sink: Path, max_inflight: int | None = None,
                 chunk: int | None = None, handoff: str = "device", encoder_inflight: int | None = None,
                 token_dtype: str = "float16", window: int | None = None) -> dict:
    """None: the client's default for the transport (eden_client/video.py default_schedule)."""
    client = EdenClient.connect(ts.inference_url, encoder_keys=KeySource(key_file=ts.key_file), transport=transport,
                                shm_dir="/dev/shm/eden", handoff=handoff)
    calls = defaultdict(list)
    stages = defaultdict(list)

    timeline = []

    def observe(kind, seconds, r):
        calls[kind].append(seconds)
        timeline.append((kind, time.perf_counter() - seconds, time.perf_counter()))
        for item in filter(None, r.headers.get("X-Eden-Stages", "").split(",")):
            name, ms = item.split("=")
            stages[f"{kind}_{name}"].append(float(ms) / 1000 / int(r.headers.get("X-Eden-Batch", 1)))

    client.observe = observe
    frames = [Frame(image, pts=i, duration=1) for i, image in enumerate(clip)]
    generated = {}
    write_time = [0.0]
    first_frame = [0.0]

    with open(sink, "wb") as f:
        def write(image, pts, duration):
            t = time.perf_counter()
            f.write(memoryview(np.ascontiguousarray(image)).cast("B"))
            write_time[0] += time.perf_counter() - t
            if pts % 2:
                generated[pts] = image
                first_frame[0] = first_frame[0] or time.perf_counter()

        interp = Interpolator(client, factor=2, seed=SEED, max_inflight=max_inflight, chunk=chunk,
                              encoder_inflight=encoder_inflight, token_dtype=token_dtype, window=window)
        # warm-up: enough pairs for every worker to see the size; over HTTP the whole clip, since TorchServe's
        # frontend (Java) moves large bodies several times slower in its first minute than once warm. The frames
        # are mirrored: the DiT+decoder's frame cache must not hold the measured run's frames (until session 5 it
        # did, and every frame of the measured HTTP run was a cache hit)
        warm = [Frame(np.ascontiguousarray(f.image[:, ::-1]), f.pts, f.duration) for f in frames]
        interp.fit(warm[0].image)  # (the chunk this size gets, for the warm-up's length)
        interp.run(warm if transport == "http" else warm[:4 * interp.chunk + 1], lambda *a: None)
        calls.clear()
        stages.clear()
        with GpuSampler() as gpu, CpuSampler(lambda: serve_pids(ts.management_url, ts.key_file)) as cpu:
            t = time.perf_counter()
            stats = interp.run(frames, write)
            seconds = time.perf_counter() - t
    n = len(clip) - 1
    per_frame = {f"handler_{k}": sum(v) / n for k, v in stages.items()}
    occupancy = in_flight(timeline, t, t + seconds)
    per_frame.update({f"roundtrip_{k}": sum(v) / n for k, v in calls.items()})
    per_frame["write"] = write_time[0] / n
    enc_stage = sum(v for k, v in per_frame.items() if k.startswith("handler_encode_"))
    gen_stage = sum(v for k, v in per_frame.items() if k.startswith("handler_generate_"))
    per_frame["transport_and_queue_encode"] = per_frame.get("roundtrip_encode", 0) - enc_stage
    per_frame["transport_and_queue_generate"] = per_frame.get("roundtrip_generate", 0) - gen_stage
    # token transport: the encoder writing tokens out (device copy into the segment or the body) and the
    # DiT+decoder reading them in (references, upload, checks), against all the serving work of both models
    moving = per_frame.get("handler_encode_serialize", 0) + per_frame.get("handler_generate_parse", 0)
    # the copies themselves (handler "transfer": export or copy out in the encoder, import or upload in the
    # DiT+decoder); on the encoder side they overlap the DiT+decoder's GPU work (another GPU), on the DiT+decoder
    # side they are its own time
    copies = per_frame.get("handler_encode_transfer", 0) + per_frame.get("handler_generate_transfer", 0)
    wall = seconds / n
    token_transport = {"stages_s_per_frame (serialize + parse)": moving,
                       "transfer_s_per_frame (encoder out + ditdec in)": copies,
                       "ditdec_transfer_s_per_frame": per_frame.get("handler_generate_transfer", 0),
                       "serving_work_s_per_frame": enc_stage + gen_stage,
                       "stages_share_of_serving_work": moving / max(enc_stage + gen_stage, 1e-9),
                       "stages_share_of_wall": moving / wall,
                       "transfer_share_of_wall": copies / wall}
    return {"seconds_per_generated_frame": seconds / n, "wall_s": seconds, "gpu_util_percent": gpu.mean(),
            "cpu_cores_busy": cpu.cores(), "requests_in_flight": occupancy, "first_frame_s": first_frame[0] - t if first_frame[0] else None,
            "token_transport": token_transport,
            "per_generated_frame_s (request times overlap: sums exceed the wall clock)": per_frame,
            "client_stats": stats.as_dict(), "frames": [generated[k] for k in sorted(generated)]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--sizes", default="480x854,1080x1920")
    ap.add_argument("--frames", default="81,41", help="clip length per size")
    ap.add_argument("--out", default="build/speed")
    ap.add_argument("--workdir", default="/tmp/eden_speed")
    ap.add_argument("--batch-size", type=int, default=4,
                    help="TorchServe batchSize of the DiT+decoder (as build_archives.py)")
    ap.add_argument("--encoder-batch-size", type=int, default=ENCODER_BATCH_SIZE,
                    help="the encoder's batchSize (default: build_archives.py's, %(default)s; runs up to session 10 "
                         "used --batch-size for both)")
    ap.add_argument("--max-batch-delay", type=int, default=10,
                    help="TorchServe maxBatchDelay in ms (default: build_archives.py's, %(default)s; every run up "
                         "to session 9 used 5)")
    ap.add_argument("--workers", type=int, default=None,
                    help="workers per model in all (default: build_archives.py's, two per model and GPU: a second one "
                         "overlaps its host work with the first's GPU work)")
    ap.add_argument("--profile", default=DEFAULT_PROFILE, choices=PROFILES,
                    help="GPU placement on 2+ GPUs (build_archives.py --profile; default: %(default)s)")
    ap.add_argument("--max-inflight", type=int, default=None,
                    help="DiT+decoder requests the client keeps in flight (default: the client's for the transport)")
    ap.add_argument("--chunk", type=int, default=None, help="frames per encoder request (default: the client's)")
    ap.add_argument("--encoder-inflight", type=int, default=None,
                    help="encoder requests the client keeps in flight (default: the client's)")
    ap.add_argument("--window", type=int, default=None,
                    help="input pairs the client keeps open at once (default: the client's)")
    ap.add_argument("--variants", default="",
                    help="extra runs, comma list of [TRANSPORT@]CHUNK:INFLIGHT[:ENCODER_INFLIGHT[:WINDOW]][/DTYPE], "
                         "TRANSPORT "
                         "one of shm (default), shm_host, http, a number '-' for the client's default, DTYPE the "
                         "tokens' (default float16) (e.g. 8:32,http@4:16:4,http@-:-:-/int8)")
    ap.add_argument("--kernels", default="auto",
                    help="DiT+decoder GPU kernels for the in-process run and the archives: auto (default, as "
                         "build_archives.py), off, or e.g. compile_mode=default,cuda_graphs=1,attention_backend=cudnn,"
                         "cast_weights=1 (eden_serve/acceleration.py; warmup_sizes defaults to the sizes measured)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="a handler setting for both archives, as build_archives.py --set (e.g. gpu_wait=spin)")
    ap.add_argument("--skip", default="", help="comma list of stages to skip: reference,fast,shm,shm_host,http")
    ap.add_argument("--http-sizes", default="480x854",
                    help="sizes the inline HTTP transport runs at ('all'; at 1080p it takes about 2 s a frame)")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = Path(args.checkpoint).resolve() if args.checkpoint else work / "eden_random.pt"
    if not args.checkpoint and not ckpt.exists():
        checkpoint.make_random_checkpoint(ckpt, EdenConfig(), seed=0)
    cfg = checkpoint.split_checkpoint(ckpt, work / "weights")
    sd = checkpoint.read_official_checkpoint(ckpt)
    gpus = torch.cuda.device_count()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    kernels = kernel_settings(args.kernels, gpus)
    if kernels and args.kernels != "auto":
        kernels.setdefault("warmup_sizes", [f"{h}x{w}" for h, w in sizes])
    build(work / "weights", work / "store", gpus=gpus, batch_size=args.batch_size,
          max_batch_delay_ms=args.max_batch_delay, workers=args.workers, kernels=kernels, profile=args.profile,
          settings=handler_settings(args.set), encoder_batch_size=args.encoder_batch_size)
    dev = torch.device("cuda", 0) if gpus else torch.device("cpu")
    summary = {"device": [torch.cuda.get_device_name(i) for i in range(gpus)] or ["cpu"], "torch": torch.__version__,
               "workers_per_model": args.workers or "build_archives.py default (2 per GPU)", "profile": args.profile,
               "batch_size": args.batch_size, "encoder_batch_size": args.encoder_batch_size,
               "max_batch_delay_ms": args.max_batch_delay, "settings": args.set,
               "checkpoint": "random real-size" if not args.checkpoint else str(ckpt), "kernels": kernels, "sizes": {}}
    lengths = [int(v) for v in args.frames.split(",")]

    def save():
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))

    with TorchServe(work / "serve", work / "store") as ts:
        for (H, W), n in zip(sizes, lengths):
            clip = moving_shapes(n, H, W, step=H / 40)
            row: dict = {"frames_in": n, "generated": n - 1}
            summary["sizes"][f"{H}x{W}"] = row  # (written after every run: a run cut short keeps the others)
            ref_s, ref_frames = (None, None) if "reference" in skip else run_reference(sd, cfg, clip, dev)
            if ref_s:
                row["reference_s_per_frame"] = ref_s
            print(f"{H}x{W} reference: {ref_s}", flush=True)
            if "fast" not in skip:
                fast_s, fast_frames = run_fast(work / "weights", clip, dev, kernels=kernels)
                row["fast_s_per_frame"] = fast_s
                if ref_s:
                    row["fast_speedup"] = ref_s / fast_s
                    row["fast_psnr_db"] = mean_psnr(fast_frames, ref_frames)
                print(f"{H}x{W} fast: {fast_s}", flush=True)

            def runs_here(transport: str) -> bool:
                return transport != "http" or args.http_sizes == "all" or f"{H}x{W}" in args.http_sizes.split(",")

            def deployed(transport: str, sink: Path, chunk, inflight, enc_inflight, dtype="float16",
                         window=None) -> dict:
                """transport: shm (tokens handed off GPU to GPU), shm_host (tokens via tmpfs) or http."""
                return run_deployed(ts, clip, transport.split("_")[0], sink, inflight, chunk,
                                    "host" if transport == "shm_host" else "device", enc_inflight, dtype, window)

            for transport in ("shm", "shm_host", "http"):
                if transport in skip or not runs_here(transport):
                    continue
                d = deployed(transport, work / f"out_{transport}.rgb", args.chunk, args.max_inflight,
                             args.encoder_inflight, window=args.window)
                frames = d.pop("frames")
                if ref_s:
                    d["speedup"] = ref_s / d["seconds_per_generated_frame"]
                    d["psnr_db"] = mean_psnr(frames, ref_frames)
                row[f"deployed_{transport}"] = d
                print(f"{H}x{W} deployed {transport}: {d['seconds_per_generated_frame']}", flush=True)
            for variant in filter(None, args.variants.split(",")):
                transport, _, numbers = variant.rpartition("@")
                transport = transport or "shm"
                if not runs_here(transport):
                    continue
                numbers, _, dtype = numbers.partition("/")
                given = [None if v == "-" else int(v) for v in numbers.split(":")]
                defaults = [None, None, args.encoder_inflight, args.window]  # (the last two may be left out)
                chunk, inflight, enc_inflight, window = given + defaults[len(given):]
                d = deployed(transport, work / "out_variant.rgb", chunk, inflight, enc_inflight, dtype or "float16",
                             window)
                d.pop("frames")
                s = d["client_stats"]["schedule"]
                name = (f"variant_{transport}_chunk{s['chunk']}_inflight{s['max_inflight']}_encoder"
                        f"{s['encoder_inflight']}_window{s['window']}" + (f"_{dtype}" if dtype else ""))
                row[name] = d  # the stage breakdown and the client's stats included
                if ref_s:
                    row[name]["speedup"] = ref_s / d["seconds_per_generated_frame"]
                print(f"{H}x{W} {name}: {d['seconds_per_generated_frame']}", flush=True)
                save()
            save()
    print(json.dumps(summary, indent=1, default=float))
    print_table(summary)


def print_table(summary: dict) -> None:
    print(f"\n{'size':>10} {'path':>14} {'s/frame':>9} {'x ref':>7} {'PSNR':>7} {'token copies/wall':>18}")
    for size, row in summary["sizes"].items():
        ref = row.get("reference_s_per_frame")
        print(f"{size:>10} {'reference':>14} {ref or float('nan'):9.4f} {1.0:7.2f} {'':>7}")
        if "fast_s_per_frame" in row:
            print(f"{size:>10} {'fast (in proc)':>14} {row['fast_s_per_frame']:9.4f} "
                  f"{row.get('fast_speedup', float('nan')):7.2f} {row.get('fast_psnr_db', float('nan')):7.2f}")
        for t in ("shm", "shm_host", "http"):
            d = row.get(f"deployed_{t}")
            if d:
                print(f"{size:>10} {'deployed ' + t:>14} {d['seconds_per_generated_frame']:9.4f} "
                      f"{d.get('speedup', float('nan')):7.2f} {d.get('psnr_db', float('nan')):7.2f} "
                      f"{100 * d['token_transport']['transfer_share_of_wall']:17.1f}%")


if __name__ == "__main__":
    main()

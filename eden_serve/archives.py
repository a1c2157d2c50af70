"""Building eden_encoder.mar and eden_ditdec.mar from split weights with torch-model-archiver.

    python archive_scripts/build_archives.py --weights weights/ --model-store model_store/ \
        [--gpus N] [--profile all|spread|split] [--side both|encoder|ditdec] [--version V [--versioned-names]]

Each archive carries its handler, its own weights, eden_config.json, the shared eden_serve package and a
model-config.yaml. Placement (TorchServe deviceIds) follows the number of GPUs of the deployment (default: as many as
torch sees here) and a profile:

  profile  0 GPUs   1 GPU         N >= 2 GPUs
  all      CPU      both on GPU 0  both models on every GPU 0..N-1 -- the default: the encoder's requests, which
                                   set the two-GPU command's pace beside the client's own work, go to every GPU
                                   too. Two H200s (bench/NOTES.md, session 11): 1080p 7.39 ms a generated frame
                                   against spread's 7.66, 480p 3.23 against 3.75; the command at 1080p 9.2 ms
  spread   CPU      both on GPU 0  encoder on GPU 0; DiT+decoder on every GPU 0..N-1: the encoder is a few
                                   percent of the work, so GPU 0 has room for DiT+decoder workers too. Two H200s
                                   (session 7): 1080p 10.5-11.7 ms a frame against 13.8-14.6 split
  split    CPU      both on GPU 0  encoder on GPU 0; DiT+decoder on GPUs 1..N-1 -- the heavy half never
                                   shares a GPU with the encoder: steadier latency per pair, less throughput

Each model gets --workers-per-gpu workers (default 2) on each of its GPUs, one on a CPU deployment.

--side encoder|ditdec builds one archive alone, for two-host deployments (encoder on one TorchServe, DiT+decoder on
another): a side alone owns every GPU of its host and the profile does not apply.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

import yaml

from .checkpoint import CONFIG_FILE, DITDEC_FILE, ENCODER_FILE
from .protocol import MAX_BODY_BYTES  # (TorchServe's body limits in config.properties)

ROOT = Path(__file__).resolve().parent.parent  # a checkout: the handlers/ and eden_serve/ that go into the archives

MODELS = {
    # name: (handler, weights file)
    "eden_encoder": ("handlers/encoder_handler.py", ENCODER_FILE),
    "eden_ditdec": ("handlers/ditdec_handler.py", DITDEC_FILE),
}


PROFILES = ("all", "spread", "split")
DEFAULT_PROFILE = "all"  # the fastest on two GPUs at 1080p and at 480p (see the table above)
SIDES = ("both", "encoder", "ditdec")


def placement(gpus: int, profile: str = DEFAULT_PROFILE, side: str = "both") -> dict[str, list[int]]:
    """Model name -> GPU ids its workers use ([] = CPU), for the models ``side`` builds."""
    if profile not in PROFILES:
        raise ValueError(f"unknown placement profile {profile!r}: one of {', '.join(PROFILES)}")
    if side not in SIDES:
        raise ValueError(f"unknown side {side!r}: one of {', '.join(SIDES)}")
    if gpus < 0:
        raise ValueError(f"the number of GPUs must be >= 0, got {gpus}")
    if side != "both":  # one model alone on its host: it gets every GPU
        return {f"eden_{side}": list(range(gpus))}
    if gpus == 0:
        return {"eden_encoder": [], "eden_ditdec": []}
    if gpus == 1:
        return {"eden_encoder": [0], "eden_ditdec": [0]}
    if profile == "all":  # both models on every GPU: the encoder's requests spread over N GPUs too
        return {"eden_encoder": list(range(gpus)), "eden_ditdec": list(range(gpus))}
    first_ditdec_gpu = 1 if profile == "split" else 0
    return {"eden_encoder": [0], "eden_ditdec": list(range(first_ditdec_gpu, gpus))}


# Workers of each model on each of its GPUs: two, so that one worker's host work (parsing, copies, answering)
# overlaps the other's GPU work (bench/NOTES.md: one H200, 1 vs 2 workers per model).
WORKERS_PER_GPU = 2
# The encoder's TorchServe batchSize: one. Its requests already carry a chunk of frames (over shared memory 4 at
# 1080p, up to 16 for smaller frames; 2 over HTTP), and with a few of them in flight a batch of 4 requests rarely
# fills, so each request waited out the whole batching window (maxBatchDelay) first: on two H200s 1 took the
# deployment from 4.72 to 3.60 ms a frame at 480p and 8.88 to 8.15 at 1080p (bench/NOTES.md, session 10). The
# DiT+decoder keeps --batch-size: its requests are one pair each.
ENCODER_BATCH_SIZE = 1


def model_config(name: str, device_ids: list[int], batch_size: int, max_batch_delay_ms: int,
                 workers: int | None, workers_per_gpu: int = WORKERS_PER_GPU) -> dict:
    n = workers or (len(device_ids) * workers_per_gpu if device_ids else 1)
    cfg = {
        "minWorkers": n,
        "maxWorkers": max(n, len(device_ids)),
        "batchSize": batch_size,
        "maxBatchDelay": max_batch_delay_ms,
        "responseTimeout": 600,
        "startupTimeout": 300,
        "eden": {"max_response_bytes": MAX_BODY_BYTES},
    }
    if device_ids:
        cfg.update(deviceType="gpu", deviceIds=device_ids)
    else:
        cfg["deviceType"] = "cpu"
    return cfg


def build(weights: Path, model_store: Path, gpus: int, batch_size: int = 4, max_batch_delay_ms: int = 10,
          workers: int | None = None, version: str = "1.0", settings: dict | None = None, profile: str = DEFAULT_PROFILE,
          side: str = "both", versioned_names: bool = False, workers_per_gpu: int = WORKERS_PER_GPU,
          kernels: dict | None = None, encoder_batch_size: int | None = ENCODER_BATCH_SIZE) -> list[Path]:
    """Build the archives of ``side`` into ``model_store``; returns their paths. ``versioned_names`` names them
    ``eden_encoder-<version>.mar`` (for rolling out a new version next to the loaded one) instead of
    ``eden_encoder.mar``. ``kernels``: the DiT+decoder's GPU kernel settings (eden_serve/acceleration.py), off
    unless given. ``encoder_batch_size``: the encoder's batchSize (None: ``batch_size``)."""
    needed = {"both": (ENCODER_FILE, DITDEC_FILE), "encoder": (ENCODER_FILE,), "ditdec": (DITDEC_FILE,)}.get(side, ())
    for f in (*needed, CONFIG_FILE):
        if not (weights / f).is_file():
            raise SystemExit(f"build_archives: {weights / f} is missing: run split_weights.py first")
    if versioned_names and not re.fullmatch(r"[A-Za-z0-9_.]+", version):
        raise SystemExit(f"build_archives: version {version!r} cannot go in a file name (letters, digits, _ and .)")
    model_store.mkdir(parents=True, exist_ok=True)
    built = []
    placed = placement(gpus, profile, side)
    # workers of both models on the most shared GPU: each may run a batch at once (the default frame-size limit
    # admits 4K only where the GPU holds all of them, eden_serve/limits.py)
    per_gpu = {name: (-(-workers // len(ids)) if workers else workers_per_gpu) for name, ids in placed.items() if ids}
    workers_on_gpu = max((sum(per_gpu[n] for n, ids in placed.items() if g in ids) for g in range(gpus)), default=1)
    for name, device_ids in placed.items():
        handler, weights_file = MODELS[name]
        with tempfile.TemporaryDirectory() as tmp:
            stage = Path(tmp, "extra")
            stage.mkdir()
            shutil.copytree(ROOT / "eden_serve", stage / "eden_serve",
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            shutil.copy2(weights / weights_file, stage / weights_file)
            shutil.copy2(weights / CONFIG_FILE, stage / CONFIG_FILE)
            batch = encoder_batch_size if name == "eden_encoder" and encoder_batch_size else batch_size
            config = model_config(name, device_ids, batch, max_batch_delay_ms, workers, workers_per_gpu)
            if device_ids:
                config["eden"]["workers_on_gpu"] = workers_on_gpu
            config["eden"].update(settings or {})
            if name == "eden_ditdec" and kernels:
                config["eden"].update(kernels)
                config["startupTimeout"] = max(config["startupTimeout"], 900)  # compiling on a cold cache
            config_file = Path(tmp, "model-config.yaml")
            config_file.write_text(yaml.safe_dump(config, sort_keys=False))
            cmd = [sys.executable, "-c",
                   "from model_archiver.model_packaging import generate_model_archive as g; g()",
                   "--model-name", name, "--version", version, "--handler", str(ROOT / handler),
                   "--extra-files", str(stage), "--config-file", str(config_file),
                   "--export-path", tmp, "--force"]
            # the archiver stages files in $TMPDIR/<model name>: a private TMPDIR keeps concurrent builds apart
            subprocess.run(cmd, check=True, env={**os.environ, "TMPDIR": tmp})
            target = model_store / (f"{name}-{version}.mar" if versioned_names else f"{name}.mar")
            shutil.move(Path(tmp, f"{name}.mar"), target)
        built.append(target)
        where = f"GPU {device_ids}" if device_ids else "CPU"
        print(f"built {built[-1]} (version {version}, {where}, {config['minWorkers']} worker(s), batch {batch})")
    return built


# The DiT+decoder's kernels on a GPU deployment unless --kernels says otherwise (measured on one H200 in
# bench/NOTES.md, "GPU kernels"): blocks compiled (dynamic shapes: any frame size without a recompile), fused
# temporal attention, one CUDA graph per (size, batch), weights cast to bfloat16 once; 480p and 1080p warmed at worker
# start, so no user request pays for a compile. The compile cache is PyTorch's (under /tmp, kept across restarts of
# the workers): a worker starts in about 40 s on a cold cache, 15 s on a warm one.
GPU_KERNELS = "compile_mode=default,fused_ops=1,cuda_graphs=1,cast_weights=1,warmup_sizes=480x854+1080x1920"


def kernel_settings(text: str, gpus: int = 1) -> dict:
    """--kernels auto|off|NAME=VALUE,... -> the model-config entries that differ from the defaults (checked).
    ``auto``: GPU_KERNELS on a GPU deployment (``gpus`` > 0), nothing on a CPU one; ``off`` (or ""): nothing."""
    from eden_serve.acceleration import KernelSettings
    text = text.strip()
    if text == "auto":
        text = GPU_KERNELS if gpus > 0 else ""
    elif text == "off":
        text = ""
    chosen, default = KernelSettings.parse(text).to_dict(), KernelSettings().to_dict()
    return {k: v for k, v in chosen.items() if v != default[k]}


def handler_settings(pairs: list[str]) -> dict:
    """--set NAME=VALUE ... -> entries of both archives' ``eden`` section (eden_serve/service.py ``Settings``; values
    are YAML: 1, true, [480x854], text). Unknown names are refused here rather than by a worker at load."""
    from eden_serve.service import Settings
    known = {f.name for f in fields(Settings)}
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"{pair!r} is not NAME=VALUE")
        if name not in known:
            raise ValueError(f"unknown setting {name!r} (settings: {', '.join(sorted(known))})")
        out[name] = yaml.safe_load(value) if value.strip() else ""
    if "gpu_wait" in out:
        from eden_serve.gpu_wait import check_mode
        check_mode(out["gpu_wait"])
    return out


def detected_gpus() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:
        return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", required=True, type=Path, help="output folder of split_weights.py")
    ap.add_argument("--model-store", required=True, type=Path, help="where the .mar files go")
    ap.add_argument("--gpus", type=int, default=None, help="GPUs of the deployment (default: those seen here)")
    ap.add_argument("--batch-size", type=int, default=4,
                    help="TorchServe batchSize of the DiT+decoder (default: %(default)s)")
    ap.add_argument("--encoder-batch-size", type=int, default=ENCODER_BATCH_SIZE,
                    help="the encoder's batchSize (default: %(default)s: its requests already carry a chunk of frames "
                         "each, and one spares each of them TorchServe's wait for a batch, --max-batch-delay)")
    ap.add_argument("--max-batch-delay", type=int, default=10,
                    help="TorchServe maxBatchDelay in ms (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=None,
                    help="workers per model in all (default: --workers-per-gpu on each of its GPUs, 1 on CPU)")
    ap.add_argument("--workers-per-gpu", type=int, default=WORKERS_PER_GPU,
                    help="workers of each model on each of its GPUs (default: %(default)s: one's host work overlaps "
                         "the other's GPU work)")
    ap.add_argument("--version", default="1.0", help="model version written in the archives (default 1.0)")
    ap.add_argument("--versioned-names", action="store_true",
                    help="name the files eden_*-VERSION.mar, to register them next to the loaded version")
    ap.add_argument("--profile", choices=PROFILES, default=DEFAULT_PROFILE,
                    help="GPU placement with 2+ GPUs: all (default; both models on every GPU: the most frames a "
                         "second measured on two H200s), spread (encoder on GPU 0, DiT+decoder on every GPU) or "
                         "split (encoder GPU 0, DiT+decoder GPUs 1..N-1: steadier latency per pair)")
    ap.add_argument("--kernels", default="auto",
                    help="DiT+decoder GPU kernels: auto (default: " + GPU_KERNELS + " on a GPU deployment, none on "
                         "a CPU one), off, or settings such as compile_mode=default,cuda_graphs=1,"
                         "attention_backend=cudnn,compile_cache_dir=/var/cache/eden (eden_serve/acceleration.py)")
    ap.add_argument("--side", choices=SIDES, default="both",
                    help="which archives: both (one TorchServe), or encoder / ditdec alone (two hosts)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="a handler setting written into both archives (the eden section of model-config.yaml: "
                         "eden_serve/service.py Settings), e.g. gpu_wait=spin or token_dtype=int8; repeatable")
    args = ap.parse_args(argv)
    gpus = detected_gpus() if args.gpus is None else args.gpus
    if gpus < 0:
        ap.error("--gpus must be >= 0")
    if args.workers_per_gpu < 1:
        ap.error("--workers-per-gpu must be >= 1")
    if args.batch_size < 1 or (args.encoder_batch_size is not None and args.encoder_batch_size < 1):
        ap.error("batch sizes must be >= 1")
    try:
        kernels = kernel_settings(args.kernels, gpus)
    except ValueError as e:
        ap.error(f"--kernels: {e}")
    try:
        settings = handler_settings(args.set)
    except ValueError as e:
        ap.error(f"--set: {e}")
    build(args.weights, args.model_store, gpus, args.batch_size, args.max_batch_delay, args.workers, args.version,
          profile=args.profile, side=args.side, versioned_names=args.versioned_names,
          workers_per_gpu=args.workers_per_gpu, kernels=kernels, settings=settings,
          encoder_batch_size=args.encoder_batch_size)


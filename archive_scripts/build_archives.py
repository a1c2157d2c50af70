#!/usr/bin/env python3
"""Build eden_encoder.mar and eden_ditdec.mar from split weights with torch-model-archiver.

    python archive_scripts/build_archives.py --weights weights/ --model-store model_store/ [--gpus N]

Each archive carries its handler, its own weights, eden_config.json, the shared eden_serve package and a
model-config.yaml. Placement (TorchServe deviceIds), by the number of GPUs the deployment has (default: as many as
torch sees here):
  0 GPUs   both models on CPU;
  1 GPU    both models on GPU 0;
  2+ GPUs  the encoder on GPU 0, the DiT+decoder on GPUs 1..N-1 with one worker each. The encoder is a few
           percent of the work (two patch convolutions per frame), so it shares nothing with the heavy half, and
           every further GPU adds a DiT+decoder worker.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from eden_serve.checkpoint import CONFIG_FILE, DITDEC_FILE, ENCODER_FILE  # noqa: E402

MODELS = {
    # name: (handler, weights file)
    "eden_encoder": ("handlers/encoder_handler.py", ENCODER_FILE),
    "eden_ditdec": ("handlers/ditdec_handler.py", DITDEC_FILE),
}
MAX_BODY_BYTES = 256 * 1024 * 1024  # keep equal to max_request_size / max_response_size in config.properties


def placement(gpus: int) -> dict[str, list[int]]:
    """Model name -> GPU ids its workers use ([] = CPU)."""
    if gpus <= 0:
        return {"eden_encoder": [], "eden_ditdec": []}
    if gpus == 1:
        return {"eden_encoder": [0], "eden_ditdec": [0]}
    return {"eden_encoder": [0], "eden_ditdec": list(range(1, gpus))}


def model_config(name: str, device_ids: list[int], batch_size: int, max_batch_delay_ms: int,
                 workers: int | None) -> dict:
    n = workers or max(1, len(device_ids))
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
          workers: int | None = None, version: str = "1.0", settings: dict | None = None) -> list[Path]:
    for f in (ENCODER_FILE, DITDEC_FILE, CONFIG_FILE):
        if not (weights / f).is_file():
            raise SystemExit(f"build_archives: {weights / f} is missing: run split_weights.py first")
    model_store.mkdir(parents=True, exist_ok=True)
    built = []
    for name, device_ids in placement(gpus).items():
        handler, weights_file = MODELS[name]
        with tempfile.TemporaryDirectory() as tmp:
            stage = Path(tmp, "extra")
            stage.mkdir()
            shutil.copytree(ROOT / "eden_serve", stage / "eden_serve",
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            shutil.copy2(weights / weights_file, stage / weights_file)
            shutil.copy2(weights / CONFIG_FILE, stage / CONFIG_FILE)
            config = model_config(name, device_ids, batch_size, max_batch_delay_ms, workers)
            config["eden"].update(settings or {})
            config_file = Path(tmp, "model-config.yaml")
            config_file.write_text(yaml.safe_dump(config, sort_keys=False))
            cmd = [sys.executable, "-c",
                   "from model_archiver.model_packaging import generate_model_archive as g; g()",
                   "--model-name", name, "--version", version, "--handler", str(ROOT / handler),
                   "--extra-files", str(stage), "--config-file", str(config_file),
                   "--export-path", str(model_store), "--force"]
            subprocess.run(cmd, check=True)
        built.append(model_store / f"{name}.mar")
        where = f"GPU {device_ids}" if device_ids else "CPU"
        print(f"built {built[-1]} ({where}, {config['minWorkers']} worker(s), batch {batch_size})")
    return built


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
    ap.add_argument("--batch-size", type=int, default=4, help="TorchServe batchSize of both models")
    ap.add_argument("--max-batch-delay", type=int, default=10, help="TorchServe maxBatchDelay in ms")
    ap.add_argument("--workers", type=int, default=None, help="workers per model (default: one per GPU, 1 on CPU)")
    ap.add_argument("--version", default="1.0")
    args = ap.parse_args(argv)
    gpus = detected_gpus() if args.gpus is None else args.gpus
    build(args.weights, args.model_store, gpus, args.batch_size, args.max_batch_delay, args.workers, args.version)


if __name__ == "__main__":
    main()

"""Placement profiles on a GPU host (run it on a machine with 2+ GPUs):

    python bench/placement_gpu.py [--checkpoint eden.pt] [--out build/placement_gpu] [--profiles split spread all]

For each profile: real-size weights (yours, or random in the official layout) -> split -> archives for the GPUs
seen (build_archives.py --profile P) -> TorchServe -> a few requests to each model -> the worker table of
``python -m eden_client status`` (what an operator sees), checked three ways against the intended placement:
the management API's gpuUsage (gpuId), nvidia-smi's compute processes (by worker pid), and the X-Eden-Device header
the handlers answer with. Prints the tables and a verdict per profile, and writes summary.json to --out.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "archive_scripts"), str(ROOT / "bench")]

from build_archives import build, placement  # noqa: E402
from eden_serve.archives import PROFILES  # noqa: E402
from eden_client.api import EdenClient  # noqa: E402
from eden_client.keys import KeySource  # noqa: E402
from eden_client.ops import Server, collect_status, format_status  # noqa: E402
from eden_dev.launcher import TorchServe  # noqa: E402
from eden_dev.samples import moving_shapes  # noqa: E402
from eden_serve import checkpoint, images  # noqa: E402
from eden_serve.config import EdenConfig  # noqa: E402


def gpu_of_pids() -> dict[int, int]:
    """pid -> GPU index of every process using a GPU, from nvidia-smi."""
    try:
        from gpu_smoke import gpu_of_pids as smi
        return smi()
    except Exception as e:  # noqa: BLE001 - nvidia-smi missing or odd: report, do not fail the run
        print(f"nvidia-smi: {e}", flush=True)
        return {}


def run_profile(profile: str, weights: Path, work: Path, gpus: int, requests: int) -> dict:
    store = work / f"store_{profile}"
    build(weights, store, gpus=gpus, batch_size=1, profile=profile)
    intended = placement(gpus, profile)
    with TorchServe(work / f"serve_{profile}", store) as ts:
        client = EdenClient.connect(ts.inference_url, encoder_keys=KeySource(key_file=ts.key_file))
        pngs = [images.encode_png(f) for f in moving_shapes(2, 480, 854, step=12)]
        # concurrent requests so that every worker of each model gets some (the encoder too: on every GPU in the
        # profile all)
        n_enc = max(requests, 2 * len(intended["eden_encoder"]))
        with ThreadPoolExecutor(max(1, len(intended["eden_encoder"])) * 2) as pool:
            encoded = list(pool.map(lambda i: client.encoder.predict(files={"frame0": pngs[0], "frame1": pngs[1]}),
                                    range(n_enc)))
        blob = encoded[0].content
        n = max(requests, 2 * len(intended["eden_ditdec"]))
        with ThreadPoolExecutor(max(1, len(intended["eden_ditdec"])) * 2) as pool:
            answers = list(pool.map(lambda i: client.ditdec.predict(data=blob, headers={"X-Eden-Seed": str(i)}),
                                    range(n)))
        header_devices = {"eden_encoder": sorted({r.headers.get("X-Eden-Device") for r in encoded}),
                          "eden_ditdec": sorted({a.headers.get("X-Eden-Device") for a in answers})}
        status = collect_status([Server(ts.management_url, ts.inference_url, ts.metrics_url, ts.key_file)])
        table = format_status(status)
        cli = subprocess.run([sys.executable, "-m", "eden_client", "status", "--management-url", ts.management_url,
                              "--inference-url", ts.inference_url, "--metrics-url", ts.metrics_url,
                              "--key-file", str(ts.key_file)], capture_output=True, text=True, cwd=ROOT)
        smi = gpu_of_pids()
    observed_api, observed_smi = {}, {}
    for m in status["servers"][0]["models"]:
        observed_api[m["model"]] = sorted(w["gpuId"] for w in m["workers"] if w["gpuId"] is not None)
        observed_smi[m["model"]] = sorted(smi[w["pid"]] for w in m["workers"] if w["pid"] in smi)
    # each model's workers (several per GPU) on exactly its intended GPUs, in all three views
    ok = all(set(observed_api.get(name, ())) == set(ids) and set(observed_smi.get(name, ())) == set(ids)
             and set(header_devices[name]) == {f"cuda:{i}" for i in ids} for name, ids in intended.items())
    return {"profile": profile, "gpus": gpus, "intended": intended, "management_api_gpu_ids": observed_api,
            "nvidia_smi_gpu_ids": observed_smi, "handler_devices": header_devices, "placement_ok": ok,
            "status": status, "table": table, "cli_stdout": cli.stdout, "cli_stderr": cli.stderr[-2000:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="official checkpoint (default: random real-size weights)")
    ap.add_argument("--out", default="build/placement_gpu")
    ap.add_argument("--work", default="/tmp/eden_placement")
    ap.add_argument("--profiles", nargs="+", default=["split", "spread", "all"], choices=list(PROFILES))
    ap.add_argument("--requests", type=int, default=8, help="DiT+decoder requests per profile (at least 2/worker)")
    args = ap.parse_args()
    gpus = torch.cuda.device_count()
    if gpus < 2:
        print(f"warning: {gpus} GPU(s) seen: both profiles place the same way below 2 GPUs", flush=True)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = Path(args.checkpoint) if args.checkpoint else work / "eden_random.pt"
    if not args.checkpoint and not ckpt.is_file():
        checkpoint.make_random_checkpoint(ckpt, EdenConfig(), seed=0)
    checkpoint.split_checkpoint(ckpt, work / "weights")

    summary = {"gpus": gpus, "names": [torch.cuda.get_device_name(i) for i in range(gpus)],
               "torch": torch.__version__, "profiles": []}
    for profile in args.profiles:
        result = run_profile(profile, work / "weights", work, gpus, args.requests)
        summary["profiles"].append(result)
        print(f"\n=== profile {profile} on {gpus} GPU(s): intended {result['intended']}", flush=True)
        print(f"$ python -m eden_client status ...\n{result['cli_stdout'] or result['table']}", flush=True)
        print(f"management API gpuId: {result['management_api_gpu_ids']}  nvidia-smi: {result['nvidia_smi_gpu_ids']}"
              f"  X-Eden-Device: {result['handler_devices']}", flush=True)
        print(f"placement {'as intended' if result['placement_ok'] else 'NOT as intended'}", flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nwrote {out / 'summary.json'}")
    return 0 if all(p["placement_ok"] for p in summary["profiles"]) else 1


if __name__ == "__main__":
    sys.exit(main())

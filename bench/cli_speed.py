"""The speed a user gets: the README's commands with their defaults, timed from input file to output file.

    python bench/cli_speed.py [--sizes 480x854:300,1080x1920:120] [--out DIR] [--official-dir .official]

One command on the GPU host; in one run, for each size:
  reference   bench/reference.py on the clip's first pairs (and the official code itself, bench/official_loop.py,
              when --official-dir holds a checkout of it);
  raw sink    the deployment through the video client's scheduler with its defaults, frames in memory, answers
              dropped: what the deployment can do (`--transport auto`, as the CLI);
  cli mp4     `python -m eden_client video in.mp4 -o out.mp4` as a subprocess, no tuning flags: decoding, scene
              detection, audio, H.264 and the file included;
  cli png     the same into a folder of PNG frames.
The deployment is the README's: `split_weights.py` on a real-size checkpoint (random weights, or with `--weights blend`
one whose middle frames are the inputs' mean: eden_dev/blend_checkpoint.py), `build_archives.py` with its
defaults, `torchserve --start --ncs --ts-config config.properties` in a working folder (a copy of the repository's
config.properties), the client reading ./key_file.json there. Clips are generated (moving shapes, 30000/1001 fps,
an AAC track). Seconds per generated frame = the command's wall clock / (frames in - 1). Writes summary.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import requests
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from speed import CpuSampler, GpuSampler, run_reference  # noqa: E402
from speed import serve_pids as speed_serve_pids  # noqa: E402

from eden_client.api import EdenClient  # noqa: E402
from eden_client.convert import Options  # noqa: E402
from eden_client.frames_io import Frame  # noqa: E402
from eden_client.keys import KeySource  # noqa: E402
from eden_client.video import Interpolator  # noqa: E402
from eden_client.video_cli import add_interpolation_args, options_from  # noqa: E402
from eden_dev import clips  # noqa: E402
from eden_dev.samples import moving_shapes  # noqa: E402
from eden_dev.blend_checkpoint import make_blend_checkpoint  # noqa: E402
from eden_serve import checkpoint  # noqa: E402
from eden_serve.config import EdenConfig  # noqa: E402

RATE = Fraction(30000, 1001)
LAST_STDERR = ""


def user_env() -> dict:
    """The environment of a user's shell with the repository importable (as when run from its root)."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def thread_seconds(pid: int) -> dict:
    """CPU seconds of each thread of ``pid`` so far (Linux /proc; empty elsewhere or once it has exited)."""
    seen = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            seen[task.name] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        except (OSError, IndexError, ValueError):
            pass
    return seen


THREADS: dict = {}  # the last sh()'s per-thread CPU: how many threads and the busiest ones' seconds


def sh(cmd: list, cwd: Path, **kw) -> float:
    """Run a command as a user would; its wall clock in seconds (raises with its output if it fails). What it
    wrote to stderr (warnings) is kept in LAST_STDERR; its threads' CPU seconds (read every 0.2 s) in THREADS."""
    global LAST_STDERR
    t = time.perf_counter()
    with open(cwd / ".sh.out", "w+") as out, open(cwd / ".sh.err", "w+") as err:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, stdout=out, stderr=err, text=True, **kw)
        threads: dict = {}
        done = threading.Event()

        def sample():  # beside the wait, so that the wall clock ends when the command does
            while not done.wait(0.2):
                threads.update(thread_seconds(proc.pid))
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        proc.wait()
        wall = time.perf_counter() - t
        done.set()
        sampler.join()
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    LAST_STDERR = stderr[-3000:]
    busiest = sorted(threads.values(), reverse=True)
    THREADS.clear()
    THREADS.update({"threads": len(busiest), "busiest_s": [round(v, 2) for v in busiest[:8]],
                    "total_s": round(sum(busiest), 2)})
    if proc.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{stdout[-3000:]}\n"
                           f"{stderr[-3000:]}")
    return wall


def wait_ready(work: Path, timeout: float = 600) -> float:
    """Until both models have all their workers READY (what a user waits for after `torchserve --start`)."""
    t = time.perf_counter()
    while time.perf_counter() - t < timeout:
        try:
            key = json.loads((work / "key_file.json").read_text())["management"]["key"]
            ready = []
            for name in ("eden_encoder", "eden_ditdec"):
                r = requests.get(f"http://127.0.0.1:8081/models/{name}", headers={"Authorization": f"Bearer {key}"},
                                 timeout=5)
                workers = r.json()[0]["workers"] if r.ok else []
                ready.append(bool(workers) and all(w["status"] == "READY" for w in workers))
            if all(ready):
                return time.perf_counter() - t
        except (OSError, ValueError, KeyError, requests.RequestException):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"TorchServe not ready after {timeout} s: see {work}/logs")


def start_readme_deployment(work: Path, ckpt: Path, made: bool = True, build_args: str = "",
                            weights: str = "random") -> dict:
    """The README's deployment in ``work``: (a real-size checkpoint when ``made``: ``weights`` random, or blend:
    eden_dev/blend_checkpoint.py), split_weights.py, build_archives.py with its defaults (+ ``build_args``),
    ``torchserve --start --ncs --ts-config config.properties`` (a copy of the repository's), until both models are
    READY. Seconds per step. Stop it with stop_deployment(work)."""
    if made and weights == "blend":
        make_blend_checkpoint(ckpt)
    elif made:
        checkpoint.make_random_checkpoint(ckpt, EdenConfig(), seed=0)
    shutil.copy(ROOT / "config.properties", work / "config.properties")
    setup: dict = {}
    setup["split_weights"] = sh([sys.executable, ROOT / "split_weights.py", ckpt, "--out-dir", "weights/"], work)
    setup["build_archives"] = sh([sys.executable, ROOT / "archive_scripts" / "build_archives.py", "--weights",
                                  "weights/", "--model-store", "model_store/", *shlex.split(build_args)], work)
    setup["cli_help"] = sh([sys.executable, "-m", "eden_client", "video", "--help"], work, env=user_env())
    t = time.perf_counter()
    with open(work / "torchserve.out", "wb") as log:  # (its Java child keeps the output open: not a pipe)
        subprocess.run(["torchserve", "--start", "--ncs", "--ts-config", "config.properties"], cwd=work, check=True,
                       stdout=log, stderr=subprocess.STDOUT)
    wait_ready(work)
    setup["torchserve_ready"] = time.perf_counter() - t
    return setup


def serve_pids(work: Path) -> dict:
    return speed_serve_pids("http://127.0.0.1:8081", work / "key_file.json")


def stop_deployment(work: Path) -> None:
    subprocess.run(["torchserve", "--stop"], cwd=work, capture_output=True)


def client_options(client_args: str) -> Options:
    """The options the CLI's interpolation flags among ``client_args`` give (the raw sink runs at them)."""
    p = argparse.ArgumentParser(add_help=False)
    add_interpolation_args(p)
    known, _ = p.parse_known_args(shlex.split(client_args))
    return options_from(known)


def raw_sink(work: Path, clip: list, warm: int = 17, transport: str = "auto", token_dtype: str = "",
             client_args: str = "") -> dict:
    """The deployment at the client's defaults (or the interpolation flags in ``client_args``) with frames in
    memory and answers dropped."""
    client = EdenClient.connect("http://127.0.0.1:8080", encoder_keys=KeySource(key_file=work / "key_file.json"),
                                transport=transport)
    o = client_options(client_args)
    interp = Interpolator(client, o.factor, o.seed, o.max_inflight, o.encoder_chunk, o.encoder_inflight,
                          token_dtype=token_dtype or o.token_dtype)
    frames = [Frame(image, pts=i, duration=1) for i, image in enumerate(clip)]
    t = time.perf_counter()
    # every worker sees the size (the first request at a new size); mirrored frames, so that over HTTP the
    # DiT+decoder's frame cache does not already hold the measured run's first frames
    interp.run([Frame(np.ascontiguousarray(f.image[:, ::-1]), f.pts, f.duration) for f in frames[:warm]],
               lambda *a: None)
    warm_s = time.perf_counter() - t
    with GpuSampler() as gpu, CpuSampler(lambda: serve_pids(work)) as cpu:
        t = time.perf_counter()
        stats = interp.run(frames, lambda *a: None)
        seconds = time.perf_counter() - t
    return {"seconds_per_generated_frame": seconds / (len(clip) - 1), "wall_s": seconds, "warm_up_s": warm_s,
            "gpu_util_percent": gpu.mean(), "cpu_cores_busy": cpu.cores(), "transport": stats.transport,
            "stats": stats.as_dict()}


CLI_WRAP: list = []  # --cli-wrap: a command the CLI runs under (a profiler)


def variant(flags: str) -> tuple[dict, tuple]:
    """A --mp4-variants entry -> (its leading NAME=VALUE settings, for the run's environment; its flags)."""
    items = shlex.split(flags)
    k = 0
    while k < len(items) and "=" in items[k] and not items[k].startswith("-"):
        k += 1
    return dict(item.partition("=")[::2] for item in items[:k]), tuple(items[k:])


def cli(work: Path, src: Path, dst: Path, n: int, extra: tuple = (), wrap: list | None = None,
        env: dict | None = None) -> dict:
    """`python -m eden_client video SRC -o DST` as a user runs it (no tuning flags unless ``extra``), wall clock and its
    stats; under ``wrap`` (default: --cli-wrap) if given, with ``env`` added to its environment."""
    env = {**user_env(), **(env or {})}
    stats_file = work / f"{dst.name}.stats.json"
    with GpuSampler() as gpu, CpuSampler(lambda: serve_pids(work)) as cpu:
        wall = sh([*(CLI_WRAP if wrap is None else wrap), sys.executable, "-m", "eden_client", "video", src, "-o", dst,
                   "--quiet", "--stats-json", stats_file, *extra], cwd=work, env=env)
    stats = json.loads(stats_file.read_text())
    size = dst.stat().st_size if dst.is_file() else sum(f.stat().st_size for f in dst.iterdir())
    # cpu_cores_busy: "children" is the CLI process (x264's threads included), the rest TorchServe's processes
    return {"seconds_per_generated_frame": wall / (n - 1), "wall_s": wall, "gpu_util_percent": gpu.mean(),
            "cpu_cores_busy": cpu.cores(), "cli_threads": dict(THREADS), "output_bytes": size,
            "phases_s": stats.get("phases"),
            # the rest: spawning the process and its exit (its start and imports are the "start" phase)
            "outside_phases_s": wall - sum((stats.get("phases") or {}).values()), "transport": stats.get("transport"),
            "output_frames": stats.get("output_frames"), "stats": stats, "stderr_tail": LAST_STDERR[-1500:]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="480x854:300,1080x1920:120",
                    help="HxW:FRAMES, comma separated (a size given twice: the second is reported as HxW_FRAMES)")
    ap.add_argument("--reference-pairs", type=int, default=16, help="pairs the reference makes per size")
    ap.add_argument("--checkpoint", default=None, help="official checkpoint (default: one made by --weights)")
    ap.add_argument("--weights", default="random", choices=["random", "blend"],
                    help="the checkpoint made when none is given: random real-size weights (generated frames are "
                         "noise, the output encoder's worst case) or blend (eden_dev/blend_checkpoint.py: the same "
                         "random DiT, the middle frame the two inputs' mean, content like a trained model's)")
    ap.add_argument("--official-dir", default=None, help="a checkout of the official code: bench/official_loop.py")
    ap.add_argument("--workdir", default="/tmp/eden_cli")
    ap.add_argument("--io-dir", default=None,
                    help="where the clips and the outputs go (default: the workdir); a RAM disk such as /dev/shm "
                         "keeps a slow disk out of the measurement")
    ap.add_argument("--out", default="build/cli_speed")
    ap.add_argument("--skip", default="", help="comma list: reference,official,raw,mp4,png")
    ap.add_argument("--build-args", default="",
                    help="extra build_archives.py flags, e.g. \"--kernels compile_mode=default,fused_ops=1\" "
                         "(default: none, the README's deployment)")
    ap.add_argument("--transport", default="auto", choices=["auto", "shm", "http"],
                    help="the client's transport for the raw sink and the CLI (default auto, the CLI's default; "
                         "http forces the network path of issue 13: two hosts)")
    ap.add_argument("--token-dtype", default="", choices=["", "float16", "float32", "int8"],
                    help="tokens on the wire for the raw sink and the CLI (default: the CLI's)")
    ap.add_argument("--client-args", default="",
                    help="extra eden-client video flags for every run (the raw sink takes the interpolation "
                         "flags among them: --max-inflight, --encoder-chunk, --factor, ...), e.g. \"--max-inflight 32\" (default: none)")
    ap.add_argument("--mp4-variants", default="",
                    help="more mp4 runs after the others, each with its own extra flags, separated by ';', e.g. "
                         "\"--preset superfast;--max-inflight 32\"; leading NAME=VALUE items set the run's environment "
                         "(\"EDEN_SWITCH_INTERVAL_S=0.001\")")
    ap.add_argument("--profiled-run", default="",
                    help="one more mp4 run after the others under this command, {size} replaced by the size, e.g. "
                         "\"py-spy record --gil -r 200 -f raw -o gil_{size}.txt --\" (not a timing: the profiler "
                         "slows it)")
    ap.add_argument("--variant-sizes", default="",
                    help="comma list of HxW the --mp4-variants and --profiled-run are made at (default: every size)")
    ap.add_argument("--cli-wrap", default="",
                    help="a command every CLI run goes under, e.g. \"py-spy record --native --idle -o p.txt -f raw --\" "
                         "(its wall clock is then not the CLI's)")
    args = ap.parse_args()
    CLI_WRAP[:] = shlex.split(args.cli_wrap)
    cli_extra = (() if args.transport == "auto" else ("--transport", args.transport)) + \
        (("--token-dtype", args.token_dtype) if args.token_dtype else ()) + tuple(shlex.split(args.client_args))
    skip = set(filter(None, args.skip.split(",")))
    out, work = Path(args.out).resolve(), Path(args.workdir).resolve()
    io_dir = Path(args.io_dir).resolve() if args.io_dir else work
    io_dir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    summary: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                     "torch": torch.__version__, "cpus": os.cpu_count(), "io_dir": str(io_dir), "setup_s": {},
                     "sizes": {}}

    def save():
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))

    # ---- the README's deployment, its commands and defaults
    ckpt = Path(args.checkpoint).resolve() if args.checkpoint else work / "eden.pt"
    summary["build_args"], summary["transport"], summary["token_dtype"], summary["client_args"] = \
        args.build_args, args.transport, args.token_dtype or "default", args.client_args
    summary["weights"] = args.weights if not args.checkpoint else str(ckpt)
    summary["setup_s"] = start_readme_deployment(work, ckpt, made=not args.checkpoint, build_args=args.build_args,
                                                 weights=args.weights)
    print(f"deployment ready: {summary['setup_s']}", flush=True)
    save()
    sd = checkpoint.read_official_checkpoint(ckpt)
    cfg = EdenConfig.from_state_dict(sd)
    dev = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        for spec in args.sizes.split(","):
            size, n = spec.split(":")
            H, W = (int(v) for v in size.split("x"))
            n = int(n)
            key = size if size not in summary["sizes"] else f"{size}_{n}"  # (a size twice: a long and a short clip)
            row: dict = summary["sizes"].setdefault(key, {"frames_in": n, "generated": n - 1})
            clip = moving_shapes(n, H, W, step=H / 40)
            src = io_dir / f"in_{key}.mp4"

            def source(k: int) -> Path:
                """The CLI's input for its k-th run: over HTTP each run gets its own frames (the clip shifted by k
                pixels), so no run finds its frames in the DiT+decoder's cache from an earlier one."""
                if args.transport != "http" or k == 0:
                    return src
                path = io_dir / f"in_{key}_{k}.mp4"
                clips.write_video(path, [np.roll(f, k, axis=1) for f in clip], RATE)
                return path
            if not {"mp4", "png"} <= skip or args.mp4_variants or args.profiled_run:
                clips.write_video(src, clip, RATE)  # with an AAC track (PyAV: not needed for the raw sink alone)
            if "reference" not in skip:
                m = min(args.reference_pairs + 1, n)
                ref_s, _ = run_reference(sd, cfg, clip[:m], dev)
                row["reference_s_per_frame"] = ref_s
                print(f"{key} reference {ref_s:.4f} s/frame", flush=True)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            if args.official_dir and "official" not in skip:
                try:
                    o = subprocess.run([sys.executable, ROOT / "bench" / "official_loop.py", "--official-dir",
                                        args.official_dir, "--checkpoint", ckpt, "--sizes", size, "--frames",
                                        str(min(args.reference_pairs + 1, n)), "--repeats", "1",
                                        "--out", work / f"official_{key}.json"], capture_output=True, text=True,
                                       cwd=ROOT, timeout=400)
                    row["official"] = json.loads((work / f"official_{key}.json").read_text()) \
                        if o.returncode == 0 else {"error": o.stderr[-2000:]}
                except Exception as e:  # noqa: BLE001 - the rest of the run goes on
                    row["official"] = {"error": repr(e)}
                print(f"{key} official {row['official']}", flush=True)
            ref_s = row.get("reference_s_per_frame")
            runs = [("raw_sink", lambda: raw_sink(work, clip, transport=args.transport, token_dtype=args.token_dtype,
                                                  client_args=args.client_args)),
                    ("cli_mp4", lambda: cli(work, source(0), io_dir / f"out_{key}.mp4", n, cli_extra)),
                    ("cli_png", lambda: cli(work, source(1), io_dir / f"out_{key}_png", n, cli_extra))]
            runs = [(name, run) for name, run in runs
                    if {"raw_sink": "raw", "cli_mp4": "mp4", "cli_png": "png"}[name] not in skip]
            extras = not args.variant_sizes or size in [s.strip() for s in args.variant_sizes.split(",")]
            for k, flags in enumerate(filter(None, (v.strip() for v in args.mp4_variants.split(";") if extras)),
                                      start=2):
                env, own = variant(flags)
                runs.append((f"cli_mp4 {flags}", lambda env=env, own=own, k=k: cli(
                    work, source(k), io_dir / f"out_{key}_variant.mp4", n, cli_extra + own, env=env)))
            if args.profiled_run and extras:
                k = len(runs) + 2  # (an input of its own over HTTP, after the variants')
                runs.append(("cli_mp4 profiled", lambda k=k: cli(
                    work, source(k), io_dir / f"out_{key}_profiled.mp4", n, cli_extra,
                    wrap=shlex.split(args.profiled_run.replace("{size}", key)))))
            for name, run in runs:
                try:
                    r = run()
                except Exception as e:  # noqa: BLE001 - keep what was measured
                    r = {"error": repr(e)[-3000:]}
                if ref_s and "seconds_per_generated_frame" in r and name != "cli_mp4 profiled":
                    r["speedup_vs_reference"] = ref_s / r["seconds_per_generated_frame"]
                row[name] = r
                print(f"{key} {name}: {json.dumps(r, default=float)}", flush=True)
                save()
            raw, mp4, png = (row.get(k, {}).get("seconds_per_generated_frame")
                             for k in ("raw_sink", "cli_mp4", "cli_png"))
            if raw and mp4:
                row["cli_mp4_vs_raw_sink"] = raw / mp4
            if mp4 and png:
                row["cli_png_vs_mp4"] = mp4 / png
            save()
    finally:
        stop_deployment(work)
    print(json.dumps(summary, indent=1, default=float))


if __name__ == "__main__":
    main()

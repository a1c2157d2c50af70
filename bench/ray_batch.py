"""A batch through a one-node Ray cluster against the plain batch on the same GPU host: `--ray auto` within 5%?

    python bench/ray_batch.py [--inputs 480x854:120*6,1080x1920:48*2] [--order plain,ray,plain,ray]
                              [--workdir /tmp/eden_raybench] [--io-dir DIR] [--checkpoint eden.pt]
                              [--build-args "..."] [--out build/ray_batch/summary.json] [--budget-s 400]

One command on the GPU host. The deployment is the README's (bench/cli_speed.py's start_readme_deployment: a random
real-size checkpoint unless --checkpoint, split_weights.py, build_archives.py with its defaults plus --build-args,
TorchServe started in the working folder, where key_file.json is). The inputs are generated clips (moving shapes,
30000/1001 fps, an AAC track) in IN = IO_DIR/in. Then, in the order --order gives, each into a fresh output folder:
  plain   `python -m eden_client batch IN OUT` from the working folder, no other flags (--plain-args adds some);
  ray     `python -m eden_client batch IN OUT --ray auto`, no other flags (--ray-args adds some), against a one-node Ray
          cluster started once before the first ray run: `ray start --head --resources '{"eden": 1}' --block` in the
          environment deploy/ray/eden-node.sh gives a node's `ray start` (EDEN_NODE_URL, EDEN_MANAGEMENT_URL and
          EDEN_KEY_FILE of this TorchServe, EDEN_NODE_NAME, EDEN_TRANSPORT=auto), so this machine is the head and the
          one node serving EDEN. Its start is timed separately: the comparison is of the batch command with a
          running cluster.
Each command is timed by its wall clock, as a subprocess. Before the first timed run, a plain batch of one short
clip per size warms the workers for each size, and the same batch with --ray auto runs once the Ray node is up
(--no-warm skips both). The defaults differ in concurrency, as a user gets them: plain runs one input at a time
(--jobs 1), --ray two per node (--per-node 2). Every run's outputs are compared with the first plain run's: bytes,
else decoded frames (count, time stamps, equal frames, largest pixel difference, lowest PSNR) and audio packets.
Frames can differ between two plain runs too when the DiT+decoder batches requests (--build-args "--batch-size 1"
makes a frame independent of its batch company, as the tests do).

Reported: ray_over_plain = mean ray wall / mean plain wall (and best / best, first / first; within_5_percent:
ray_over_plain <= 1.05, the acceptance item "--ray auto within 5% of the plain batch"), each run's table rows
(frames, fps, node), the Ray start, versions. Runs after the first plain and ray pair are skipped when --budget-s
(counted from the start of this script) would be exceeded; every command has a timeout inside it. summary.json is
rewritten as each part exists; progress on stdout. TorchServe is stopped and the Ray node stopped (its process group,
then `ray stop` unless --no-ray-stop) whatever happens.
"""
from __future__ import annotations

import argparse
import filecmp
import hashlib
import itertools
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from cli_speed import RATE, sh, start_readme_deployment, stop_deployment, user_env  # noqa: E402

from eden_dev import clips  # noqa: E402
from eden_dev.samples import moving_shapes  # noqa: E402

T0 = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - T0


def log(msg: str) -> None:
    print(f"[{elapsed():6.1f} s] {msg}", flush=True)


# ---------------------------------------------------------------------- inputs
def parse_inputs(spec: str) -> list[tuple[int, int, int, int]]:
    """'480x854:120*6,1080x1920:48*2' -> [(H, W, frames, count), ...] (count 1 when '*N' is left out)."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = re.fullmatch(r"(\d+)x(\d+):(\d+)(?:\*(\d+))?", part)
        if not m:
            raise SystemExit(f"--inputs: {part!r} is not HxW:FRAMES[*COUNT]")
        h, w, n, count = int(m[1]), int(m[2]), int(m[3]), int(m[4] or 1)
        if n < 2 or count < 1:
            raise SystemExit(f"--inputs: {part!r} needs at least 2 frames and 1 clip")
        out.append((h, w, n, count))
    return out


def make_inputs(folder: Path, specs, tag: str = "") -> list[dict]:
    """One .mp4 per clip (moving shapes, each clip of a size moving at its own speed, an AAC track)."""
    folder.mkdir(parents=True)
    made = []
    for h, w, n, count in specs:
        for k in range(count):
            name = f"{tag}{h}x{w}_{k:02d}.mp4"
            clips.write_video(folder / name, moving_shapes(n, h, w, step=h / 40 * (1 + 0.25 * k)), RATE)
            made.append({"name": name, "size": f"{h}x{w}", "frames": n, "bytes": (folder / name).stat().st_size})
    return made


# ---------------------------------------------------------------------- the commands
def batch_command(src: Path, dst: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "eden_client", "batch", str(src), str(dst), *extra]


ROW = re.compile(r"^(done|skipped|failed|interrupted)\s+(\S+)\s+(\S+)\s+(.*)$")


def table_rows(stdout: str) -> list[dict]:
    """The rows of the batch's final table (status, input, detail; frames, fps and node when it says them)."""
    rows = []
    for line in stdout.splitlines():
        m = ROW.match(line)
        if not m:
            continue
        row = {"status": m[1], "input": m[2], "detail": m[4]}
        f = re.search(r"(\d+) -> (\d+) frames, ([\d.]+) fps", m[4])
        if f:
            row.update(frames_in=int(f[1]), frames_out=int(f[2]), fps=float(f[3]))
        node = re.search(r"\[on ([^\],]+)", m[4])
        if node:
            row["node"] = node[1]
        rows.append(row)
    return rows


def run_batch(label: str, cmd: list[str], work: Path, timeout: float) -> dict:
    """One batch command from the working folder as a subprocess (its own process group, killed on timeout): wall
    clock, exit code, the table. stdout/stderr go to WORK/<label>.out / .err."""
    out_path, err_path = work / f"{label}.out", work / f"{label}.err"
    log(f"{label}: {shlex.join(cmd)} (timeout {timeout:.0f} s)")
    with open(out_path, "w") as out, open(err_path, "w") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=work, env=user_env(), stdout=out, stderr=err, start_new_session=True)
        deadline, last_note, timed_out = t + timeout, t, False
        while proc.poll() is None:
            now = time.perf_counter()
            if now > deadline:
                timed_out = True
                kill_group(proc, grace=10)
                break
            if now - last_note >= 15:
                last_note = now
                ended = sum(1 for line in err_path.read_text(errors="replace").splitlines()
                            if re.match(r"(done|failed) ", line))
                log(f"{label}: running {now - t:.0f} s, {ended} input(s) finished")
            time.sleep(0.05)
        wall = time.perf_counter() - t
    stdout = out_path.read_text(errors="replace")
    rows = table_rows(stdout)
    r = {"label": label, "command": shlex.join(cmd), "wall_s": wall, "rc": proc.returncode, "timed_out": timed_out,
         "done": sum(row["status"] == "done" for row in rows), "rows": rows,
         "table_last_line": stdout.strip().splitlines()[-1] if stdout.strip() else ""}
    if proc.returncode or timed_out:
        r["stderr_tail"] = err_path.read_text(errors="replace")[-3000:]
    log(f"{label}: {wall:.2f} s, rc {proc.returncode}{' (timed out)' if timed_out else ''}: {r['table_last_line']}")
    return r


def kill_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM to the process we started, then whatever is left of its process group after ``grace`` s: SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        time.sleep(1 if sig == signal.SIGTERM else 0)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


# ---------------------------------------------------------------------- the Ray node
def ray_executable() -> str:
    """The `ray` beside this Python (the driver's version), else the one on PATH."""
    here = Path(sys.executable).parent / "ray"
    return str(here) if here.exists() else (shutil.which("ray") or "ray")


def config_value(path: Path, key: str) -> str:
    """The last ``key=value`` of a TorchServe config (what eden-node.sh's prop() reads)."""
    values = [line.split("=", 1)[1].strip() for line in path.read_text().splitlines()
              if line.startswith(f"{key}=")]
    return values[-1]


def node_env(work: Path) -> dict:
    """The environment deploy/ray/eden-node.sh gives its `ray start`: where this node's TorchServe is."""
    cfg = work / "config.properties"
    return {**user_env(), "EDEN_NODE_URL": config_value(cfg, "inference_address"),
            "EDEN_MANAGEMENT_URL": config_value(cfg, "management_address"),
            "EDEN_KEY_FILE": str(work / "key_file.json"), "EDEN_NODE_NAME": socket.gethostname(),
            "EDEN_TRANSPORT": "auto",
            # at the end, stop without waiting for a drain (only matters when stopping)
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "2"}


def start_ray(work: Path, extra: list[str], timeout: float) -> tuple[subprocess.Popen, float, list[str]]:
    """`ray start --head --resources '{"eden": 1}' --block` (its own process group); seconds until it says the
    runtime started."""
    cmd = [ray_executable(), "start", "--head", "--resources", json.dumps({"eden": 1}), "--disable-usage-stats",
           "--block", *extra]
    log_path = work / "ray_head.log"
    log(f"ray: {shlex.join(cmd)}")
    t = time.perf_counter()
    with open(log_path, "w") as f:
        proc = subprocess.Popen(cmd, cwd=work, env=node_env(work), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    while True:
        text = log_path.read_text(errors="replace")
        if "Ray runtime started" in text:
            return proc, time.perf_counter() - t, cmd
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited ({proc.returncode}):\n{text[-3000:]}")
        if time.perf_counter() - t > timeout:
            kill_group(proc, grace=5)
            raise TimeoutError(f"ray start not up after {timeout} s:\n{text[-3000:]}")
        time.sleep(0.2)


# ---------------------------------------------------------------------- outputs compared
def _video_frames(path: Path):
    import av
    with av.open(str(path)) as c:
        for frame in c.decode(video=0):
            yield frame.pts, frame.to_ndarray()  # the decoded planes as they are (yuv420p: H*3/2 x W)


def _audio_digest(path: Path) -> tuple[int, str]:
    import av
    h = hashlib.sha256()
    with av.open(str(path)) as c:
        streams = list(c.streams.audio)
        for packet in c.demux(*streams) if streams else ():
            h.update(bytes(packet))
    return len(streams), h.hexdigest()


def compare_file(a: Path, b: Path) -> dict:
    if not a.exists() or not b.exists():
        return {"identical": False, "missing": [str(p) for p in (a, b) if not p.exists()]}
    if filecmp.cmp(a, b, shallow=False):
        return {"identical": True, "bytes_identical": True}
    frames = equal = pts_differ = 0
    max_diff, min_psnr, count_differs = 0, math.inf, False
    for x, y in itertools.zip_longest(_video_frames(a), _video_frames(b)):
        if x is None or y is None:
            count_differs = True
            break
        frames += 1
        pts_differ += x[0] != y[0]
        if x[1].shape != y[1].shape:
            return {"identical": False, "bytes_identical": False, "frame_shape": [x[1].shape, y[1].shape]}
        d = np.abs(x[1].astype(np.int16) - y[1].astype(np.int16))
        m = int(d.max())
        equal += m == 0
        max_diff = max(max_diff, m)
        if m:
            mse = float((d.astype(np.float32) ** 2).mean())
            min_psnr = min(min_psnr, 10 * math.log10(255 ** 2 / mse))
    audio_a, audio_b = _audio_digest(a), _audio_digest(b)
    same = not count_differs and not pts_differ and equal == frames and audio_a == audio_b
    return {"identical": same, "bytes_identical": False, "frames_compared": frames,
            "frame_count_differs": count_differs, "frames_equal": equal, "pts_differ": pts_differ,
            "max_abs_diff": max_diff, "min_psnr_db": None if math.isinf(min_psnr) else min_psnr,
            "audio_streams": [audio_a[0], audio_b[0]], "audio_identical": audio_a == audio_b}


def combined(flags: list) -> bool | None:
    """False if any is False, True if all are True, else None (not all compared)."""
    return False if any(f is False for f in flags) else (True if all(f is True for f in flags) else None)


def compare_runs(ref: Path, other: Path, names: list[str], budget_s: float) -> dict:
    """Each output of ``other`` against the same of ``ref``; the ones not reached within the budget are said so."""
    per = {}
    for name in names:
        per[name] = compare_file(ref / name, other / name) if elapsed() < budget_s else \
            {"identical": False, "not_compared": "--budget-s spent"}
    psnrs = [v["min_psnr_db"] for v in per.values() if v.get("min_psnr_db") is not None]
    compared = [v for v in per.values() if "not_compared" not in v]
    return {"identical": combined([v["identical"] if "not_compared" not in v else None for v in per.values()]),
            "bytes_identical": all(v.get("bytes_identical") for v in per.values()),
            "inputs_identical": sum(v["identical"] for v in per.values()), "inputs": len(per),
            "inputs_compared": len(compared),
            "max_abs_diff": max((v.get("max_abs_diff", 0) for v in per.values()), default=0),
            "min_psnr_db": min(psnrs) if psnrs else None, "per_input": per}


# ---------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", default="480x854:120*6,1080x1920:48*2",
                    help="the batch: HxW:FRAMES*COUNT, comma separated (default %(default)s: 8 clips)")
    ap.add_argument("--order", default="plain,ray,plain,ray",
                    help="the timed runs in order, each 'plain' or 'ray' (default %(default)s; the first plain and "
                         "the first ray always run, the others while --budget-s allows)")
    ap.add_argument("--checkpoint", default=None,
                    help="official-layout checkpoint, e.g. tests/fixtures/eden_tiny/eden_tiny.pt for a CPU dry run "
                         "(default: random real-size weights, as bench/cli_speed.py)")
    ap.add_argument("--workdir", default="/tmp/eden_raybench", help="working folder (emptied first; TorchServe runs "
                                                                      "there and writes key_file.json there)")
    ap.add_argument("--io-dir", default=None,
                    help="where the inputs and outputs go (default: the workdir); a RAM disk such as /dev/shm keeps a "
                         "slow disk out of the measurement")
    ap.add_argument("--out", default="build/ray_batch/summary.json", help="the JSON result")
    ap.add_argument("--build-args", default="",
                    help="extra build_archives.py flags, e.g. \"--batch-size 1\" (default: none, the README's "
                         "deployment)")
    ap.add_argument("--plain-args", default="", help="extra flags for the plain batch, e.g. \"--jobs 2\"")
    ap.add_argument("--ray-args", default="", help="extra flags for the ray batch, e.g. \"--per-node 1\"")
    ap.add_argument("--ray-start-args", default="",
                    help="extra `ray start` flags, e.g. \"--node-ip-address 127.0.0.1 --include-dashboard false\"")
    ap.add_argument("--no-warm", action="store_true",
                    help="no warm-up batches (one short clip per size, plain first and --ray after the Ray start)")
    ap.add_argument("--no-compare", action="store_true", help="do not compare the outputs")
    ap.add_argument("--no-ray-stop", action="store_true",
                    help="after stopping the Ray node started here (its process group), skip `ray stop` (which "
                         "stops every Ray process of this user on the machine: leave it out on a shared machine)")
    ap.add_argument("--budget-s", type=float, default=400,
                    help="seconds from the start of this script after which no further run starts, and within "
                         "which every command must end (default %(default)s; stopping takes ~10-40 s more)")
    args = ap.parse_args()
    specs = parse_inputs(args.inputs)
    order = [x.strip() for x in args.order.split(",") if x.strip()]
    if not {"plain", "ray"} <= set(order) or set(order) - {"plain", "ray"}:
        raise SystemExit("--order: 'plain' and 'ray' at least once each, nothing else")

    out_file, work = Path(args.out).resolve(), Path(args.workdir).resolve()
    io_dir = Path(args.io_dir).resolve() if args.io_dir else work
    out_file.parent.mkdir(parents=True, exist_ok=True)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    in_dir, warm_dir = io_dir / "in", io_dir / "warm_in"
    for p in [in_dir, warm_dir, *io_dir.glob("out_*")]:
        if p.exists() and p != work:
            shutil.rmtree(p)
    import ray  # (only its version; the driver imports it in its own process)
    summary: dict = {
        "what": "python -m eden_client batch IN OUT [--ray auto], wall clock of each command on one host",
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "gpus": torch.cuda.device_count(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "ray": ray.__version__, "host": socket.gethostname(), "io_dir": str(io_dir),
        "checkpoint": args.checkpoint or "random real-size", "build_args": args.build_args,
        "plain_args": args.plain_args, "ray_args": args.ray_args, "order": order, "runs": []}

    def save():
        summary["elapsed_s"] = elapsed()
        out_file.write_text(json.dumps(summary, indent=1, default=str))

    save()
    ray_proc = None
    try:
        # ---- the README's deployment, the inputs made meanwhile (other threads: PyAV encodes without the GIL)
        with ThreadPoolExecutor(2) as pool:
            made = pool.submit(make_inputs, in_dir, specs)
            sizes = sorted({(h, w) for h, w, _, _ in specs})
            warm = pool.submit(make_inputs, warm_dir, [(h, w, 17, 1) for h, w in sizes], "warm_") \
                if not args.no_warm else None
            ckpt = Path(args.checkpoint).resolve() if args.checkpoint else work / "eden.pt"
            log("starting the README deployment (checkpoint, split_weights.py, build_archives.py, torchserve)")
            summary["setup_s"] = start_readme_deployment(work, ckpt, made=not args.checkpoint,
                                                         build_args=args.build_args)
            log(f"deployment ready: {json.dumps(summary['setup_s'], default=float)}")
            summary["inputs"] = made.result()
            if warm:
                warm.result()
        names = [x["name"] for x in summary["inputs"]]
        summary["frames_in"] = sum(x["frames"] for x in summary["inputs"])
        log(f"{len(names)} inputs in {in_dir} ({summary['frames_in']} frames): {args.inputs}")
        save()

        if warm:
            summary["warm_up"] = run_batch("warm", batch_command(warm_dir, io_dir / "out_warm",
                                                                 shlex.split(args.plain_args)),
                                           work, timeout=max(30, args.budget_s - elapsed()))
            save()

        first_plain = None
        seen: set = set()
        counts = {"plain": 0, "ray": 0}
        for kind in order:
            counts[kind] += 1
            label = f"{kind}{counts[kind]}"
            walls = [r["wall_s"] for r in summary["runs"] if r["kind"] == kind]
            left = args.budget_s - elapsed()
            if kind in seen:  # a repeat: only if it fits (its last time, half again for the comparison)
                need = max(walls) * 1.5 + 5 if walls else math.inf
                if need > left:
                    log(f"{label}: skipped, needs ~{need:.0f} s, {left:.0f} s left of --budget-s")
                    summary.setdefault("skipped", []).append(label)
                    save()
                    continue
            if kind == "ray" and ray_proc is None:
                ray_proc, summary["ray_start_s"], cmd = start_ray(work, shlex.split(args.ray_start_args),
                                                                  timeout=max(10, min(120, left)))
                summary["ray_start_command"] = shlex.join(cmd)
                log(f"ray node up in {summary['ray_start_s']:.1f} s")
                save()
                if warm:  # as the plain warm-up: the same short clips, so that neither kind's first run is colder
                    summary["ray_warm_up"] = run_batch(
                        "ray_warm", batch_command(warm_dir, io_dir / "out_ray_warm",
                                                  [*shlex.split(args.ray_args), "--ray", "auto"]),
                        work, timeout=max(10, args.budget_s - elapsed()))
                    save()
                left = args.budget_s - elapsed()
            extra = shlex.split(args.plain_args if kind == "plain" else args.ray_args)
            if kind == "ray":
                extra = [*extra, "--ray", "auto"]
            dst = io_dir / f"out_{label}"
            r = run_batch(label, batch_command(in_dir, dst, extra), work, timeout=max(10, left))
            r["kind"] = kind
            summary["runs"].append(r)
            seen.add(kind)
            save()
            if kind == "plain" and first_plain is None and r["rc"] == 0:
                first_plain = dst
            elif first_plain is not None and not args.no_compare and r["rc"] == 0:
                t = time.perf_counter()
                r["vs_plain1"] = compare_runs(first_plain, dst, names, args.budget_s)
                r["vs_plain1"]["compare_s"] = time.perf_counter() - t
                c = r["vs_plain1"]
                log(f"{label} vs plain1: identical {c['identical']} (bytes {c['bytes_identical']}, "
                    f"{c['inputs_identical']}/{c['inputs']} inputs, max |diff| {c['max_abs_diff']}, "
                    f"min PSNR {c['min_psnr_db']}) in {c['compare_s']:.1f} s")
            ok = [x for x in summary["runs"] if x["rc"] == 0 and not x["timed_out"]]
            plain = [x["wall_s"] for x in ok if x["kind"] == "plain"]
            rays = [x["wall_s"] for x in ok if x["kind"] == "ray"]
            summary["plain_s"], summary["ray_s"] = plain, rays
            if plain and rays:
                summary["ray_over_plain"] = (sum(rays) / len(rays)) / (sum(plain) / len(plain))
                summary["ray_over_plain_best"] = min(rays) / min(plain)
                summary["ray_over_plain_first"] = rays[0] / plain[0]
                summary["within_5_percent"] = summary["ray_over_plain"] <= 1.05
                summary["plain_spread"] = max(plain) / min(plain) - 1 if len(plain) > 1 else None
                summary["ray_spread"] = max(rays) / min(rays) - 1 if len(rays) > 1 else None
            comps = [x["vs_plain1"] for x in ok if x["kind"] == "ray" and "vs_plain1" in x]
            if comps:
                summary["identical"] = combined([c["identical"] for c in comps])
            plain_repeats = [x["vs_plain1"] for x in ok if x["kind"] == "plain" and "vs_plain1" in x]
            if plain_repeats:
                summary["plain_repeat_identical"] = combined([c["identical"] for c in plain_repeats])
            save()
    except BaseException as e:
        summary["error"] = "".join(traceback.format_exception(e))[-4000:]
        save()
        raise
    finally:
        if ray_proc is not None:
            t = time.perf_counter()
            kill_group(ray_proc, grace=30)
            summary["ray_stop_s"] = time.perf_counter() - t
        if not args.no_ray_stop:
            try:
                summary["ray_stop_command_s"] = sh([ray_executable(), "stop"], work, timeout=60)
            except Exception as e:  # noqa: BLE001 - TorchServe is stopped all the same
                log(f"ray stop: {e!r}"[:500])
        stop_deployment(work)
        log("stopped the Ray node and TorchServe")
        save()
    keys = ("device", "cpus", "ray", "ray_start_s", "plain_s", "ray_s", "ray_over_plain", "ray_over_plain_best",
            "within_5_percent", "identical", "plain_repeat_identical", "skipped")
    print(json.dumps({k: summary.get(k) for k in keys}, indent=1, default=float), flush=True)
    print(f"wrote {out_file}", flush=True)


if __name__ == "__main__":
    main()

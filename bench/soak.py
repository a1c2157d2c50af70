#!/usr/bin/env python3
"""Soak: good and hostile requests mixed, from many threads at once, against a CPU deployment of the tiny model.

    python bench/soak.py                        # 16 threads, 150 s; results in bench/results/soak_<s>s_<n>t.json
    python bench/soak.py --threads 16 --duration 30 --out /tmp/soak.json

Issue 17: one hostile request used to fail every request batched with it (82 of 500 good requests in a 30 s soak).
Each thread loops until --duration has passed, sending one request at a time, half of them (--bad-share) picked
from the hostile corpus of tests/helpers_http.py (``hostile_requests``: deeply nested JSON, numbers of thousands of
digits, 10**400 statistics and differences, a grid of 2^31, a field named frame², references that are text, name a
missing segment or end in a newline, frames sent as text), the others good: an encoder request of a pair of PNG
frames or a DiT+decoder request of a good pair blob with a seed. Every request is sent once (no retry), so a good
request counts as failed on any answer but 200 (and a good DiT+decoder answer must be the same PNG each time); a
hostile one counts as wrong unless it got its expected status and message. The workers' pids are checked at the end
(no worker replaced). Batches mix both kinds: the archives batch 4 requests with a 50 ms window.

Reported (stdout and --out JSON): good requests ok / failed, hostile ones refused as expected / wrong, by case,
requests per second, worker restarts, the first errors. Exit code 1 if a good request failed, a hostile one was
answered wrongly, or a worker was replaced. ``tests/test_security.py`` runs ``run`` for 25 s.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "archive_scripts"))

from helpers_http import hostile_requests, noise_frame, png, post  # noqa: E402

from eden_dev.launcher import TorchServe  # noqa: E402
from eden_serve import wire  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "eden_tiny"
MODELS = ("eden_encoder", "eden_ditdec")


def build_store(workdir: Path) -> Path:
    """Split the tiny fixture checkpoint and build CPU archives (batch 4, 50 ms window, a private shm folder)."""
    from build_archives import build

    from eden_serve import checkpoint
    weights, store, shm = workdir / "weights", workdir / "model_store", workdir / "shm"
    checkpoint.split_checkpoint(FIXTURE / "eden_tiny.pt", weights)
    build(weights, store, gpus=0, batch_size=4, max_batch_delay_ms=50,
          settings={"max_pixels": 640 * 480, "shm_dir": str(shm)})
    return store


def run(ts: TorchServe, threads: int = 16, duration: float = 150, bad_share: float = 0.5, seed: int = 0,
        timeout: float = 120) -> dict:
    """The soak against a started TorchServe; returns the report (see the module's docstring)."""
    files = {f"frame{i}": (f"f{i}", (FIXTURE / f"frame{i}.png").read_bytes(), "image/png") for i in (0, 1)}
    r = post(ts, "eden_encoder", files=files, timeout=timeout)
    r.raise_for_status()
    blob = r.content
    frame = png(noise_frame(64, 96))
    good = {"encode": ("eden_encoder", {"files": {"frame0": ("f0", frame, "image/png"),
                                                  "frame1": ("f1", png(noise_frame(64, 96, 1)), "image/png")}}),
            "generate": ("eden_ditdec", {"data": blob, "headers": {"Content-Type": wire.CONTENT_TYPE,
                                                                   "X-Eden-Seed": "7"}})}
    reference = post(ts, "eden_ditdec", timeout=timeout, **good["generate"][1])
    reference.raise_for_status()
    expected = reference.content  # (a batch's neighbours may move a few pixels by one level: not compared bytewise)
    bad = hostile_requests(blob, frame)
    pids = {m: ts.worker_pids(m) for m in MODELS}
    counts: Counter = Counter()
    by_case: Counter = Counter()
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + duration

    def record(name: str, ok: bool, outcome: tuple[str, str], error: str) -> None:
        """Count a request under ``outcome`` (its counts' names when right, when not) and keep the first errors."""
        with lock:
            counts[outcome[0] if ok else outcome[1]] += 1
            by_case[name] += 1
            if not ok and len(errors) < 20:
                errors.append(error)

    def worker(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        while time.monotonic() < deadline:
            if rng.random() < bad_share:
                name = rng.choice(list(bad))
                model, kw, status, words = bad[name]
                try:
                    r = post(ts, model, timeout=timeout, **kw)
                    try:
                        text = str(r.json().get("message"))[:300]
                    except ValueError:
                        text = r.text[:300]
                    right = r.status_code == status and words in text
                except Exception as e:  # noqa: BLE001 - counted
                    right, text = False, f"{type(e).__name__}: {e}"
                record(name, right, ("bad_refused", "bad_wrong"),
                       f"hostile {name}: {getattr(r, 'status_code', '-')} {text}")
            else:
                name = rng.choice(list(good))
                model, kw = good[name]
                try:
                    r = post(ts, model, timeout=timeout, **kw)
                    ok = r.status_code == 200 and (name != "generate" or (
                        r.content[:8] == b"\x89PNG\r\n\x1a\n" and r.headers.get("X-Eden-Seed") == "7"
                        and len(r.content) > len(expected) // 2))
                    text = f"{r.status_code} {r.text[:300] if r.status_code != 200 else '(not the PNG expected)'}"
                except Exception as e:  # noqa: BLE001 - counted
                    ok, text = False, f"{type(e).__name__}: {e}"
                record(name, ok, ("good_ok", "good_failed"), f"good {name}: {text}")

    start = time.monotonic()
    pool = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wall = time.monotonic() - start
    after = {m: ts.worker_pids(m) for m in MODELS}
    total = sum(counts.values())
    return {"threads": threads, "duration_s": duration, "wall_s": round(wall, 1),
            "good_ok": counts["good_ok"], "good_failed": counts["good_failed"],
            "bad_refused": counts["bad_refused"], "bad_wrong": counts["bad_wrong"],
            "requests_per_s": round(total / wall, 1), "by_case": dict(sorted(by_case.items())),
            "workers_replaced": sum(len(set(pids[m]) - set(after[m])) for m in MODELS), "errors": errors}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--duration", type=float, default=150, help="seconds (default 150)")
    ap.add_argument("--bad-share", type=float, default=0.5, help="share of hostile requests (default 0.5)")
    ap.add_argument("--model-store", default=None, help="archives to serve (default: built from the tiny fixture)")
    ap.add_argument("--out", default=None, help="JSON report (default: bench/results/soak_<s>s_<n>t.json)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="eden_soak_") as tmp:
        workdir = Path(tmp)
        store = Path(args.model_store) if args.model_store else build_store(workdir)
        with TorchServe(workdir / "serve", store) as ts:
            print(f"soak: {args.threads} threads for {args.duration:.0f} s against {ts.inference_url}", flush=True)
            report = run(ts, args.threads, args.duration, args.bad_share)
    out = Path(args.out or ROOT / "bench" / "results" / f"soak_{args.duration:.0f}s_{args.threads}t.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"soak: good {report['good_ok']} ok, {report['good_failed']} failed; hostile {report['bad_refused']} "
          f"refused as expected, {report['bad_wrong']} wrong; {report['requests_per_s']} requests/s; "
          f"{report['workers_replaced']} workers replaced; report {out}")
    for e in report["errors"][:5]:
        print("  error:", e)
    return 1 if report["good_failed"] or report["bad_wrong"] or report["workers_replaced"] else 0


if __name__ == "__main__":
    sys.exit(main())

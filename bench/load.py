#!/usr/bin/env python3
"""Load test: N concurrent clients against a CPU deployment of the small model, on loopback, for a bounded time.

    python bench/load.py                       # 8 clients, 10 minutes, tiny fixture model, results in bench/results/
    python bench/load.py --duration 30 --out /tmp/load.json

It builds the archives of the tiny official-layout checkpoint (tests/fixtures/eden_tiny) on CPU unless given
--model-store, starts its own TorchServe on free loopback ports, and runs ``--clients`` threads. Each client loops:
encode a pair of frames (eden_encoder), make its middle frame with a fixed seed (eden_ditdec), check the answer
(a PNG of the right size, the seed echoed, and within one level of the first answer for the same pair and seed),
until ``--duration`` seconds have passed or ``--max-requests`` pairs were sent. The clients use the production
retry policy (eden_client/model_client.py RetryPolicy); a pair counts as failed if it still fails after it, or is wrong.

Reported (stdout and --out JSON): pairs and HTTP requests done and failed, retries, latency of a pair
(encode + generate) p50/p90/p99/max, throughput, and the resident memory of TorchServe's frontend (Java and its
launcher) and workers sampled every --sample-s seconds, with a least-squares slope (MB/min) after the warm-up to
show a growth trend if there is one (also over the second half alone: the JVM's heap grows for a while before it
settles), with the host's 1-minute load average (other processes on the host slow the clients down). Exit code 1
if any pair failed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "archive_scripts"))

from helpers_http import eden_client, png, tree_rss  # noqa: E402

from eden_client.errors import ServeError  # noqa: E402
from eden_client.model_client import RetryPolicy  # noqa: E402
from eden_dev.launcher import TorchServe  # noqa: E402
from eden_serve import images  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "eden_tiny" / "eden_tiny.pt"


def build_store(workdir: Path) -> Path:
    """Split the tiny fixture checkpoint and build CPU archives (production batching: batch 4, 10 ms delay)."""
    from build_archives import build

    from eden_serve import checkpoint
    weights, store = workdir / "weights", workdir / "model_store"
    checkpoint.split_checkpoint(FIXTURE, weights)
    build(weights, store, gpus=0, batch_size=4, max_batch_delay_ms=10)
    return store


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def slope_per_min(samples: list[list[float]], column: int) -> float:
    """Least-squares slope of samples[:, column] (MB) against samples[:, 0] (s), in MB per minute."""
    if len(samples) < 3:
        return 0.0
    a = np.asarray(samples, dtype=float)
    return float(np.polyfit(a[:, 0], a[:, column], 1)[0] * 60)


class Load:
    def __init__(self, ts: TorchServe, args):
        self.ts, self.args = ts, args
        self.client = eden_client(ts, timeout=args.timeout, retry=RetryPolicy(max_elapsed=args.timeout * 3))
        h, w = args.height, args.width
        rng = np.random.default_rng(0)
        base = rng.integers(0, 256, (h, w + 4 * args.pairs, 3), dtype=np.uint8)
        self.pairs = [[png(np.ascontiguousarray(base[:, 4 * i:4 * i + w])),
                       png(np.ascontiguousarray(base[:, 4 * i + 4:4 * i + 4 + w]))] for i in range(args.pairs)]
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.ok = self.failed = self.sent = 0
        self.errors: list[str] = []
        self.first: dict[tuple[int, int], np.ndarray] = {}
        self.stop = threading.Event()
        self.rss: list[list[float]] = []

    def take(self) -> int | None:
        """The number of the next pair to send, or None when the time or request budget is spent."""
        with self.lock:
            if self.stop.is_set() or self.sent >= self.args.max_requests:
                return None
            self.sent += 1
            return self.sent

    def check(self, key: tuple[int, int], png_bytes: bytes, seed: int) -> str | None:
        if seed != key[1]:
            return f"seed {seed} echoed for seed {key[1]}"
        frame = images.decode_image(png_bytes, max_pixels=1 << 30)
        if frame.shape != (self.args.height, self.args.width, 3):
            return f"frame of shape {frame.shape}"
        with self.lock:
            first = self.first.setdefault(key, frame)
        if np.abs(first.astype(int) - frame.astype(int)).max() > 1:
            return f"pair {key[0]} seed {key[1]}: not the frame it gave before"
        return None

    def client_loop(self, index: int) -> None:
        while (n := self.take()) is not None:
            key = (n % len(self.pairs), n % 7)
            start = time.perf_counter()
            try:
                png_bytes, seed = self.client.generate(self.client.encode(self.pairs[key[0]]), key[1])
                problem = self.check(key, png_bytes, seed)
            except ServeError as e:
                problem = str(e)
            elapsed = time.perf_counter() - start
            with self.lock:
                if problem is None:
                    self.ok += 1
                    self.latencies.append(elapsed)
                else:
                    self.failed += 1
                    if len(self.errors) < 20:
                        self.errors.append(problem)

    def sampler(self, t0: float) -> None:
        while True:
            rss = tree_rss(self.ts.process.pid)
            self.rss.append([round(time.monotonic() - t0, 1), round(rss["frontend"] / 2**20, 1),
                             round(rss["workers"] / 2**20, 1), round(os.getloadavg()[0], 2)])
            if self.stop.wait(self.args.sample_s):
                return

    def run(self) -> dict:
        args = self.args
        t0 = time.monotonic()
        sampler = threading.Thread(target=self.sampler, args=(t0,), daemon=True)
        sampler.start()
        threads = [threading.Thread(target=self.client_loop, args=(i,), daemon=True) for i in range(args.clients)]
        for t in threads:
            t.start()
        last = t0
        while any(t.is_alive() for t in threads):
            if time.monotonic() - t0 >= args.duration:
                self.stop.set()
            if time.monotonic() - last >= 30:
                last = time.monotonic()
                print(f"  {last - t0:5.0f} s: {self.ok} ok, {self.failed} failed, RSS {self.rss[-1][1:]} MB",
                      flush=True)
            time.sleep(0.2)
            if time.monotonic() - t0 > args.duration + 3 * args.timeout + 60:
                raise SystemExit("load: clients did not stop in time")
        wall = time.monotonic() - t0
        self.stop.set()
        sampler.join(timeout=30)
        rss = tree_rss(self.ts.process.pid)
        self.rss.append([round(time.monotonic() - t0, 1), round(rss["frontend"] / 2**20, 1),
                         round(rss["workers"] / 2**20, 1), round(os.getloadavg()[0], 2)])
        return self.report(wall)

    def report(self, wall: float) -> dict:
        args, lat = self.args, [x * 1000 for x in self.latencies]
        warm = [s for s in self.rss if s[0] >= min(args.warmup_s, wall / 3)]
        late = [s for s in self.rss if s[0] >= wall / 2]

        def slopes(samples):
            return {"frontend": round(slope_per_min(samples, 1), 3), "workers": round(slope_per_min(samples, 2), 3),
                    "total": round(slope_per_min([[s[0], s[1] + s[2]] for s in samples], 1), 3)}

        retries = self.client.encoder.retries + self.client.ditdec.retries
        return {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "config": {"clients": args.clients, "duration_s": args.duration, "max_requests": args.max_requests,
                       "frame": [args.height, args.width], "model": "tests/fixtures/eden_tiny (CPU)",
                       "timeout_s": args.timeout},
            "wall_s": round(wall, 1),
            "requests": {"ok": self.ok, "failed": self.failed, "http_requests": 2 * (self.ok + self.failed),
                         "retries": dict(retries), "errors": self.errors},
            "latency_ms": {"p50": round(percentile(lat, 50), 1), "p90": round(percentile(lat, 90), 1),
                           "p99": round(percentile(lat, 99), 1), "max": round(max(lat, default=0), 1),
                           "mean": round(float(np.mean(lat)) if lat else 0, 1)},
            "throughput": {"pairs_per_s": round(self.ok / wall, 2), "http_requests_per_s": round(2 * self.ok / wall, 2)},
            "rss_mb": {"samples": self.rss, "columns": ["t_s", "frontend", "workers", "host_load_1min"],
                       "first_after_warmup": warm[0] if warm else None, "last": self.rss[-1] if self.rss else None,
                       "slope_mb_per_min": slopes(warm), "slope_mb_per_min_second_half": slopes(late),
                       "warmup_excluded_s": min(args.warmup_s, wall / 3)},
        }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    ap.add_argument("--max-requests", type=int, default=200_000, help="upper bound on pairs sent")
    ap.add_argument("--height", type=int, default=96)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--pairs", type=int, default=16, help="distinct frame pairs cycled through")
    ap.add_argument("--timeout", type=float, default=60, help="per-try timeout of a request (s)")
    ap.add_argument("--sample-s", type=float, default=5, help="memory sampling period (s)")
    ap.add_argument("--warmup-s", type=float, default=60, help="samples before this are left out of the trend")
    ap.add_argument("--model-store", default=None, help="archives to serve (default: built from the tiny fixture)")
    ap.add_argument("--workdir", default=None, help="TorchServe's folder (default: a temporary one)")
    ap.add_argument("--out", default=None, help="JSON report (default: bench/results/load_<duration>s_<clients>c.json)")
    args = ap.parse_args(argv)

    tmp = tempfile.TemporaryDirectory(prefix="eden_load_") if args.workdir is None else None
    workdir = Path(args.workdir or tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    store = Path(args.model_store) if args.model_store else build_store(workdir)
    ts = TorchServe(workdir / "serve", store)
    assert ts.inference_url.startswith("http://127.0.0.1:"), "loopback only"
    ts.start()
    try:
        print(f"load: {args.clients} clients for {args.duration:.0f} s against {ts.inference_url} "
              f"({args.height}x{args.width} pairs, tiny model on CPU)", flush=True)
        report = Load(ts, args).run()
    finally:
        ts.stop()
        if tmp is not None:
            tmp.cleanup()
    out = Path(args.out or ROOT / "bench" / "results" / f"load_{args.duration:.0f}s_{args.clients}c.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    r, lat, rss = report["requests"], report["latency_ms"], report["rss_mb"]
    print(f"load: {r['ok']} pairs ok, {r['failed']} failed, retries {r['retries']} in {report['wall_s']} s; "
          f"pair latency p50 {lat['p50']} ms, p99 {lat['p99']} ms; {report['throughput']['pairs_per_s']} pairs/s; "
          f"RSS MB {rss['first_after_warmup']} -> {rss['last']} (t, frontend, workers, load), slope MB/min "
          f"{rss['slope_mb_per_min']} (second half {rss['slope_mb_per_min_second_half']}); report {out}")
    for e in r["errors"][:5]:
        print("  error:", e)
    return 1 if r["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

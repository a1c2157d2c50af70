"""Scale on paper: a batch of videos over a Ray cluster (python -m client batch --ray), throughput against node count,
and which part stops the scaling: the nodes themselves, the driver, Ray's scheduler or the shared storage.

    python bench/cluster_sim.py                       # 10,000 videos, 1..128 nodes, the scenarios below
    python bench/cluster_sim.py --nodes 1,8,64 --videos 2000 --json

A fluid discrete-event model, pure Python, a few seconds. Between two events (an input dispatched, started or
finished) every running input advances at a constant rate, the slowest of what it shares:

* its node's GPUs: each node is a whole deployment (encoder on GPU 0, the DiT+decoder on the other GPUs); a
  generated frame costs one DiT+decoder GPU ``t(px)`` seconds, a power law through the measured deployment
  (README "Speed", 2x H100, shm + device handoff: 0.0157 s at 480x854, 0.0375 s at 1080x1920); the node's
  DiT+decoder GPUs are shared equally by its running inputs (``--per-node`` of them);
* its node's CPUs: decoding the input and encoding the output (x264) in Mpx/s for the whole node, shared equally;
* the shared storage: reading the input and writing the output, ``--storage-gbs`` for the whole cluster shared
  equally by all running inputs, and at most ``--nic-gbs`` per node;
* Ray: dispatching a task takes the scheduler ``--sched-ms`` (one at a time for the cluster), and an input spends
  ``--task-overhead-s`` starting (worker, connection, opening the files, first chunk) using nothing;
* the driver: before anything runs it opens every input once to count its frames (``--probe-ms`` each, one at a
  time: what client.batch does today), then handles each result and polls the progress actor twice a second.

Every assumption is a flag; the defaults are printed with the results. Not modelled: the encoder GPU (a few percent
of the work, README), network inside a node (shared memory), TorchServe start-up (nodes join warm), node failures
(see README "Many machines (Ray)": a lost node costs its running inputs' work, redone elsewhere).
"""
from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field

RES = {  # name: (height, width, share of the videos, input bitrate Mbit/s)
    "480p": (480, 854, 0.20, 2.5),
    "720p": (720, 1280, 0.30, 5.0),
    "1080p": (1080, 1920, 0.45, 8.0),
    "1440p": (1440, 2560, 0.05, 16.0),
}
FPS = ((24, 0.25), (25, 0.15), (30, 0.45), (60, 0.15))
T480, T1080 = 0.0157, 0.0375  # measured s per generated frame, one DiT+decoder GPU (README "Speed")
PX480, PX1080 = 480 * 854, 1080 * 1920
ALPHA = math.log(T1080 / T480) / math.log(PX1080 / PX480)


def dit_seconds(px: int) -> float:
    return T480 * (px / PX480) ** ALPHA


@dataclass
class Video:
    frames: int
    px: int
    in_bytes: float
    out_bytes: float
    gpu_s: float = 0.0  # DiT+decoder GPU seconds
    cpu_mpx: float = 0.0  # decode + encode, megapixels


def make_videos(n: int, factor: int, seed: int, short: bool = False) -> list[Video]:
    rng = random.Random(seed)
    names, weights = list(RES), [RES[r][2] for r in RES]
    out = []
    for _ in range(n):
        h, w, _, mbps = RES[rng.choices(names, weights)[0]]
        fps = rng.choices([f for f, _ in FPS], [p for _, p in FPS])[0]
        if short:  # clips: 2-10 s
            seconds = rng.uniform(2, 10)
        else:  # long tail: median 90 s, a few over an hour, at most 2 h
            seconds = min(7200.0, max(5.0, rng.lognormvariate(math.log(90), 1.0)))
        frames = max(2, int(seconds * fps))
        gen = (frames - 1) * (factor - 1)
        in_bytes = mbps / 8 * 1e6 * seconds
        v = Video(frames, h * w, in_bytes, in_bytes * factor * 1.25)  # CRF 18 output: a little richer per frame
        v.gpu_s = gen * dit_seconds(h * w)
        v.cpu_mpx = (frames + (frames - 1) * factor + 1) * h * w / 1e6  # decode every input, encode every output
        out.append(v)
    return out


@dataclass
class Params:
    gpus_per_node: int = 8
    per_node: int = 2
    cpu_mpx_s: float = 800.0  # decode+encode per node (x264 on ~32 cores, or a hardware encoder)
    storage_gbs: float = 2.0  # shared storage, whole cluster (a typical NFS filer)
    nic_gbs: float = 3.0  # per node (25 Gbit/s)
    sched_ms: float = 2.0
    task_overhead_s: float = 2.0
    probe_ms: float = 30.0
    driver_result_ms: float = 5.0
    tracker_msg_us: float = 100.0  # the progress actor, per message (each running input sends 2 a second)


@dataclass
class Result:
    scenario: str
    nodes: int
    videos: int
    makespan_s: float
    prescan_s: float
    throughput_fps: float  # output frames per second, whole batch including the prescan
    speedup: float = 0.0
    efficiency: float = 0.0
    util: dict = field(default_factory=dict)
    bottleneck: str = ""


def simulate(videos: list[Video], nodes: int, p: Params, scenario: str = "") -> Result:
    dit_gpus = max(1, p.gpus_per_node - 1)
    prescan = len(videos) * p.probe_ms / 1000
    queue = list(reversed(range(len(videos))))  # the driver submits in the tree's order
    free = {n: p.per_node for n in range(nodes)}
    t, sched_free_at = prescan, prescan
    starting: list[tuple[float, int, int]] = []  # (ready at, video, node)
    running: dict[int, tuple[int, float]] = {}  # video -> (node, fraction left)
    busy = {"gpu": 0.0, "cpu": 0.0, "storage": 0.0, "sched": 0.0, "driver": prescan, "tracker": 0.0}
    total_out = sum((v.frames - 1) * 2 + 1 for v in videos)

    def rates():
        per_node: dict[int, int] = {}
        for n, _ in running.values():
            per_node[n] = per_node.get(n, 0) + 1
        k = max(1, len(running))
        storage_share = p.storage_gbs * 1e9 / k
        out, use = {}, {"gpu": 0.0, "cpu": 0.0, "storage": 0.0}
        for vid, (n, left) in running.items():
            v, kn = videos[vid], per_node[n]
            io = min(storage_share, p.nic_gbs * 1e9 / kn)
            r = min(dit_gpus / kn / v.gpu_s if v.gpu_s else math.inf, p.cpu_mpx_s / kn / v.cpu_mpx,
                    io / (v.in_bytes + v.out_bytes))
            out[vid] = r
            use["gpu"] += r * v.gpu_s / dit_gpus
            use["cpu"] += r * v.cpu_mpx / p.cpu_mpx_s
            use["storage"] += r * (v.in_bytes + v.out_bytes) / (p.storage_gbs * 1e9)
        return out, use

    while queue or starting or running:
        # dispatch into free slots (the scheduler, one task at a time)
        while queue and any(free.values()) and sched_free_at <= t:
            n = max(free, key=lambda x: free[x])
            free[n] -= 1
            vid = queue.pop()
            sched_free_at = max(sched_free_at, t) + p.sched_ms / 1000
            busy["sched"] += p.sched_ms / 1000
            heapq.heappush(starting, (sched_free_at + p.task_overhead_s, vid, n))
        r, use = rates()
        nxt = [starting[0][0]] if starting else []
        if queue and any(free.values()):
            nxt.append(sched_free_at)
        for vid, rate in r.items():
            nxt.append(t + running[vid][1] / rate)
        t_next = max(t, min(nxt))
        dt = t_next - t
        for k in use:
            busy[k] += use[k] * dt / nodes if k in ("gpu", "cpu") else use[k] * dt
        busy["tracker"] += len(running) * 2 * p.tracker_msg_us / 1e6 * dt
        busy["driver"] += len(running) * 20e-6 * 2 * dt  # polling: a few µs per running input, twice a second
        for vid in list(running):
            n, left = running[vid]
            left -= r[vid] * dt
            if left <= 1e-9:
                del running[vid]
                free[n] += 1
                busy["driver"] += p.driver_result_ms / 1000
            else:
                running[vid] = (n, left)
        t = t_next
        while starting and starting[0][0] <= t + 1e-12:
            _, vid, n = heapq.heappop(starting)
            running[vid] = (n, 1.0)
    makespan = t
    util = {k: round(v / makespan, 3) for k, v in busy.items()}
    return Result(scenario, nodes, len(videos), round(makespan, 1), round(prescan, 1),
                  round(total_out / makespan, 1), util=util,
                  bottleneck=max(util, key=lambda k: util[k]))


SCENARIOS = {
    "baseline": ({}, False, "10k videos (median 90 s, long tail to 2 h), NFS 2 GB/s"),
    "fast-storage": ({"storage_gbs": 20.0}, False, "the same on a parallel file system (20 GB/s)"),
    "short-clips": ({}, True, "10k clips of 2-10 s: per-input overheads weigh"),
    "no-prescan": ({"probe_ms": 0.0}, False, "baseline without the driver's frame count before dispatch"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", type=int, default=10000)
    ap.add_argument("--nodes", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--factor", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    for f, v in asdict(Params()).items():
        ap.add_argument("--" + f.replace("_", "-"), type=type(v), default=v)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    base = Params(**{f: getattr(args, f) for f in asdict(Params())})
    node_counts = [int(x) for x in args.nodes.split(",")]
    t0 = time.perf_counter()
    runs = []
    for name in args.scenarios.split(","):
        overrides, short, _ = SCENARIOS[name]
        params = Params(**{**asdict(base), **overrides})
        videos = make_videos(args.videos, args.factor, args.seed, short)
        one = None
        for n in node_counts:
            res = simulate(videos, n, params, name)
            one = one or res.throughput_fps / n
            res.speedup = round(res.throughput_fps / one, 2)
            res.efficiency = round(res.throughput_fps / one / n, 3)
            runs.append(res)
    if args.json:
        print(json.dumps({"params": asdict(base), "alpha": ALPHA, "runs": [asdict(r) for r in runs]}, indent=1))
        return 0
    print(f"assumptions: {asdict(base)}; DiT+decoder s/frame = {T480} * (px/480p)^{ALPHA:.3f} per GPU "
          f"({dit_seconds(PX1080):.4f} s at 1080p); {args.videos} inputs, x{args.factor}")
    for name in args.scenarios.split(","):
        print(f"\n{name}: {SCENARIOS[name][2]}")
        print(f"  {'nodes':>5} {'makespan':>10} {'prescan':>8} {'out fps':>9} {'speedup':>8} {'eff':>5}  "
              f"{'gpu':>5} {'cpu':>5} {'storage':>7} {'sched':>5} {'driver':>6} {'tracker':>7}  bottleneck")
        for r in (r for r in runs if r.scenario == name):
            u = r.util
            print(f"  {r.nodes:>5} {r.makespan_s / 3600:>9.2f}h {r.prescan_s:>7.0f}s {r.throughput_fps:>9.0f} "
                  f"{r.speedup:>8.1f} {r.efficiency:>5.2f}  {u['gpu']:>5.2f} {u['cpu']:>5.2f} {u['storage']:>7.2f} "
                  f"{u['sched']:>5.3f} {u['driver']:>6.2f} {u['tracker']:>7.3f}  {r.bottleneck}")
    print(f"\n({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

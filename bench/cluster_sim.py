"""Scale on paper: a batch of videos over a Ray cluster (python -m eden_client batch --ray), throughput against node
count, and which part stops the scaling: the nodes themselves, the driver, Ray's scheduler or the shared storage.

    python bench/cluster_sim.py                       # 10,000 videos, 1..128 nodes, the scenarios below
    python bench/cluster_sim.py --nodes 1,8,64 --videos 2000 --json

A fluid discrete-event model, pure Python, under 20 s for the defaults (10,000 inputs, 5 scenarios, 6 sizes). Between two events (an input dispatched, started or
finished) every running input advances at a constant rate, the slowest of what it shares:

* its node's GPUs: each node is a whole deployment (both models on its GPUs); a
  generated frame costs one DiT+decoder GPU ``t(px)`` seconds, a power law through the measured deployment
  (README "Speed", 2x H100, shm + device handoff: 0.0157 s at 480x854, 0.0375 s at 1080x1920); the node's
  DiT+decoder GPUs are shared equally by its running inputs (``--per-node`` of them);
* its node's CPUs: decoding the input and encoding the output (x264) in Mpx/s for the whole node, shared equally;
* the shared storage: reading the input and writing the output, ``--storage-gbs`` for the whole cluster shared
  equally by all running inputs, and at most ``--nic-gbs`` per node;
* Ray: dispatching a task takes the scheduler ``--sched-ms`` (one at a time for the cluster), and an input spends
  ``--task-overhead-s`` starting (worker, connection, opening the files, first chunk) using nothing;
* the driver: before anything runs it opens every input once to count its frames (``--probe-ms`` each, one at a
  time: what eden_client.batch does today), then handles each result and polls the progress actor twice a second.

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
    occupancy: float = 0.0  # share of the nodes' input slots busy over the makespan (low: idle nodes at the end)
    util: dict = field(default_factory=dict)  # busy share of each shared part over the makespan
    bound: dict = field(default_factory=dict)  # share of input-seconds limited by the node GPUs, CPUs or storage
    bottleneck: str = ""


def simulate(videos: list[Video], nodes: int, p: Params, scenario: str = "", order: str = "largest",
             prescan: bool = False) -> Result:
    """``order``: "largest" (what batch --ray submits first: the biggest inputs) or "tree" (the tree's order);
    ``prescan``: the driver opens every input before dispatching (what the plain batch does)."""
    dit_gpus = max(1, p.gpus_per_node - 1)
    storage, nic = p.storage_gbs * 1e9, p.nic_gbs * 1e9
    n_vid = len(videos)
    gpu_s = [v.gpu_s for v in videos]
    cpu = [v.cpu_mpx for v in videos]
    io = [v.in_bytes + v.out_bytes for v in videos]
    ids = sorted(range(n_vid), key=lambda i: videos[i].in_bytes) if order == "largest" \
        else list(reversed(range(n_vid)))
    queue = ids  # pop() takes from the end: the largest, or the first of the tree
    t0 = n_vid * p.probe_ms / 1000 if prescan else 0.0
    t = sched_free_at = t0
    free_nodes = [(n, t0) for n in range(nodes) for _ in range(p.per_node)]  # (node, free since) per slot
    starting: list[tuple[float, int, int]] = []
    run_ids: list[int] = []
    run_node: list[int] = []
    run_left: list[float] = []
    per_node = [0] * nodes
    busy = {"sched": 0.0, "driver": t0, "tracker": 0.0, "storage": 0.0}
    bound = {"gpu": 0.0, "cpu": 0.0, "storage": 0.0}
    slot_s = 0.0
    sched_s, overhead, result_s = p.sched_ms / 1000, p.task_overhead_s, p.driver_result_ms / 1000
    min_step = 0.05  # s: finishing up to this late changes nothing at the scale of inputs of seconds to hours
    while queue or starting or run_ids:
        while queue and free_nodes and sched_free_at <= t:  # what the scheduler could dispatch by now
            n, since = free_nodes.pop()
            vid = queue.pop()
            sched_free_at = max(sched_free_at, since) + sched_s
            busy["sched"] += sched_s
            heapq.heappush(starting, (sched_free_at + overhead, vid, n))
        k = len(run_ids)
        share = storage / k if k else 0.0
        rates = []
        io_use = 0.0
        nxt = starting[0][0] if starting else math.inf
        if queue and free_nodes:
            nxt = min(nxt, sched_free_at)
        cpu_rate, nic_share = p.cpu_mpx_s, {}
        n_gpu = n_cpu = n_io = 0
        for j in range(k):
            vid, kn = run_ids[j], per_node[run_node[j]]
            rg = dit_gpus / kn / gpu_s[vid]
            rc = cpu_rate / kn / cpu[vid]
            ri = (share if share < nic / kn else nic / kn) / io[vid]
            if rg <= rc and rg <= ri:
                r = rg
                n_gpu += 1
            elif rc <= ri:
                r = rc
                n_cpu += 1
            else:
                r = ri
                n_io += 1
            rates.append(r)
            io_use += r * io[vid]
            end = t + run_left[j] / r
            if end < nxt:
                nxt = end
        nxt = max(nxt, t + min_step) if k else nxt  # events closer than min_step are handled together
        dt = max(0.0, nxt - t)
        busy["storage"] += io_use / storage * dt
        busy["tracker"] += k * 2 * p.tracker_msg_us / 1e6 * dt
        busy["driver"] += k * 2 * 20e-6 * dt  # polling the progress actor: a few µs per running input
        slot_s += (k + len(starting)) * dt
        bound["gpu"] += n_gpu * dt
        bound["cpu"] += n_cpu * dt
        bound["storage"] += n_io * dt
        t = nxt
        j = 0
        while j < len(run_ids):
            left = run_left[j] - rates[j] * dt
            if left <= 1e-9:
                n = run_node[j]
                per_node[n] -= 1
                free_nodes.append((n, t - max(0.0, -left / rates[j])))
                busy["driver"] += result_s
                for lst in (run_ids, run_node, run_left, rates):
                    lst[j] = lst[-1]
                    lst.pop()
            else:
                run_left[j] = left
                j += 1
        while starting and starting[0][0] <= t + 1e-12:
            _, vid, n = heapq.heappop(starting)
            run_ids.append(vid)
            run_node.append(n)
            run_left.append(1.0)
            per_node[n] += 1
    makespan = t
    total_out = sum((v.frames - 1) * 2 + 1 for v in videos)
    util = {k: round(v / makespan, 3) for k, v in busy.items()}
    total_bound = sum(bound.values()) or 1.0
    bound = {k: round(v / total_bound, 3) for k, v in bound.items()}
    occupancy = slot_s / (nodes * p.per_node * makespan)
    if util["driver"] >= 0.5:
        what = "driver" + (" (its prescan)" if prescan and t0 / makespan > 0.25 else "")
    elif util["sched"] >= 0.5 or util["tracker"] >= 0.5:
        what = "Ray scheduler" if util["sched"] >= util["tracker"] else "progress actor"
    elif bound["storage"] >= 0.5:
        what = "shared storage"
    elif occupancy < 0.85:
        what = "tail: nodes idle while the last long inputs finish" if t0 / makespan < 0.1 else "driver prescan"
    else:
        what = f"nodes ({max(('gpu', 'cpu'), key=lambda x: bound[x]).upper()})"
    return Result(scenario, nodes, n_vid, round(makespan, 1), round(t0, 1), round(total_out / makespan, 1),
                  occupancy=round(occupancy, 3), util=util, bound=bound, bottleneck=what)


SCENARIOS = {  # name: (Params overrides, short clips, order, driver prescan, description)
    "baseline": ({}, False, "largest", False,
                 "batch --ray as built: mixed videos (median 90 s, tail to 2 h), largest first, NFS 2 GB/s"),
    "tree-order+prescan": ({}, False, "tree", True,
                           "the plain batch's way: the driver opens every input first, then the tree's order"),
    "hw-encoder": ({"cpu_mpx_s": 4000.0}, False, "largest", False,
                   "baseline with the video encoding off the CPUs (a hardware encoder): GPU-bound nodes"),
    "hw-encoder+fast-storage": ({"cpu_mpx_s": 4000.0, "storage_gbs": 20.0}, False, "largest", False,
                                "the same on a parallel file system (20 GB/s)"),
    "short-clips": ({}, True, "largest", False, "clips of 2-10 s: per-input overheads weigh"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", type=int, default=10000)
    ap.add_argument("--nodes", default="1,8,32,64,128,256")
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
        overrides, short, order, prescan, _ = SCENARIOS[name]
        params = Params(**{**asdict(base), **overrides})
        videos = make_videos(args.videos, args.factor, args.seed, short)
        one = None
        for n in node_counts:
            res = simulate(videos, n, params, name, order, prescan)
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
        print(f"\n{name}: {SCENARIOS[name][-1]}")
        print(f"  {'nodes':>5} {'makespan':>9} {'out fps':>8} {'speedup':>7} {'eff':>5} {'busy':>5}  "
              f"{'bound by gpu/cpu/storage':>24}  {'storage':>7} {'sched':>6} {'driver':>6} {'actor':>6}  bottleneck")
        for r in (r for r in runs if r.scenario == name):
            u, b = r.util, r.bound
            print(f"  {r.nodes:>5} {r.makespan_s / 3600:>8.2f}h {r.throughput_fps:>8.0f} {r.speedup:>7.1f} "
                  f"{r.efficiency:>5.2f} {r.occupancy:>5.2f}  {b['gpu']:>8.2f}/{b['cpu']:.2f}/{b['storage']:.2f}"
                  f"{'':>5}  {u['storage']:>7.2f} {u['sched']:>6.3f} {u['driver']:>6.3f} {u['tracker']:>6.3f}  "
                  f"{r.bottleneck}")
    print(f"\n({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The token copies alone, two processes as the two workers are (GPU host, 2 GPUs):

    python bench/handoff_gpu.py [--size 1080x1920] [--frames 4] [--repeat 20] [--out FILE]

A producer process on cuda:0 holds an encoder answer's tokens ([frames, 2, N, 768] float16 at --size) and moves
them out both ways the encoder can: (host) copied into a new shared-memory segment, as ``EncoderService.write_tokens``
does; (device) exported with ``handoff.export`` (nothing copied). A consumer process on cuda:1 takes them in the way
the DiT+decoder does, one frame at a time: (host) mapped and uploaded with ``tokens.array_tensor``; (device)
``handoff.import_copy`` both ways it can map the memory (in its own context with peer access; in the encoder
GPU's context, then cuMemcpyPeer). Reports milliseconds per frame
for each side and path (medians), in the same run, and checks the frames are equal.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from eden_serve import handoff, shm, tokens, wire  # noqa: E402
from eden_serve.serving import EncoderService  # noqa: E402


def padded(size: str) -> tuple[int, int]:
    h, w = (int(v) for v in size.split("x"))
    return -(-h // 32) * 32, -(-w // 32) * 32


def shape_for(size: str, frames: int) -> tuple[int, ...]:
    ph, pw = padded(size)
    return frames, 2, (ph // 16) * (pw // 16), 768


def producer(conn, size: str, shape, repeat: int, shm_dir: str) -> None:
    torch.manual_seed(0)
    gpu = torch.randn(shape, device="cuda:0").half()
    torch.cuda.synchronize()
    meta = wire.TokenBlob(wire.shape_only(shape, "float16"), padded(size), (0, 0, 0, 0), 16, [0.0] * shape[0],
                          [1.0] * shape[0], [0.0] * (shape[0] - 1))
    svc = EncoderService.__new__(EncoderService)
    svc.store = shm.ShmStore(shm_dir)
    host, name = [], None
    for _ in range(repeat):
        if name:
            svc.store.unlink(name)
        t = time.perf_counter()
        name = svc.write_tokens(meta, gpu).name
        host.append(time.perf_counter() - t)
    device = []
    for _ in range(repeat):
        t = time.perf_counter()
        desc = handoff.export(gpu)
        device.append(time.perf_counter() - t)
    conn.send(json.dumps({"segment": name, "desc": desc, "host_s": host, "device_s": device}))
    conn.recv()
    svc.store.unlink(name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1080x1920")
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    shape = shape_for(args.size, args.frames)
    consumer = torch.device("cuda", torch.cuda.device_count() - 1)
    shm_dir = tempfile.mkdtemp(prefix="eden-handoff-", dir="/dev/shm")
    spawn = multiprocessing.get_context("spawn")
    parent, child = spawn.Pipe()
    proc = spawn.Process(target=producer, args=(child, args.size, shape, args.repeat, shm_dir))
    proc.start()
    try:
        got = json.loads(parent.recv())
        store = shm.ShmStore(shm_dir)
        frame_shape = shape[1:]
        frame_bytes = torch.Size(frame_shape).numel() * 2
        times: dict[str, list[float]] = {"host_in": [], "device_in_peer": [], "device_in_source": []}
        sums = {}
        for _ in range(2):  # the first round warms up (peer access, allocator)
            for key in times:
                times[key].clear()
            for _ in range(args.repeat):
                for k in range(shape[0]):
                    t = time.perf_counter()
                    blob = wire.from_bytes(store.read(got["segment"]))
                    x = tokens.array_tensor(blob.tokens[k], consumer)
                    times["host_in"].append(time.perf_counter() - t)
                    sums.setdefault("host", []).append(x)
                    for key, peer in (("device_in_peer", True), ("device_in_source", False)):
                        t = time.perf_counter()
                        y = handoff.import_copy(got["desc"], k * frame_bytes, (1, *frame_shape), torch.float16,
                                                consumer, peer)
                        assert torch.isfinite(y).all()  # as the DiT+decoder checks (array_tensor does too)
                        times[key].append(time.perf_counter() - t)
                        if key == "device_in_peer":
                            sums.setdefault("device", []).append(y[0])
            equal = all(torch.equal(a, b) for a, b in zip(sums["host"][-shape[0]:], sums["device"][-shape[0]:]))
            sums.clear()
    finally:
        parent.send("stop")
        proc.join(60)
    ms = lambda v: round(1000 * statistics.median(v), 3)  # noqa: E731
    result = {
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "producer": "cuda:0", "consumer": str(consumer), "peer_access": torch.cuda.can_device_access_peer(
            consumer.index, 0) if consumer.index else None,
        "tokens_per_answer": list(shape), "mb_per_frame": frame_bytes / 1e6, "frames_equal": equal,
        "ms_per_frame": {
            "encoder_out_host (GPU -> new tmpfs segment)": ms(got["host_s"]) / shape[0],
            "encoder_out_device (export)": ms(got["device_s"]) / shape[0],
            "ditdec_in_host (map + upload + check)": ms(times["host_in"]),
            "ditdec_in_device_peer (map + GPU-to-GPU copy)": ms(times["device_in_peer"]),
            "ditdec_in_device_source (mapped on the encoder's GPU + cuMemcpyPeer)": ms(times["device_in_source"]),
        },
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

"""The parts eden_serve/serving.py gathers, alone: the DiT+decoder's device token cache and each service's own
token-byte metrics (no isinstance dispatch in BatchService.record_metrics)."""
from __future__ import annotations

import time

from eden_serve import protocol, serving
from eden_serve.frame_cache import DeviceFrameCache


def test_frame_cache_keeps_the_most_recently_used():
    cache = DeviceFrameCache(3)
    cache.put("a", {0: "a0", 1: "a1", 2: "a2"}, last=1)  # frame 1 asked for: it is the most recently used
    assert len(cache) == 3 and cache.get("a", 0) == "a0"  # 0 now the most recent, 2 the least
    cache.put("b", {0: "b0"}, last=0)
    assert cache.get("a", 2) is None and cache.get("a", 1) == "a1" and cache.get("b", 0) == "b0"
    assert cache.get("c", 0) is None
    empty = DeviceFrameCache(0)
    empty.put("a", {0: "a0"}, last=0)
    assert len(empty) == 0 and empty.get("a", 0) is None


class _Metrics:
    def __init__(self):
        self.sent = {}

    def add_metric(self, name, value, unit, dimensions, metric_type):
        self.sent[name] = value


class _Context:
    def __init__(self):
        self.metrics = _Metrics()


def test_each_service_reports_its_own_token_bytes():
    for cls, name, value in ((serving.EncoderService, serving.METRIC_TOKEN_BYTES_OUT, 300),
                             (serving.DitDecService, serving.METRIC_TOKEN_BYTES_IN, 200)):
        ctx = _Context()
        cls.__new__(cls).record_metrics(ctx, {"parse": 0.001}, 2, bytes_in=200, bytes_out=300)
        other = {serving.METRIC_TOKEN_BYTES_OUT, serving.METRIC_TOKEN_BYTES_IN} - {name}
        assert ctx.metrics.sent[name] == value and not other & set(ctx.metrics.sent), ctx.metrics.sent
        assert ctx.metrics.sent[serving.METRIC_BATCHES] == 1 and ctx.metrics.sent[serving.METRIC_REQUEST_BYTES] == 200
    ctx = _Context()
    serving.BatchService().record_metrics(ctx, {}, 1, 10, 20)
    assert not {serving.METRIC_TOKEN_BYTES_OUT, serving.METRIC_TOKEN_BYTES_IN} & set(ctx.metrics.sent)


class _Answers:
    """The part of TorchServe's context a batch answer touches: headers and statuses by request."""

    def __init__(self):
        self.headers, self.metrics = {}, None

    def set_response_header(self, idx, name, value):
        self.headers.setdefault(idx, {})[name] = value

    def set_response_content_type(self, idx, value):
        pass

    def set_response_status(self, status, reason, idx):
        pass

    def get_request_header(self, idx, name):
        return None


class _TwoSizes(serving.BatchService):
    """Requests of two sizes: each group's run takes a known time in its own stage."""

    def parse(self, request, context, idx):
        return request["size"], request["size"]

    def run(self, items):
        with self.timed("work"):
            time.sleep(0.05 if items[0] == "big" else 0.01)
        return [(b"x", "text/plain", {}) for _ in items]


def test_each_size_group_reports_its_own_stages():
    """X-Eden-Stages of a mixed batch: each group's own time (a later group does not carry an earlier one's)."""
    import torch
    service = _TwoSizes()
    service.device, service.store, service._last_sweep = torch.device("cpu"), None, 0.0
    context = _Answers()
    service.handle([{"size": "big"}, {"size": "small"}], context)
    work = {idx: float(dict(kv.split("=") for kv in h[protocol.STAGES].split(","))["work"])
            for idx, h in context.headers.items()}
    assert work[0] >= 45 and work[1] < 40, work  # milliseconds: small's 10 ms alone, not big's 50 + 10


def test_encoder_reads_raw_frames_from_shared_memory_and_refuses_bad_ones(tiny_weights, tmp_path):
    """In process (eden_dev.handler_context, no TorchServe): a raw frame named by a shared-memory reference is read
    straight into a host tensor and encoded as the same frame sent in the body; a bad one gets a 400 naming it
    before any pixel is read; with shared memory off the reference is refused with that reason."""
    import numpy as np

    from eden_dev.handler_context import HandlerContext
    from eden_serve import images, shm

    def call(svc, request, settings):
        ctx = HandlerContext(tiny_weights, {"fast_socket_reads": False, **settings})
        (answer,) = svc.handle([request], ctx)
        return ctx.status.get(0, 200), bytes(answer)

    on = {"shm_dir": str(tmp_path / "shm")}
    svc = serving.EncoderService()
    svc.initialize(HandlerContext(tiny_weights, {"fast_socket_reads": False, **on}))
    rgb = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    raw = b"".join(bytes(b) for b in images.encode_raw(rgb))
    name = svc.store.write(images.encode_raw(rgb))
    by_ref = call(svc, {"frame0": shm.make_ref(segment=name), "frame1": raw}, on)
    in_body = call(svc, {"frame0": raw, "frame1": raw}, on)
    assert by_ref[0] == in_body[0] == 200 and by_ref[1] == in_body[1]
    for parts, message in (([images.RAW_HEADER.pack(images.RAW_MAGIC, 40, 56), b"x" * 10], "needs 6720 pixel bytes"),
                           ([images.RAW_HEADER.pack(images.RAW_MAGIC, 100000, 100000)], "over the limit"),
                           ([b"EDENRGB1\x01"], "shorter than its 16-byte header")):
        status, body = call(svc, {"frame0": shm.make_ref(segment=svc.store.write(parts))}, on)
        assert status == 400 and message in body.decode(), body
    off = serving.EncoderService()
    off.initialize(HandlerContext(tiny_weights, {"fast_socket_reads": False, "shm_dir": ""}))
    status, body = call(off, {"frame0": shm.make_ref(segment=name)}, {"shm_dir": ""})
    assert status == 400 and "shared-memory transport is off" in body.decode()

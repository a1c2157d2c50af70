"""Device handoff (eden_serve/handoff.py): descriptors and device segments are checked like any input; a CPU
deployment refuses device segments with a message and ignores the request for one; on a GPU host (skipped in CI)
tokens cross processes GPU to GPU, and a stopped encoder worker is reported as tokens gone."""
import json
import multiprocessing
import os
import time

import numpy as np
import pytest
import requests
import torch

from eden_client.api import EdenClient, EncoderAnswer, TokensLost
from eden_client.keys import KeySource
from eden_serve import handoff, shm, wire
from eden_serve.serving import EncoderService, HeldTokens, Settings
from eden_serve.shm import REF_CONTENT_TYPE, ShmError, ShmStore, make_ref

DESC = {"handle": "ab" * 64, "offset": 0, "nbytes": 1 << 20, "device": "0000:1b:00.0", "pid": 1}


def blob(k=2, n=4, d=8):
    return wire.TokenBlob(np.ones((k, 2, n, d), np.float16), (32, 32), (0, 0, 0, 0), 16, [0.5] * k, [0.2] * k,
                          [0.1] * (k - 1), "")


# ---------------------------------------------------------------------- descriptors and device segments
@pytest.mark.parametrize("change, message", [
    ({"handle": "ab" * 63}, "hex digits"),
    ({"handle": "AB" * 64}, "hex digits"),
    ({"offset": -1}, "'offset'"),
    ({"nbytes": 1.5}, "'nbytes'"),
    ({"pid": "1"}, "'pid'"),
    ({"pid": 1 << 40}, "'pid'"),
    ({"offset": 1 << 60}, "'offset'"),
    ({"device": "../../dev"}, "PCI bus id"),
    ({"extra": 1}, "exactly the fields"),
])
def test_bad_descriptors_are_refused(change, message):
    with pytest.raises(handoff.HandoffError, match=message):
        handoff.check_descriptor({**DESC, **change})


def test_device_segment_round_trip():
    b = blob(3)
    got, desc = shm.read_blob(shm.device_segment(b, DESC))
    assert desc == DESC and got.header() == b.header() and got.nbytes == b.nbytes
    assert not got.tokens.strides[0]  # only a shape: no bytes behind it
    host, none = shm.read_blob(b.to_bytes())
    assert none is None and np.array_equal(host.tokens, b.tokens)


@pytest.mark.parametrize("data, error, message", [
    (shm.DEVICE_MAGIC + b"{nope", ShmError, "not valid JSON"),
    (shm.DEVICE_MAGIC + b'{"blob": {}}', ShmError, "exactly 'blob'"),
    (shm.DEVICE_MAGIC + json.dumps({"blob": {"dtype": "float64"}, "cuda": DESC}).encode(), wire.WireError, "dtype"),
    (shm.DEVICE_MAGIC + b" " * (wire.MAX_HEADER_BYTES + 1), ShmError, "over"),
])
def test_bad_device_segments_are_refused(data, error, message):
    with pytest.raises(error, match=message):
        shm.read_blob(data)


def test_pair_without_copy_has_the_same_header():
    a, b = blob(2), blob(3)
    copied = wire.TokenBlob.pair(a.frame(1), b.frame(0), 0.25)
    shaped = wire.TokenBlob.pair(a.frame(1), b.frame(0), 0.25, copy=False)
    assert copied.header() == shaped.header() and not shaped.tokens.strides[0]


def test_no_handoff_off_the_gpu():
    assert not handoff.available(torch.device("cpu"))


# ---------------------------------------------------------------------- the encoder's held tokens
def holding_encoder(tmp_path, ttl_s=60.0, max_bytes=1 << 30) -> EncoderService:
    """An encoder service with only what holding handed-off tokens needs (no model, no GPU)."""
    svc = EncoderService.__new__(EncoderService)
    svc.store = ShmStore(tmp_path, ttl_s=ttl_s)
    svc.settings = Settings(handoff_max_bytes=max_bytes)
    svc.held, svc.hands_off = HeldTokens(svc.store, max_bytes), True
    return svc


def hold(svc, age_s=0.0) -> str:
    name, fd = svc.store.write_held(b"device segment")
    svc.held.add(name, torch.zeros(4), 16, fd, held_since=time.monotonic() - age_s)
    return name


def test_held_tokens_are_freed_when_released_or_expired(tmp_path):
    svc = holding_encoder(tmp_path)
    released, kept, expired = hold(svc), hold(svc), hold(svc, age_s=120)
    svc.store.unlink(released)  # the client released it
    assert svc.held.reap() == 2
    assert list(svc.held) == [kept] and svc.held.nbytes() == 16
    assert sorted(os.listdir(tmp_path)) == [kept]  # the expired one's segment is removed with its tokens


def test_tokens_are_not_freed_while_a_reader_holds_a_lease(tmp_path):
    """The DiT+decoder copies under a shared lock; the encoder frees under an exclusive one, emptying the file
    first: a reader that opened the segment before its release never reads freed memory."""
    svc = holding_encoder(tmp_path)
    name = hold(svc)
    reader = ShmStore(tmp_path)
    with reader.lease(name) as seg:
        assert bytes(seg.read()) == b"device segment"
        svc.store.unlink(name)  # released while the copy runs
        assert svc.held.reap() == 0 and name in svc.held
    assert svc.held.reap() == 1 and len(svc.held) == 0
    late = ShmStore(tmp_path, ttl_s=60)
    name = hold(svc, age_s=120)
    fd = os.open(tmp_path / name, os.O_RDONLY)  # opened just before it expires, not yet locked
    assert svc.held.reap() == 1
    with pytest.raises(shm.SegmentGone, match="freed"):
        shm.read_blob(shm.SegmentFile(fd, name).read())  # the lock taken late finds the file emptied
    os.close(fd)


def test_tokens_past_the_held_limit_go_to_host_memory(tmp_path):
    svc = holding_encoder(tmp_path, max_bytes=100)
    name, fd = svc.store.write_held(b"device segment")
    svc.held.add(name, torch.zeros(20), 80, fd)
    meta = blob(1)
    assert svc.hand_off(meta, torch.zeros(16)) is None  # 80 + 32 > 100 and nothing to free: host path
    svc.store.unlink(name)
    # once released there is room; on a CPU tensor the export itself refuses, so the worker stops handing off
    assert svc.hand_off(meta, torch.zeros(16)) is None and not svc.hands_off and len(svc.held) == 0


# ---------------------------------------------------------------------- a CPU deployment (real TorchServe)
def test_cpu_deployment_ignores_the_handoff_request_and_refuses_device_segments(server, shm_dir):
    keys = KeySource(key_file=server.key_file)
    client = EdenClient.connect(server.inference_url, encoder_keys=keys, transport="shm", shm_dir=str(shm_dir),
                                handoff="device")
    rng = np.random.default_rng(3)
    enc = client.encode_frames([rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(2)])
    assert enc.blob.tokens.strides[0]  # a CPU encoder writes the token bytes, handoff asked or not
    store = ShmStore(shm_dir)
    real = shm.read_blob(store.read(enc.segment))[0]
    device_seg = store.write(shm.device_segment(real, DESC))
    broken = store.write(shm.DEVICE_MAGIC + b"{")
    emptied = store.write(b"")
    key = server.keys()["inference"]["key"]
    cases = [
        (make_ref(pair=[{"segment": device_seg, "frame": 0}, {"segment": device_seg, "frame": 1}], difference=0.1),
         "this CPU worker cannot read"),
        (make_ref(segment=device_seg), "this CPU worker cannot read"),
        (make_ref(pair=[{"segment": broken, "frame": 0}, {"segment": broken, "frame": 1}], difference=0.1),
         "device segment is not valid JSON"),
        (shm.device_segment(real, DESC), "bad magic"),  # inline over HTTP: a blob, never a device segment
    ]
    try:
        for body, message in cases:
            r = requests.post(f"{server.inference_url}/predictions/eden_ditdec", data=body, timeout=60,
                              headers={"Authorization": f"Bearer {key}", "Content-Type": REF_CONTENT_TYPE})
            assert r.status_code == 400 and message in r.json()["message"], (message, r.text)
        r = requests.post(f"{server.inference_url}/predictions/eden_ditdec", timeout=60,
                          data=make_ref(pair=[{"segment": emptied, "frame": 0}, {"segment": emptied, "frame": 1}],
                                        difference=0.1),
                          headers={"Authorization": f"Bearer {key}", "Content-Type": REF_CONTENT_TYPE})
        assert r.status_code == 410 and "encode the frames again" in r.json()["message"], r.text
        frame, _ = client.generate_pair(enc, 0, enc, 1, seed=0)  # the worker still serves
        assert frame.shape == (64, 96, 3)
        # a deployment that cannot use handed-off tokens: the client switches itself to host tokens, and says the
        # frames must be encoded again (the video client does that)
        on_device = EncoderAnswer(real, device_seg)
        with pytest.raises(TokensLost, match="this CPU worker cannot read"):
            client.generate_pair(on_device, 0, on_device, 1, seed=0)
        assert client.handoff == "host"
    finally:
        client.release(enc)
        store.unlink(device_seg)
        store.unlink(broken)
        store.unlink(emptied)
    assert os.listdir(shm_dir) == []


# ---------------------------------------------------------------------- GPUs (skipped where there are none)
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _values(rows=3, cols=1000):
    return (torch.arange(rows * cols) % 997).to(torch.float16).reshape(rows, cols)


def _producer(conn, index: int) -> None:
    """Another process, as the encoder worker is: exports rows 1.. of a tensor on cuda:index, waits, exits."""
    t = _values().to(f"cuda:{index}")
    torch.cuda.synchronize()
    conn.send(json.dumps(handoff.export(t[1:])))  # a view at an offset inside the allocation
    conn.recv()


@needs_gpu
def test_tokens_cross_processes_gpu_to_gpu_and_a_stopped_producer_is_reported():
    spawn = multiprocessing.get_context("spawn")
    parent, child = spawn.Pipe()
    producer = spawn.Process(target=_producer, args=(child, 0))
    producer.start()
    try:
        desc = handoff.check_descriptor(json.loads(parent.recv()))
        want = _values()[2:3]
        row = 1000 * 2  # bytes per row
        for index in range(torch.cuda.device_count()):
            for peer in (True, False):
                got = handoff.import_copy(desc, row, (1, 1000), torch.float16, torch.device("cuda", index), peer)
                assert got.device.index == index and torch.equal(got.cpu(), want), (index, peer)
        with pytest.raises(handoff.HandoffError, match="outside"):
            handoff.import_copy(desc, row, (2, 1000), torch.float16, torch.device("cuda", 0))
    finally:
        parent.send("stop")
        producer.join(60)
    with pytest.raises(handoff.TokensGone):
        handoff.import_copy(desc, 0, (1, 1000), torch.float16, torch.device("cuda", torch.cuda.device_count() - 1))

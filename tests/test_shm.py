"""The shared-memory transport: the store's rules, and the same frames as HTTP through a real TorchServe."""
import copy
import os
import time

import numpy as np
import pytest
import requests
from conftest import SHM_TTL_S, png_bytes

from eden_client.api import EdenClient
from eden_client.errors import ServeError
from eden_client.keys import KeySource
from eden_serve.shm import REF_CONTENT_TYPE, ShmError, ShmFull, ShmStore, make_ref


# ---------------------------------------------------------------------- the store
def test_store_round_trip_and_release(tmp_path):
    store = ShmStore(tmp_path / "s")
    name = store.write([b"abc", memoryview(b"defg")])
    assert bytes(store.read(name)) == b"abcdefg"
    assert oct((tmp_path / "s" / name).stat().st_mode & 0o777) == "0o600"
    store.unlink(name)
    with pytest.raises(ShmError, match="does not exist"):
        store.read(name)
    assert os.listdir(tmp_path / "s") == []


@pytest.mark.parametrize("name", ["../etc/passwd", "/etc/passwd", "eden-xyz", "eden-" + "0" * 31, 5, "eden-" + "A" * 32])
def test_store_refuses_other_names(tmp_path, name):
    with pytest.raises(ShmError, match="invalid segment name"):
        ShmStore(tmp_path).read(name)


def test_store_does_not_follow_links(tmp_path):
    (tmp_path / "secret").write_bytes(b"secret")
    name = "eden-" + "a" * 32
    os.symlink(tmp_path / "secret", tmp_path / name)
    with pytest.raises(ShmError, match="cannot be opened"):
        ShmStore(tmp_path).read(name)


def test_sweep_removes_only_expired_segments(tmp_path):
    store = ShmStore(tmp_path, ttl_s=60)
    old, new = store.write(b"x"), store.write(b"y")
    os.utime(tmp_path / old, (time.time() - 120,) * 2)
    (tmp_path / "unrelated").write_bytes(b"z")
    os.utime(tmp_path / "unrelated", (time.time() - 120,) * 2)
    assert store.sweep() == 1
    assert sorted(os.listdir(tmp_path)) == sorted([new, "unrelated"])


# ---------------------------------------------------------------------- through TorchServe
@pytest.fixture(scope="module")
def clients(server, shm_dir):
    keys = KeySource(key_file=server.key_file)
    return (EdenClient.connect(server.inference_url, encoder_keys=keys),
            EdenClient.connect(server.inference_url, encoder_keys=keys, transport="shm", shm_dir=str(shm_dir)))


def frames(n=4, h=64, w=96):
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def test_shm_gives_the_same_frames_as_http_and_leaves_nothing(clients, shm_dir):
    http, fast = clients
    f = frames()
    a_http, a_shm = http.encode_frames(f[:3]), fast.encode_frames(f[:3])
    b_http, b_shm = http.encode_frames(f[3:]), fast.encode_frames(f[3:])
    assert np.array_equal(a_http.blob.tokens, a_shm.blob.tokens)
    assert a_shm.segment and sorted(os.listdir(shm_dir)) == sorted([a_shm.segment, b_shm.segment])
    chunks_http, chunks_shm = (a_http, b_http), (a_shm, b_shm)
    cases = [(0, 0, 0, 1, None),  # consecutive frames of one encoder call: its own difference, a view
             (0, 0, 0, 2, 0.3),  # two frames of one call
             (0, 2, 1, 0, 0.1)]  # across calls
    for seed, (c0, i, c1, j, diff) in enumerate(cases):
        got_http, s1 = http.generate_pair(chunks_http[c0], i, chunks_http[c1], j, diff, seed=seed)
        got_shm, s2 = fast.generate_pair(chunks_shm[c0], i, chunks_shm[c1], j, diff, seed=seed)
        assert s1 == s2 == seed and got_http.shape == (64, 96, 3)
        assert np.array_equal(got_http, got_shm)
    fast.release(a_shm)
    fast.release(b_shm)
    assert os.listdir(shm_dir) == []


def test_bad_references_are_refused(server, clients, shm_dir):
    _, fast = clients
    enc = fast.encode_frames(frames(2))
    key = server.keys()["inference"]["key"]

    def post(model, **kw):
        headers = {"Authorization": f"Bearer {key}"}
        if "data" in kw:
            headers["Content-Type"] = REF_CONTENT_TYPE
        return requests.post(f"{server.inference_url}/predictions/{model}", timeout=60, headers=headers, **kw)

    cases = [
        (make_ref(segment="../../etc/passwd"), "invalid segment name"),
        (make_ref(segment="eden-" + "0" * 32), "does not exist"),
        (make_ref(pair=[{"segment": enc.segment, "frame": 0}, {"segment": enc.segment, "frame": 5}],
                  difference=0.0), "frame 5 of segment"),
        (make_ref(pair=[{"segment": enc.segment, "frame": 0}], difference=0.0), "two frames"),
        (make_ref(pair=[{"segment": enc.segment, "frame": 0}, {"segment": enc.segment, "frame": 1}],
                  difference="x"), "finite 'difference'"),
        (b"EDENREF1{nope", "not valid JSON"),
    ]
    for body, message in cases:
        r = post("eden_ditdec", data=body)
        assert r.status_code == 400 and message in r.json()["message"], (message, r.text)
    r = post("eden_encoder", files={"frame0": make_ref(segment="eden-" + "1" * 32)})
    assert r.status_code == 400 and "does not exist" in r.json()["message"]
    fast.release(enc)


def test_client_cleans_up_when_the_server_refuses(clients, shm_dir):
    _, fast = clients
    with pytest.raises(ServeError):
        fast.encode_frames([np.zeros((8, 8, 3), np.uint8)])  # under min_side: refused after the frame was written
    assert os.listdir(shm_dir) == []


def test_expired_segments_are_swept(server, clients, shm_dir):
    """What a killed client or worker leaves behind is removed once older than the TTL."""
    _, fast = clients
    leftover = ShmStore(shm_dir).write(b"left by a client killed mid-video")
    os.utime(shm_dir / leftover, (time.time() - 10 * SHM_TTL_S,) * 2)
    deadline = time.time() + 3 * SHM_TTL_S
    while (shm_dir / leftover).exists() and time.time() < deadline:
        fast.release(fast.encode_frames(frames(1)))  # any request lets the handler sweep
        time.sleep(1)
    assert not (shm_dir / leftover).exists()


def test_the_quota_counts_the_folder_again_only_near_it(tmp_path, monkeypatch):
    """Counting the folder before every write cost 0.46 ms with 200 segments: far from the quota the count is
    reused (with this store's own writes added) for USAGE_RECOUNT_S; it is made afresh when that total comes within
    a quarter of the quota, or this store wrote a sixteenth of it since, so what another process wrote is seen
    before the quota is passed."""
    store = ShmStore(tmp_path / "q", quota_bytes=64000)
    counts = []
    real = ShmStore.usage
    monkeypatch.setattr(ShmStore, "usage", lambda self: counts.append(1) or real(self))
    first = [store.write(b"x" * 100) for _ in range(5)]  # 500 of 64000: one count
    ShmStore(tmp_path / "q").write(b"y" * 40000)  # another process's, not counted yet
    store.write(b"x" * 1000)  # 1500 by its own count: far from the quota, no count (the folder holds 41500)
    assert len(counts) == 1
    store.write(b"x" * 5000)  # 6500 written since the count, over a sixteenth: counted (41500), fits
    assert len(counts) == 2
    with pytest.raises(ShmFull):
        store.write(b"x" * 20000)  # 41500 + 5000 + 20000: near the quota, so counted (46500): over it
    assert len(counts) == 3
    for name in first:
        store.unlink(name)
    store.write(b"x" * 400)  # its count (46500, over-counted by what was removed) is fresh and far: reused
    assert len(counts) == 3 and store.usage() == 46400
    assert copy.deepcopy(store) == store  # (a copy: the same folder and quota, a count of its own)

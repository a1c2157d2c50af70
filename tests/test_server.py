"""End to end on a real TorchServe with the archives built by archive_scripts/build_archives.py."""
import json
import os
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from conftest import FIXTURE, ROOT, png_bytes, read_rgb

from eden_client.api import EdenClient
from eden_client.errors import ServeError
from eden_client.keys import KeySource
from eden_serve import pipeline, tokens, wire

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def client(server):
    return EdenClient.connect(server.inference_url, encoder_keys=KeySource(key_file=server.key_file))


def run_client(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EDEN_KEY_FILE", None)
    env.pop("EDEN_INFERENCE_KEY", None)
    return subprocess.run([sys.executable, "-m", "eden_client", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env)


def test_client_pair_gives_the_official_frame(server, tmp_path):
    out = tmp_path / "middle.png"
    r = run_client("pair", FIXTURE / "frame0.png", FIXTURE / "frame1.png", "-o", out, "--seed", "0",
                   "--encoder-url", server.inference_url, "--key-file", server.key_file)
    assert r.returncode == 0, r.stderr
    assert "seed 0" in r.stdout
    got, want = read_rgb(out).astype(int), read_rgb(FIXTURE / "expected.png").astype(int)
    assert got.shape == want.shape and np.abs(got - want).max() <= 1


def test_float32_tokens_and_unseeded_requests(client):
    frames = [(FIXTURE / f"frame{i}.png").read_bytes() for i in (0, 1)]
    blob16, blob32 = client.encode(frames, "float16"), client.encode(frames, "float32")
    assert wire.from_bytes(blob16).dtype == "float16" and wire.from_bytes(blob32).dtype == "float32"
    assert len(blob32) - len(blob16) == wire.from_bytes(blob16).tokens.nbytes
    png, seed = client.generate(blob32)  # no seed: a fresh one, reported so the frame can be made again
    assert 0 <= seed < 2**63
    again, seed2 = client.generate(blob32, seed)
    assert seed2 == seed and np.array_equal(read_rgb(png), read_rgb(again))


def test_concurrent_mixed_sizes_are_batched_correctly(client, tiny_models, fixture_frames):
    """Concurrent requests of two sizes (TorchServe batches them, batchSize 4): each answer is its own."""
    encoder, generator = tiny_models
    small = (fixture_frames.permute(0, 2, 3, 1) * 255).round().byte().numpy()
    big_t = torch.nn.functional.interpolate(fixture_frames, size=(70, 150), mode="bilinear")
    big = (big_t.permute(0, 2, 3, 1) * 255).round().byte().numpy()
    jobs = [(small if i % 2 else big, i) for i in range(8)]

    def expected(frames, seed):
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
        encoded, diffs = pipeline.encode_frames(encoder, x)
        geo = pipeline.Geometry.for_size(*x.shape[-2:], encoder.cfg)
        (blob,) = tokens.to_blobs(encoded, diffs, geo, "float16")
        pairs = tokens.pair_batch([blob], [tokens.tokens_tensor(blob, torch.device("cpu"))], geo)
        noise = pipeline.make_noise(geo, generator.cfg.latent_dim, seed, "cpu")
        return pipeline.to_uint8(pipeline.interpolate(generator, pairs, noise))[0].numpy().astype(int)

    def one(job):
        frames, seed = job
        return client.interpolate(png_bytes(frames[0]), png_bytes(frames[1]), seed)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, jobs))
    for (frames, seed), png in zip(jobs, results):
        got = read_rgb(png).astype(int)
        assert got.shape == frames.shape[1:]
        assert np.abs(got - expected(frames, seed)).max() <= 1


def test_encoder_returns_every_frame_and_consecutive_differences(client):
    frames = [png_bytes(np.full((64, 64, 3), v, np.uint8)) for v in (10, 120, 240)]
    blob = wire.from_bytes(client.encode(frames))
    assert blob.num_frames == 3 and len(blob.differences) == 2 and blob.size == (64, 64)
    pair = wire.TokenBlob.pair(blob.frame(1), blob.frame(2), blob.differences[1])
    png, _ = client.generate(pair.to_bytes(), 1)
    assert read_rgb(png).shape == (64, 64, 3)


# ---------------------------------------------------------------------- bad input
def post(server, model, headers=None, **kw):
    key = server.keys()["inference"]["key"]
    return requests.post(f"{server.inference_url}/predictions/{model}",
                         headers={"Authorization": f"Bearer {key}", **(headers or {})}, timeout=60, **kw)


FRAME = png_bytes(np.zeros((64, 80, 3), np.uint8))


def good_blob(server):
    r = post(server, "eden_encoder", files={"frame0": FRAME, "frame1": FRAME})
    assert r.status_code == 200
    return r.content


def forged(blob: bytes, **changes) -> bytes:
    n = struct.unpack_from("<I", blob, 12)[0]
    header = json.loads(blob[16:16 + n])
    header.update(changes)
    new = json.dumps(header).encode()
    new += b" " * (-(16 + len(new)) % 64)
    return blob[:12] + struct.pack("<I", len(new)) + new + blob[16 + n:]


ENCODER_CASES = {
    "no frames": (dict(data=b"raw"), "no frames"),
    "not an image": (dict(files={"frame0": b"GIF89a nope", "frame1": FRAME}), "frame0: not a PNG or JPEG"),
    "truncated png": (dict(files={"frame0": FRAME, "frame1": FRAME[:60]}), "frame1:"),
    "1x1 image": (dict(files={"frame0": png_bytes(np.zeros((1, 1, 3), np.uint8))}), "too small"),
    "over the pixel limit": (dict(files={"frame0": png_bytes(np.zeros((600, 700, 3), np.uint8))}),
                             "over the limit of 307200"),
    "different sizes": (dict(files={"frame0": FRAME, "frame1": png_bytes(np.zeros((64, 96, 3), np.uint8))}),
                        "frame1 is 96x64 but frame0 is 80x64"),
    "gap in numbering": (dict(files={"frame0": FRAME, "frame2": FRAME}), "without gaps"),
    "bad dtype": (dict(files={"frame0": FRAME, "dtype": (None, "int4")}), "dtype must be one of"),
    "too many frames": (dict(files={f"frame{i}": FRAME for i in range(17)}), "at most 16"),
}


@pytest.mark.parametrize("case", ENCODER_CASES)
def test_encoder_bad_input(server, case):
    kwargs, message = ENCODER_CASES[case]
    pids = server.worker_pids("eden_encoder")
    r = post(server, "eden_encoder", **kwargs)
    assert r.status_code in (400, 413), r.text
    assert message in r.json()["message"]
    assert r.headers["Content-Type"] == "application/json"
    assert server.worker_pids("eden_encoder") == pids
    assert post(server, "eden_encoder", files={"frame0": FRAME}).status_code == 200  # still serving


def nan_blob(blob):
    parsed = wire.from_bytes(blob)
    t = parsed.tokens.copy()
    t[0, 1, 0, 0] = np.nan
    parsed.tokens = t
    return parsed.to_bytes()


def other_size_blob(blob):
    parsed = wire.from_bytes(blob)
    parsed.tokens = np.zeros(parsed.tokens.shape[:3] + (64,), np.float16)
    return parsed.to_bytes()


def three_frames(blob):
    p = wire.from_bytes(blob)
    return wire.TokenBlob(np.concatenate([p.tokens, p.tokens[:1]]), p.size, p.padding, p.patch_size,
                          p.mean + p.mean[:1], p.std + p.std[:1], p.differences * 2, p.encoder).to_bytes()


DITDEC_CASES = {
    "empty body": (lambda b: b"", {}, "empty body"),
    "random bytes": (lambda b: bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)), {}, "bad magic"),
    "a png": (lambda b: FRAME, {}, "bad magic"),
    "wrong version": (lambda b: b[:8] + struct.pack("<I", 9) + b[12:], {}, "version 9"),
    "truncated": (lambda b: b[: len(b) // 2], {}, "truncated token blob"),
    "trailing bytes": (lambda b: b + b"xyz", {}, "3 unexpected trailing bytes"),
    "huge header length": (lambda b: b[:12] + struct.pack("<I", 2**32 - 1) + b[16:], {}, "header length"),
    "nan tokens": (nan_blob, {}, "NaN or infinite"),
    "nan stats": (lambda b: forged(b, std=[0.2, float("nan")]), {}, "'std' has values that are not finite"),
    "three frames": (three_frames, {}, "tokens of a pair (2 frames), got 3"),
    "another model size": (other_size_blob, {}, "hidden size 64 but the loaded model has 128"),
    "another encoder": (lambda b: forged(b, encoder="0123456789abcdef"), {}, "encoder weights 0123456789abcdef"),
    "bad seed": (lambda b: b, {"X-Eden-Seed": "abc"}, "seed must be an integer"),
    "negative seed": (lambda b: b, {"x-eden-seed": "-1"}, "seed must be between"),
}


@pytest.mark.parametrize("case", DITDEC_CASES)
def test_ditdec_bad_input(server, case):
    make, headers, message = DITDEC_CASES[case]
    blob = good_blob(server)
    pids = server.worker_pids("eden_ditdec")
    r = post(server, "eden_ditdec", data=make(blob), headers=headers)
    assert r.status_code == 400, r.text
    assert message in r.json()["message"]
    assert server.worker_pids("eden_ditdec") == pids
    ok = post(server, "eden_ditdec", data=blob, headers={"X-Eden-Seed": "0"})
    assert ok.status_code == 200 and ok.headers["Content-Type"] == "image/png"


def test_one_bad_request_in_a_batch_leaves_the_others(server):
    blob = good_blob(server)
    bodies = [blob, blob[:-5], blob, b"junk"] * 2
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda b: post(server, "eden_ditdec", data=b).status_code, bodies))
    assert codes == [200, 400, 200, 400] * 2


# ---------------------------------------------------------------------- authorization
def test_missing_or_wrong_key_is_refused_with_a_hint(server, tmp_path):
    r = requests.post(f"{server.inference_url}/predictions/eden_encoder", files={"frame0": FRAME}, timeout=30)
    assert r.status_code == 400 and r.json()["type"] == "InvalidKeyException"
    (tmp_path / "x").mkdir()
    wrong = tmp_path / "key_file.json"
    wrong.write_text(json.dumps({"inference": {"key": "nope"}, "management": {"key": "nope"}}))
    c = EdenClient.connect(server.inference_url, encoder_keys=KeySource(key_file=wrong))
    with pytest.raises(ServeError, match="TorchServe refused the key file .* key_file.json in the folder"):
        c.encode([FRAME])
    r = run_client("pair", FIXTURE / "frame0.png", FIXTURE / "frame1.png", "-o", tmp_path / "x.png",
                   "--encoder-url", server.inference_url, cwd=tmp_path / "x")  # no key file where it runs
    assert r.returncode == 1 and "no key: key_file.json does not exist" in r.stderr


@pytest.mark.parametrize("transport", ["http", "auto"])
def test_warm_sends_each_size_and_reports_every_round(server, transport):
    """`warm` interpolates a generated clip at each size, round after round, over the transport a user's run would
    take (HTTP forced: the frontend's large bodies; auto: shared memory on this host), and says so."""
    r = run_client("warm", "--sizes", "48x64,64x96", "--frames", "5", "--rounds", "2", "--transport", transport,
                   "--json", "--encoder-url", server.inference_url, "--key-file", server.key_file)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["transport"] == ("http" if transport == "http" else "shm")
    rounds = report["seconds_per_generated_frame"]
    assert set(rounds) == {"48x64", "64x96"} and all(len(v) == 2 and all(s > 0 for s in v) for v in rounds.values())
    bad = run_client("warm", "--sizes", "48", "--encoder-url", server.inference_url, "--key-file", server.key_file)
    assert bad.returncode == 2 and "HEIGHTxWIDTH" in bad.stderr

"""The released architecture (hidden 768, 12 heads, 12 DiT + 4 decoder blocks), random weights in the official
layout: split_weights.py -> build_archives.py -> a real TorchServe on CPU -> one 256x256 pair."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, png_bytes, read_rgb

from eden_client.api import EdenClient
from eden_client.keys import KeySource
from eden_dev.launcher import TorchServe
from eden_dev.samples import moving_shapes
from eden_serve import checkpoint, pipeline
from eden_serve.config import EdenConfig

pytestmark = pytest.mark.server


def test_real_size_serves_a_256_pair(tmp_path):
    from eden_serve.archives import build
    ckpt = tmp_path / "eden_random.pt"
    checkpoint.make_random_checkpoint(ckpt, EdenConfig(), seed=1)
    r = subprocess.run([sys.executable, str(ROOT / "split_weights.py"), str(ckpt), "--out-dir", str(tmp_path / "w")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "hidden 768, 12 heads, 12 DiT blocks, 4 decoder blocks" in r.stdout
    ckpt.unlink()
    build(tmp_path / "w", tmp_path / "store", gpus=0, batch_size=1)
    frames = moving_shapes(2, 256, 256)
    with TorchServe(tmp_path / "serve", tmp_path / "store") as ts:
        client = EdenClient.connect(ts.inference_url, encoder_keys=KeySource(key_file=ts.key_file))
        png = client.interpolate(png_bytes(frames[0]), png_bytes(frames[1]), seed=3, dtype="float32")
    got = read_rgb(png).astype(int)
    assert got.shape == (256, 256, 3)
    # the same pair in process, same weights and seed
    encoder, generator = checkpoint.load_encoder(tmp_path / "w"), checkpoint.load_generator(tmp_path / "w")
    x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255
    encoded, diffs = pipeline.encode_frames(encoder, x)
    geo = pipeline.Geometry.for_size(256, 256, encoder.cfg)
    pairs = pipeline.PairBatch(encoded.dit[None], encoded.dec[None], encoded.mean[None], encoded.std[None],
                               diffs[0], geo)
    want = pipeline.to_uint8(pipeline.interpolate(generator, pairs, pipeline.make_noise(geo, 16, 3, "cpu")))
    assert np.abs(got - want[0].numpy().astype(int)).max() <= 1

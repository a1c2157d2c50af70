"""split_weights.py: the official layout loads as is, each half holds only its own tensors, bad files are refused."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import FIXTURE, ROOT
from safetensors.torch import load_file

from eden_serve import checkpoint
from eden_serve.config import ENCODER_PREFIXES, CheckpointError


def split_cli(*args, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "split_weights.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd)


def test_split_cli_writes_two_halves(tmp_path):
    r = split_cli(FIXTURE / "eden_tiny.pt", "--out-dir", tmp_path / "w", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "hidden 128, 2 heads" in r.stdout
    official = torch.load(FIXTURE / "eden_tiny.pt", weights_only=True)["eden"]
    enc, gen = load_file(tmp_path / "w/encoder.safetensors"), load_file(tmp_path / "w/ditdec.safetensors")
    assert all(k.startswith(ENCODER_PREFIXES) for k in enc) and not any(k.startswith(ENCODER_PREFIXES) for k in gen)
    assert set(enc) | set(gen) == set(official) and not set(enc) & set(gen)
    assert all(torch.equal(official[k], v) for k, v in {**enc, **gen}.items())


def test_num_heads_option(tmp_path):
    assert split_cli(FIXTURE / "eden_tiny.pt", "--out-dir", tmp_path, "--num-heads", "4").returncode == 0
    assert checkpoint.load_config(tmp_path).num_heads == 4
    r = split_cli(FIXTURE / "eden_tiny.pt", "--out-dir", tmp_path, "--num-heads", "3")
    assert r.returncode == 2 and "not divisible by 3 heads" in r.stderr


def edited(tmp_path, edit):
    sd = dict(torch.load(FIXTURE / "eden_tiny.pt", weights_only=True)["eden"])
    edit(sd)
    path = tmp_path / "edited.pt"
    torch.save({"eden": sd}, path)
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("dit_blocks.1.mlp.fc2.bias"), "missing 1 tensor(s): dit_blocks.1.mlp.fc2.bias"),
    (lambda sd: sd.pop("norm_cond_dec.weight"), "missing 1 tensor(s): norm_cond_dec.weight"),
    (lambda sd: sd.update(extra=torch.zeros(3)), "unexpected 1 tensor(s): extra"),
    (lambda sd: sd.update({"proj_out.weight": torch.zeros(30, 128)}), "proj_out.weight: (30, 128) (expected (32, 128))"),
    (lambda sd: sd.pop("patch_cond_dit.weight"), "tensor 'patch_cond_dit.weight' is missing"),
])
def test_refuses_wrong_checkpoints(tmp_path, edit, message):
    r = split_cli(edited(tmp_path, edit), "--out-dir", tmp_path / "out")
    assert r.returncode == 2
    assert message in r.stderr
    assert not (tmp_path / "out" / "encoder.safetensors").exists()


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("content", ["not a checkpoint", "pickle", "list"])
def test_refuses_non_checkpoints(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content == "not a checkpoint":
        path.write_text("hello")
    elif content == "pickle":
        torch.save({"eden": Exploit()}, path)
    else:
        torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="cannot be read as a weights-only|expected {'eden'"):
        checkpoint.read_official_checkpoint(path)
    assert split_cli(path, "--out-dir", tmp_path / "o").returncode == 2


def test_random_checkpoint_is_official_layout(tmp_path):
    from eden_serve.config import EdenConfig
    cfg = EdenConfig(hidden_dim=64, num_heads=1, dit_depth=1, decoder_depth=1)
    checkpoint.make_random_checkpoint(tmp_path / "r.pt", cfg)
    assert checkpoint.split_checkpoint(tmp_path / "r.pt", tmp_path / "w", num_heads=1) == cfg


def test_blend_checkpoint_makes_the_mean_of_the_two_frames(tmp_path):
    """bench's stand-in for trained weights (eden_dev/blend_checkpoint.py): official layout and sizes, loaded by the
    same strict path, and its middle frame is the two inputs' mean at half resolution, so the output's encoder sees
    a video's content rather than noise."""
    import numpy as np

    from eden_dev.blend_checkpoint import make_blend_checkpoint
    from eden_dev.samples import moving_shapes
    from eden_serve import pipeline
    from eden_serve.config import EdenConfig

    make_blend_checkpoint(tmp_path / "b.pt")
    assert checkpoint.split_checkpoint(tmp_path / "b.pt", tmp_path / "w") == EdenConfig()
    enc, gen = checkpoint.load_encoder(tmp_path / "w", "cpu"), checkpoint.load_generator(tmp_path / "w", "cpu")
    H, W = 96, 128
    a, b = moving_shapes(2, H, W, step=8)
    x = torch.from_numpy(np.stack([a, b])).permute(0, 3, 1, 2).float() / 255
    geo = pipeline.Geometry.for_size(H, W, gen.cfg)
    with torch.no_grad():
        e, (d,) = pipeline.encode_frames(enc, x)
        pair = torch.tensor([[0, 1]])
        pairs = pipeline.PairBatch(e.dit[pair], e.dec[pair], e.mean[pair], e.std[pair], d, geo)
        noise = pipeline.make_noise(geo, gen.cfg.latent_dim, 1, torch.device("cpu"))
        out = pipeline.to_uint8(pipeline.interpolate(gen, pairs, noise))[0].numpy().astype(float)
    mean = (a.astype(float) + b) / 2
    blocks = mean.reshape(H // 2, 2, W // 2, 2, 3).mean(axis=(1, 3)).repeat(2, 0).repeat(2, 1)
    assert 10 * np.log10(255 ** 2 / np.mean((out - blocks) ** 2)) > 45

"""All checkpoint handling in one place: the official file, its split into the two halves, and loading them.

Official layout: ``torch.save({"eden": state_dict})`` of the official ``EDEN`` module. Split layout (what the
archives carry): ``encoder.safetensors``, ``ditdec.safetensors`` and ``eden_config.json``.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file

from .config import ENCODER_PREFIXES, CheckpointError, EdenConfig
from .model import EdenEncoder, EdenGenerator

ENCODER_FILE = "encoder.safetensors"
DITDEC_FILE = "ditdec.safetensors"
CONFIG_FILE = "eden_config.json"


def read_official_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load ``path`` safely (``weights_only=True``) and return the EDEN state dict inside it."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # not a torch file, or one that needs arbitrary code to unpickle
        first = str(e).split(". ")[0].splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{path}: cannot be read as a weights-only torch checkpoint "
                              f"({type(e).__name__}: {first})") from None
    if isinstance(obj, Mapping) and "eden" in obj:
        obj = obj["eden"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected {{'eden': state_dict}} (or a bare state dict of tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _check_against(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [f"{k}: {tuple(sd[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:8])}"
                        + (" ..." if len(unexpected) > 8 else ""))
    if wrong:
        problems.append(f"wrong shape: {'; '.join(wrong[:8])}")
    if problems:
        raise CheckpointError(f"not an EDEN {what} checkpoint: " + " | ".join(problems))
    bad = [k for k, v in sd.items() if not v.is_floating_point()]
    if bad:
        raise CheckpointError(f"not an EDEN {what} checkpoint: non-float tensors {bad[:8]}")


def split_state_dict(sd: Mapping[str, torch.Tensor], cfg: EdenConfig) -> tuple[dict, dict]:
    """Check a whole official state dict against the architecture and split it: (encoder, DiT+decoder)."""
    with torch.device("meta"):
        encoder, generator = EdenEncoder(cfg), EdenGenerator(cfg)
    enc = {k: v for k, v in sd.items() if k.startswith(ENCODER_PREFIXES)}
    gen = {k: v for k, v in sd.items() if not k.startswith(ENCODER_PREFIXES)}
    _check_against(encoder, enc, "encoder")
    _check_against(generator, gen, "DiT+decoder")
    return enc, gen


def fingerprint(sd: Mapping[str, torch.Tensor]) -> str:
    """A short content hash of a state dict (names, shapes, bytes): tokens carry the encoder's."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().contiguous().cpu()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def split_checkpoint(path: str | os.PathLike, out_dir: str | os.PathLike, num_heads: int | None = None) -> EdenConfig:
    """Official checkpoint -> ``out_dir``/{encoder,ditdec}.safetensors + eden_config.json. Returns the config."""
    sd = read_official_checkpoint(path)
    cfg = EdenConfig.from_state_dict(sd, num_heads=num_heads)
    enc, gen = split_state_dict(sd, cfg)
    cfg = EdenConfig.from_dict({**cfg.to_dict(), "encoder_fingerprint": fingerprint(enc)})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "eden-split-v1"}
    save_file({k: v.contiguous() for k, v in enc.items()}, out / ENCODER_FILE, metadata=meta)
    save_file({k: v.contiguous() for k, v in gen.items()}, out / DITDEC_FILE, metadata=meta)
    (out / CONFIG_FILE).write_text(cfg.to_json() + "\n")
    return cfg


def load_config(weights_dir: str | os.PathLike) -> EdenConfig:
    return EdenConfig.from_json(Path(weights_dir, CONFIG_FILE).read_text())


def _load(module: torch.nn.Module, file: Path, what: str, device, dtype) -> torch.nn.Module:
    sd = load_file(file, device="cpu")
    _check_against(module, sd, what)
    module.load_state_dict(sd, strict=True)
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_encoder(weights_dir, device="cpu", dtype=torch.float32) -> EdenEncoder:
    cfg = load_config(weights_dir)
    return _load(EdenEncoder(cfg), Path(weights_dir, ENCODER_FILE), "encoder", device, dtype)


def load_generator(weights_dir, device="cpu", dtype=torch.float32) -> EdenGenerator:
    cfg = load_config(weights_dir)
    return _load(EdenGenerator(cfg), Path(weights_dir, DITDEC_FILE), "DiT+decoder", device, dtype)


def make_random_checkpoint(path: str | os.PathLike, cfg: EdenConfig, seed: int = 0) -> None:
    """Write a random-weight checkpoint in the official layout (``{"eden": state_dict}``) for demos and tests.

    LayerNorm and bias parameters are randomised too, so that no tensor is left at a trivial value.
    """
    torch.save({"eden": random_state_dict(cfg, seed)}, path)


def random_state_dict(cfg: EdenConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random official-layout parameters (``make_random_checkpoint``'s)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for module in (EdenEncoder(cfg), EdenGenerator(cfg)):
        for k, v in module.state_dict().items():
            fan_in = v[0].numel() if v.dim() > 1 else 1
            if v.dim() > 1:
                sd[k] = torch.randn(v.shape, generator=gen) / fan_in ** 0.5
            elif k.endswith("weight"):  # norm scales around 1
                sd[k] = 1 + 0.1 * torch.randn(v.shape, generator=gen)
            else:
                sd[k] = 0.02 * torch.randn(v.shape, generator=gen)
    return sd

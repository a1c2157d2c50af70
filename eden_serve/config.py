"""EDEN configuration: architecture sizes and the constants of the official release.

The sizes are read from a checkpoint's tensor shapes (``EdenConfig.from_state_dict``); only the head count cannot
be read from shapes, so it defaults to ``hidden_dim // 64`` (12 for the released model) and can be set.
The config travels with the split weights as JSON (``to_json`` / ``from_json``).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:  # only in annotations: the config is read by the client too, without torch
    import torch

# Constants of the official release (configs/eval_eden.yaml and the sampler of the official code).
COS_SIM_MEAN = 0.990539  # mean of the pair's per-pixel cosine similarity over the training set
COS_SIM_STD = 0.0608093  # its standard deviation; the difference input is the z-score of the pair's value
LATENT_SCALE = 0.179437  # latents are sampled in units of (z - shift) * scale
LATENT_SHIFT = 0.770202
TIME_GRID = (0.0, 0.75, 1.0)  # two Euler steps of the velocity ODE, from noise (t=0) to data (t=1)
PAD_MULTIPLE = 32  # frames are padded (replicate) to a multiple of two patches: the latent grid is half the patch grid
POS_EMBED_REFERENCE_GRID = (16, 28)  # patch grid the sin-cos positions are scaled to (a 256x448 training crop)
NORM_EPS = 1e-6
TIMESTEP_FREQ_DIM = 256

ENCODER_PREFIXES = ("patch_cond_dit.", "norm_cond_dit.", "patch_cond_dec.", "norm_cond_dec.")


class CheckpointError(ValueError):
    """The given weights are not an EDEN checkpoint of the expected layout."""


@dataclass(frozen=True)
class EdenConfig:
    # architecture (read from tensor shapes)
    in_dim: int = 3
    out_dim: int = 3
    patch_size: int = 16
    latent_dim: int = 16
    hidden_dim: int = 768
    num_heads: int = 12
    mlp_ratio: float = 4.0
    dit_depth: int = 12
    decoder_depth: int = 4
    qkv_bias: bool = False
    norm_eps: float = NORM_EPS
    timestep_freq_dim: int = TIMESTEP_FREQ_DIM
    # sampling constants
    cos_sim_mean: float = COS_SIM_MEAN
    cos_sim_std: float = COS_SIM_STD
    latent_scale: float = LATENT_SCALE
    latent_shift: float = LATENT_SHIFT
    time_grid: tuple[float, ...] = TIME_GRID
    pad_multiple: int = PAD_MULTIPLE
    pos_embed_reference_grid: tuple[int, int] = POS_EMBED_REFERENCE_GRID
    # identifies the encoder weights: tokens made by other weights are refused by the DiT+decoder
    encoder_fingerprint: str = field(default="", compare=False)

    def __post_init__(self):
        if self.hidden_dim % self.num_heads:
            raise CheckpointError(f"hidden size {self.hidden_dim} is not divisible by {self.num_heads} heads")
        if self.hidden_dim % 4:
            raise CheckpointError(f"hidden size {self.hidden_dim} must be divisible by 4 (2-D sin-cos positions)")
        if self.pad_multiple % (2 * self.patch_size):
            raise CheckpointError(f"pad multiple {self.pad_multiple} must be a multiple of 2 x patch {self.patch_size}")

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_dim * self.mlp_ratio)

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["time_grid"] = list(self.time_grid)
        d["pos_embed_reference_grid"] = list(self.pos_embed_reference_grid)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping) -> "EdenConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise CheckpointError(f"unknown config fields: {sorted(unknown)}")
        d = dict(d)
        for k in ("time_grid", "pos_embed_reference_grid"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "EdenConfig":
        return cls.from_dict(json.loads(text))

    # ---------------------------------------------------------------- from weights
    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], num_heads: int | None = None, **overrides) -> "EdenConfig":
        """Read the architecture from tensor shapes of an official-layout state dict (whole or either half).

        Raises ``CheckpointError`` naming the missing tensor when a shape cannot be read.
        """

        def shape(key: str) -> tuple[int, ...]:
            if key not in sd:
                raise CheckpointError(f"not an EDEN checkpoint: tensor '{key}' is missing")
            return tuple(sd[key].shape)

        def depth(prefix: str) -> int:
            return len({k.split(".")[1] for k in sd if k.startswith(prefix)})

        hidden, in_dim, patch, _ = shape("patch_cond_dit.weight")
        d = dict(in_dim=in_dim, patch_size=patch, hidden_dim=hidden)
        if "proj_in.weight" in sd:  # the DiT+decoder half is present
            d["latent_dim"] = shape("proj_in.weight")[1]
            d["dit_depth"] = depth("dit_blocks.")
            d["decoder_depth"] = depth("decoder_blocks.")
            d["mlp_ratio"] = shape("dit_blocks.0.mlp.fc1.weight")[0] / hidden
            d["qkv_bias"] = "dit_blocks.0.self_attn.qkv.bias" in sd
            d["out_dim"] = shape("unpatchify.1.weight")[0] // (patch * patch)
            d["timestep_freq_dim"] = shape("denoise_timestep_embedder.mlp.0.weight")[1]
        d["num_heads"] = num_heads if num_heads else max(1, hidden // 64)
        d.update(overrides)
        return cls(**d)

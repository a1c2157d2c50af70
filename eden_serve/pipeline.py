"""Sampling logic: padding, frame difference, noise, the Euler steps, and the frame out.

Like a diffusers pipeline this owns no weights: the functions are handed the modules. Everything here works on
batches (B frames for the encoder, B pairs for the generator) so a server can batch same-size requests.
"""
from __future__ import annotations

import contextlib
import itertools
import secrets
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import EdenConfig
from .difference import frame_difference_uint8  # noqa: F401 - the client's CPU version, part of this API
from .model import EdenEncoder, EdenGenerator, EncodedFrames
from .protocol import MAX_SEED



# ------------------------------------------------------------------ geometry
@dataclass(frozen=True)
class Geometry:
    """Original size, padding (left, right, top, bottom) and patch grid of a frame size."""
    height: int
    width: int
    padding: tuple[int, int, int, int]
    patch_size: int

    @classmethod
    def for_size(cls, height: int, width: int, cfg: EdenConfig) -> "Geometry":
        m = cfg.pad_multiple
        pad_h, pad_w = -height % m, -width % m
        return cls(height, width, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), cfg.patch_size)

    @property
    def padded_size(self) -> tuple[int, int]:
        left, right, top, bottom = self.padding
        return self.height + top + bottom, self.width + left + right

    @property
    def grid(self) -> tuple[int, int]:
        ph, pw = self.padded_size
        return ph // self.patch_size, pw // self.patch_size

    @property
    def latent_tokens(self) -> int:
        gh, gw = self.grid
        return (gh // 2) * (gw // 2)

    def pad(self, frames: torch.Tensor) -> torch.Tensor:
        return F.pad(frames, list(self.padding), mode="replicate")

    def unpad(self, frames: torch.Tensor) -> torch.Tensor:
        left, _, top, _ = self.padding
        return frames[..., top:top + self.height, left:left + self.width]


# ------------------------------------------------------------------ encoder side
def frame_difference(frames0: torch.Tensor, frames1: torch.Tensor, cfg: EdenConfig) -> torch.Tensor:
    """8-bit frames [B, C, H, W] as values in [0, 1] -> the DiT's difference input [B, 1]: z-scored mean cosine
    similarity of the pixels. Computed on the 8-bit values with exact products and float64 pixel by pixel, then
    rounded to float32: the same number as ``difference.frame_difference_uint8`` on the CPU (up to float64 summation
    order), so a pair's frames give one value whether they came in one encoder request or in two (the official
    float32 formula agrees to ~1e-6, and would make the output depend on how the client grouped the frames)."""
    a, b = (frames0.double() * 255).round(), (frames1.double() * 255).round()  # exact 8-bit values
    dot = (a * b).sum(dim=1)  # [B, H, W], exact
    norms = (a * a).sum(dim=1) * (b * b).sum(dim=1)  # exact (< 2**53)
    cos = torch.where(norms > 0, dot / norms.clamp_min(1e-300).sqrt(), torch.zeros_like(dot))
    return ((cos.mean(dim=(1, 2)) - cfg.cos_sim_mean) / cfg.cos_sim_std).float().unsqueeze(1)


@torch.inference_mode()
def encode_frames(encoder: EdenEncoder, frames: torch.Tensor, counts: list[int] | None = None,
                  leads: list[bool] | None = None) -> tuple[EncodedFrames, list[torch.Tensor]]:
    """Frames [K, C, H, W] in [0, 1], all of one size -> tokens of every frame, and the differences between
    consecutive frames within each group of ``counts`` frames (one group of all K by default): [count-1] each. A
    group whose ``leads`` entry is true starts with a lead frame, sent only for its difference with the next: it
    has a difference and no tokens (a client sends the frame before a chunk so that the pair they make needs no
    difference computed on its side)."""
    geo = Geometry.for_size(frames.shape[-2], frames.shape[-1], encoder.cfg)
    counts = counts or [frames.shape[0]]
    groups = frames.split(counts)
    differences = [frame_difference(g[:-1], g[1:], encoder.cfg).squeeze(1) for g in groups]
    if leads and any(leads):
        starts = [0, *itertools.accumulate(counts)][:-1]
        keep = [k for start, count, lead in zip(starts, counts, leads) for k in range(start + lead, start + count)]
        frames = frames[torch.tensor(keep, device=frames.device)]
    encoded = encoder(geo.pad(frames))
    return encoded, differences


# ------------------------------------------------------------------ generator side
@dataclass
class PairBatch:
    """B pairs of one size, on the generator's device: what the DiT+decoder needs."""
    dit: torch.Tensor  # [B, 2, N, D]
    dec: torch.Tensor  # [B, 2, N, D]
    mean: torch.Tensor  # [B, 2]
    std: torch.Tensor  # [B, 2]
    difference: torch.Tensor  # [B]
    geometry: Geometry


def make_noise(geometry: Geometry, latent_dim: int, seed: int | None, device: torch.device) -> torch.Tensor:
    """The official recipe: CPU generator seeded with ``seed`` -> [1, n, L] float32, moved to ``device``.

    Without a seed, fresh noise from the OS's entropy.
    """
    if seed is None:
        seed = secrets.randbelow(MAX_SEED)
    gen = torch.Generator("cpu").manual_seed(seed)
    return torch.randn((1, geometry.latent_tokens, latent_dim), generator=gen).to(device)


def precision(device: torch.device | str, dtype: torch.dtype):
    """Autocast to ``dtype`` for the matrix work (norms, softmax and the ODE state stay float32); float32: none."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


@torch.inference_mode()
def sample_latents(generator: EdenGenerator, pairs: PairBatch, noise: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Euler steps of the velocity ODE along the time grid: noise [B, n, L] -> latents [B, n, L] (unscaled).

    No host synchronisation inside: the times are Python floats and every tensor stays on the device.
    """
    cfg = generator.cfg
    x = noise.float()
    B = x.shape[0]
    with precision(x.device, dtype):
        ctx = generator.dit_context(pairs.dit, pairs.difference.unsqueeze(1).float(), pairs.geometry.grid)
        for t0, t1 in zip(cfg.time_grid[:-1], cfg.time_grid[1:]):
            t = torch.full((B,), t0, dtype=torch.float32, device=x.device)
            x = x + (t1 - t0) * generator.velocity(x, t, ctx).float()
    return x / cfg.latent_scale + cfg.latent_shift


@torch.inference_mode()
def decode_frames(generator: EdenGenerator, pairs: PairBatch, latents: torch.Tensor,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Latents [B, n, L] -> interpolated frames [B, C, H, W] in [0, 1] at the original size."""
    with precision(latents.device, dtype):
        y = generator.decode(latents, pairs.dec, pairs.geometry.grid).float()  # [B, C, H', W']
    mean = pairs.mean.mean(dim=1).view(-1, 1, 1, 1)  # the pair's averaged statistics
    std = pairs.std.mean(dim=1).view(-1, 1, 1, 1)
    return pairs.geometry.unpad((y * std + mean).clamp(0.0, 1.0))


def interpolate(generator: EdenGenerator, pairs: PairBatch, noise: torch.Tensor,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """B pairs -> B middle frames [B, C, H, W] in [0, 1]."""
    return decode_frames(generator, pairs, sample_latents(generator, pairs, noise, dtype), dtype)


def to_uint8(frames: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[B, C, H, W] in [0, 1] -> [B, H, W, C] uint8, rounded half up (as torchvision's save_image): on the CPU, or
    copied into ``out`` without waiting (pinned host memory: the copy out of the GPU runs at full speed; the caller
    synchronises). The cast writes the channels-last layout directly: no separate uint8 pass to reorder it."""
    b, c, h, w = frames.shape
    scaled = frames.mul(255).add_(0.5).clamp_(0, 255)
    dense = torch.empty((b, h, w, c), dtype=torch.uint8, device=frames.device)
    dense.permute(0, 3, 1, 2).copy_(scaled)
    if out is None:
        return dense.cpu()
    return out.copy_(dense, non_blocking=True)

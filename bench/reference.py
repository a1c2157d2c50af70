"""The speed reference: EDEN computed the way the official ``inference.py`` does it, in one module.

Written for the benchmark, not for serving: one monolithic model holding every weight under the official names,
float32 (the official loop runs no autocast, no ``.half()`` and sets no TF32 flag), one pair at a time, and the
official code's work pattern kept on purpose (official names from ``src/models/EDEN.py``):
- the conditioning frames are normalised and patch-embedded again (both the DiT's and the decoder's tokens) at every
  Euler step, as ``EDEN.denoise`` re-runs ``patch_cond``;
- the sin-cos positions are rebuilt with NumPy on the host and copied to the device at every Euler step, the
  patch grid's in ``patch_cond`` and the latent grid's in ``denoise`` (``get_pos_embedding``);
- the decoder uses what the last Euler step left (the official keeps ``cond_dec``, ``stats``, ``pos_embedding`` and
  ``query_pos_embedding`` on the module and ``EDEN.decode`` reads them): it embeds and positions nothing again;
- the temporal attention projects all 9 (DiT) or 3 (decoder) window tokens and attends over every row, keeping only
  the middle one; the windows are regathered in every block;
- the attention kernels are the library's fused ones (the official release runs xformers; here SDPA), so the
  reference is not slowed by an unfused softmax;
- ``torch.cuda.empty_cache()`` after every frame, as the official video loop does.
It does less host work than the official loop in one place: the Euler steps are a Python loop, not torchdiffeq's
``odeint`` (whose input checks and time comparisons synchronise with the device a few times a frame).
It gives the same frames as eden_serve (tests/test_reference.py checks it on the official fixture);
bench/official_loop.py times it next to the official code itself.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from eden_serve import pipeline
from eden_serve.config import EdenConfig


def _numpy_positions(gh: int, gw: int, stride: int, dim: int, ref=(16, 28)) -> torch.Tensor:
    rows = np.arange(gh // stride, dtype=np.float32) / (gh / ref[0])
    cols = np.arange(gw // stride, dtype=np.float32) / (gw / ref[1])
    col, row = np.meshgrid(cols, rows)

    def sincos(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([sincos(dim // 2, col), sincos(dim // 2, row)], axis=1)
    return torch.from_numpy(emb).float().unsqueeze(0)


class _Attn(nn.Module):
    def __init__(self, dim, heads, bias):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def attend(self, x):  # [B, T, D] -> [B, T, D], every row
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D)

    def forward(self, x):
        return self.proj(self.attend(x))

    def temporal(self, x, x0, x1, gh, gw):
        B, n, D = x.shape
        if x0.shape[1] != n:  # DiT: the 2x2 patches of each frame around each latent token
            def windows(t):
                return t.view(B, gh // 2, 2, gw // 2, 2, D).permute(0, 1, 3, 2, 4, 5).reshape(B, n, 4, D)
            seq = torch.cat([windows(x0), x.unsqueeze(2), windows(x1)], dim=2).reshape(B * n, 9, D)
        else:
            seq = torch.stack([x0, x, x1], dim=2).reshape(B * n, 3, D)
        out = self.attend(seq)[:, seq.shape[1] // 2]
        return self.proj(out.reshape(B, n, D))


class _Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D, eps = cfg.hidden_dim, cfg.norm_eps
        self.norm_self_attn, self.norm_temp_attn, self.norm_mlp = (nn.LayerNorm(D, eps=eps) for _ in range(3))
        self.self_attn = _Attn(D, cfg.num_heads, cfg.qkv_bias)
        self.temp_attn = _Attn(D, cfg.num_heads, cfg.qkv_bias)
        self.mlp = nn.Sequential()
        self.mlp.fc1 = nn.Linear(D, cfg.mlp_hidden_dim)
        self.mlp.act = nn.GELU()
        self.mlp.fc2 = nn.Linear(cfg.mlp_hidden_dim, D)


class ReferenceEden(nn.Module):
    """All of EDEN under the official parameter names; ``interpolate`` is the official per-pair loop."""

    def __init__(self, cfg: EdenConfig):
        super().__init__()
        D, L, p = cfg.hidden_dim, cfg.latent_dim, cfg.patch_size
        self.cfg = cfg
        ln = lambda: nn.LayerNorm(D, eps=cfg.norm_eps)  # noqa: E731
        self.proj_in = nn.Linear(L, D)
        self.patch_cond_dit = nn.Conv2d(cfg.in_dim, D, p, p)
        self.norm_cond_dit = ln()
        self.dit_blocks = nn.ModuleList([_Block(cfg) for _ in range(cfg.dit_depth)])
        self.norm_out = ln()
        self.proj_out = nn.Linear(D, 2 * L)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.difference_embedder = nn.Linear(1, D)
        self.denoise_timestep_embedder = nn.Module()
        self.denoise_timestep_embedder.mlp = nn.Sequential(nn.Linear(cfg.timestep_freq_dim, D), nn.SiLU(),
                                                           nn.Linear(D, D))
        self.patch_cond_dec = nn.Conv2d(cfg.in_dim, D, p, p)
        self.norm_cond_dec = ln()
        self.proj_token = nn.Linear(L, D)
        self.decoder_blocks = nn.ModuleList([_Block(cfg) for _ in range(cfg.decoder_depth)])
        f = p * p * cfg.out_dim
        self.unpatchify = nn.Sequential(ln(), nn.Linear(D, f), nn.GELU(), nn.Linear(f, f))

    def _cond(self, frames):  # padded pair [2, C, H, W] -> tokens, averaged stats (official patch_cond)
        flat = frames.flatten(1)
        mean, std = flat.mean(1).view(-1, 1, 1, 1), flat.std(1).view(-1, 1, 1, 1) + 1e-8
        x = (frames - mean) / std
        gh, gw = frames.shape[-2] // self.cfg.patch_size, frames.shape[-1] // self.cfg.patch_size
        pos = _numpy_positions(gh, gw, 1, self.cfg.hidden_dim).to(frames.device)
        dit = self.norm_cond_dit(self.patch_cond_dit(x).flatten(2).transpose(1, 2) + pos)
        dec = self.norm_cond_dec(self.patch_cond_dec(x).flatten(2).transpose(1, 2) + pos)
        return dit, dec, (mean.mean(0), std.mean(0)), pos

    def _timestep(self, t):
        half = self.cfg.timestep_freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        args = t[:, None].float() * freqs[None]
        return self.denoise_timestep_embedder.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))

    def velocity(self, x, t, frames, difference):
        """One ``EDEN.denoise`` call: the velocity, and what the decoder reuses from the last step."""
        dit, dec, stats, pos = self._cond(frames)  # re-embedded at every step, as the official denoise does
        gh, gw = frames.shape[-2] // self.cfg.patch_size, frames.shape[-1] // self.cfg.patch_size
        mod = self.adaLN_modulation(self._timestep(t) + self.difference_embedder(difference))
        query_pos = _numpy_positions(gh, gw, 2, self.cfg.hidden_dim).to(x.device)
        h = self.proj_in(x) + query_pos
        t0, t1 = dit.chunk(2, dim=0)
        for blk in self.dit_blocks:
            s1, c1, g1, s2, c2, g2 = mod.chunk(6, dim=1)
            h = h + g1.unsqueeze(1) * blk.self_attn(blk.norm_self_attn(h) * (1 + c1.unsqueeze(1)) + s1.unsqueeze(1))
            h = h + blk.temp_attn.temporal(blk.norm_temp_attn(h), t0, t1, gh, gw)
            h = h + g2.unsqueeze(1) * blk.mlp(blk.norm_mlp(h) * (1 + c2.unsqueeze(1)) + s2.unsqueeze(1))
        return self.proj_out(self.norm_out(h)).chunk(2, dim=-1)[0], (dec, stats, pos, query_pos)

    def decode(self, z, last_step, grid):
        """``EDEN.decode``: latents -> frame, from the last Euler step's decoder tokens, statistics and positions."""
        dec, (mean, std), pos, query_pos = last_step
        gh, gw = grid
        q = self.proj_token(z)
        y = F.interpolate(q.transpose(1, 2).reshape(1, -1, gh // 2, gw // 2), scale_factor=2.0, mode="bicubic",
                          align_corners=False).flatten(2).transpose(1, 2) + pos
        q = q + query_pos
        d0, d1 = dec.chunk(2, dim=0)
        for blk in self.decoder_blocks:
            n = y.shape[1]
            x = torch.cat([y, q], dim=1)
            y = (x + blk.self_attn(blk.norm_self_attn(x)))[:, :n]
            y = y + blk.temp_attn.temporal(blk.norm_temp_attn(y), d0, d1, gh, gw)
            y = y + blk.mlp(blk.norm_mlp(y))
        p, C = self.cfg.patch_size, self.cfg.out_dim
        y = self.unpatchify(y).view(1, gh, gw, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(1, C, gh * p, gw * p)
        return y * std + mean

    @torch.no_grad()
    def interpolate(self, frame0, frame1, noise):
        """[1, C, H, W] frames in [0, 1] and noise [1, n, L] -> the middle frame, as the official loop makes it."""
        cfg = self.cfg
        h, w = frame0.shape[-2:]
        ph, pw = -h % cfg.pad_multiple, -w % cfg.pad_multiple
        pad = [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]
        difference = ((torch.cosine_similarity(frame0, frame1).mean(dim=[1, 2]) - cfg.cos_sim_mean)
                      / cfg.cos_sim_std).unsqueeze(1)
        frames = F.pad(torch.cat([frame0, frame1]), pad, mode="replicate")
        x = noise
        grid = torch.tensor(cfg.time_grid, device=noise.device)
        last_step = None
        for i in range(len(cfg.time_grid) - 1):
            t = torch.ones(1, device=noise.device) * grid[i]
            v, last_step = self.velocity(x, t, frames, difference)
            x = x + (grid[i + 1] - grid[i]) * v
        patches = (frames.shape[-2] // cfg.patch_size, frames.shape[-1] // cfg.patch_size)
        out = self.decode(x / cfg.latent_scale + cfg.latent_shift, last_step, patches)
        out = out[..., pad[2]:pad[2] + h, pad[0]:pad[0] + w].clamp(0, 1)
        if out.is_cuda:
            torch.cuda.empty_cache()
        return out


def load_reference(state_dict, cfg: EdenConfig, device) -> ReferenceEden:
    model = ReferenceEden(cfg)
    model.load_state_dict(state_dict, strict=True)
    return model.to(device).eval()


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_clip(model: ReferenceEden, clip: list, noise_for: Callable[[int], torch.Tensor],
              device) -> tuple[float, list]:
    """The benchmark's measure of the reference: a clip of [H, W, 3] uint8 frames already in memory -> seconds per
    generated frame and the generated frames ([H, W, 3] uint8). Per pair, like the official video loop: both frames
    uploaded, the middle frame made, brought back to the host; ``noise_for(i)`` gives pair i's noise (on the device).
    One pair first as warm-up, not timed."""
    def one(i):
        f0 = torch.from_numpy(clip[i]).to(device).permute(2, 0, 1)[None].float() / 255
        f1 = torch.from_numpy(clip[i + 1]).to(device).permute(2, 0, 1)[None].float() / 255
        return pipeline.to_uint8(model.interpolate(f0, f1, noise_for(i)))[0].numpy()

    one(0)  # warm-up
    _sync(device)
    t = time.perf_counter()
    out = [one(i) for i in range(len(clip) - 1)]
    _sync(device)
    return (time.perf_counter() - t) / (len(clip) - 1), out

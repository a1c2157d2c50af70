"""EDEN, split into its two served halves.

``EdenEncoder``  frames -> two token sets per frame (``patch_cond_dit`` / ``patch_cond_dec`` + LayerNorms).
``EdenGenerator`` the DiT (velocity of the latent ODE) and the decoder (latent + decoder tokens -> frame).

Parameter names and shapes are those of the official ``EDEN`` module, so each half loads its share of the official
``state_dict`` strictly. The modules are stateless: everything a call needs (patch grid, normalisation statistics,
conditioning tokens) is passed in, so one loaded model serves any number of sizes and requests at once.

Reading order: embeddings, attention, blocks, the two halves.
Shapes: B batch (pairs or frames), H x W padded frame, gh x gw patch grid (N = gh*gw tokens), the latent grid is
half of it (n = N/4 tokens), D hidden size, L latent size.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import EdenConfig


# Named ranges for torch.profiler (bench/kernels.py groups kernel time by them). Off unless a profiler asks; never
# entered inside torch.compile'd code (a compiled block is one range, named by its caller).
PROFILE_RANGES = False


def profile_range(name: str):
    if torch.compiler.is_compiling() or not PROFILE_RANGES:  # (compiled code does not even read the flag)
        return contextlib.nullcontext()
    return torch.profiler.record_function(name)


#################################################################################
#                          Timestep and position embeddings                     #
#################################################################################

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of scalar times ``t`` [B] -> [B, dim] (cos first, then sin)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_dim: int, freq_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))  # [B] -> [B, D]


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2))
    out = pos.reshape(-1, 1) * omega[None]  # [M, dim/2]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # [M, dim]


@functools.lru_cache(maxsize=64)
def position_embedding(grid_h: int, grid_w: int, stride: int, dim: int, reference_grid: tuple[int, int],
                       device: torch.device) -> torch.Tensor:
    """2-D sin-cos positions of a (grid_h / stride) x (grid_w / stride) token grid -> [1, tokens, dim] float32.

    Coordinates are scaled so that the patch grid spans ``reference_grid`` units (the official
    ``interpolation_scale``). The first half of the channels encodes the column, the second the row. Built in
    float64 on the device and cached per size: treat the result as read-only.
    """
    scale_h, scale_w = grid_h / reference_grid[0], grid_w / reference_grid[1]
    rows = torch.arange(grid_h // stride, dtype=torch.float32, device=device) / scale_h
    cols = torch.arange(grid_w // stride, dtype=torch.float32, device=device) / scale_w
    row, col = torch.meshgrid(rows.double(), cols.double(), indexing="ij")
    emb = torch.cat([_sincos_1d(dim // 2, col), _sincos_1d(dim // 2, row)], dim=1)
    return emb.float().unsqueeze(0)


#################################################################################
#                                   Attention                                   #
#################################################################################

class SelfAttention(nn.Module):
    """Multi-head self-attention; ``num_queries`` limits the outputs to the first tokens (keys see all)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=qkv_bias)

    def forward(self, x: torch.Tensor, num_queries: int | None = None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # [B, h, T, hd]
        if num_queries is not None:
            q = q[:, :, :num_queries]  # [B, h, Tq, hd]
        with profile_range("sdpa"):
            x = F.scaled_dot_product_attention(q, k, v)  # [B, h, Tq, hd] (laid out as [B, Tq, h, hd]: no copy below)
        return self.proj(x.transpose(1, 2).reshape(B, -1, D))  # [B, Tq, D]


class TemporalContext(NamedTuple):
    """Keys and values of the co-located tokens of both frames, per query: [B, n, h, 2w, hd] each."""
    k: torch.Tensor
    v: torch.Tensor


class TemporalAttention(nn.Module):
    """Each query token attends to itself and to its w co-located tokens in each of the two frames.

    The official module runs attention over the whole (2w+1)-token window and keeps the middle output; only the
    query's row is ever used, so it is the only one computed, and the frames' keys/values, which do not depend on the
    query, are computed once per pair (``context``) and reused across the sampling steps.

    ``fused`` (set by eden_serve.acceleration for torch.compile): the same attention written as products and sums
    with one softmax over both score sets, so that no [B, n, h, 2w+1, hd] concatenation is built and the compiler
    makes one kernel of it. Eager it would be slower, and float32 sums run in another order (about 1e-7 apart).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.fused = False
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=qkv_bias)

    def context(self, frames: torch.Tensor, window: int, grid: tuple[int, int]) -> TemporalContext:
        """Both frames' tokens [B, 2, N, D] on the gh x gw grid -> keys/values grouped by query (window 1 or 4 = 2x2
        patches)."""
        D = frames.shape[-1]
        w_kv = self.qkv.weight[D:]  # [2D, D] keys then values
        b_kv = None if self.qkv.bias is None else self.qkv.bias[D:]
        kv = F.linear(frames, w_kv, b_kv)  # [B, 2, N, 2D]
        kv = _group_windows(kv, window, grid)  # [B, n, 2, w, 2D]
        B, n = kv.shape[:2]
        kv = kv.reshape(B, n, 2 * window, 2, self.num_heads, D // self.num_heads)  # [B, n, 2w, 2, h, hd]
        k, v = kv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # [B, n, h, 2w, hd]
        return TemporalContext(k, v)

    def forward(self, x: torch.Tensor, ctx: TemporalContext) -> torch.Tensor:
        B, n, D = x.shape
        h, hd = self.num_heads, D // self.num_heads
        q, k, v = self.qkv(x).view(B, n, 3, h, 1, hd).unbind(2)  # [B, n, h, 1, hd]
        if self.fused:
            return self.proj(_fused_window_attention(q, k, v, ctx, hd ** -0.5).reshape(B, n, D))
        k = torch.cat([ctx.k, k], dim=3)  # [B, n, h, 2w+1, hd]
        v = torch.cat([ctx.v, v], dim=3)
        attn = (q @ k.transpose(-1, -2)) * hd ** -0.5  # [B, n, h, 1, 2w+1]
        x = attn.softmax(dim=-1) @ v  # [B, n, h, 1, hd]
        return self.proj(x.reshape(B, n, D))  # [B, n, D]


def _fused_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: TemporalContext,
                            scale: float) -> torch.Tensor:
    """Softmax attention of each query [B, n, h, 1, hd] over the frames' keys [B, n, h, 2w, hd] and its own key,
    without concatenating them -> [B, n, h, hd]."""
    w = ctx.k.shape[3]
    q = q.float()  # products and sums in float32, as the matmul accumulates
    scores = torch.cat([(q * ctx.k).sum(-1), (q * k).sum(-1)], dim=-1) * scale  # [B, n, h, 2w+1]
    p = scores.softmax(dim=-1, dtype=torch.float32)
    return (p[..., :w, None] * ctx.v).sum(3) + p[..., w:] * v.squeeze(3)  # [B, n, h, hd] float32


def _group_windows(x: torch.Tensor, window: int, grid: tuple[int, int]) -> torch.Tensor:
    """[B, F, N, C] tokens on the gh x gw grid -> [B, n, F, window, C]: each query's co-located tokens."""
    B, Fr, N, C = x.shape
    if window == 1:
        return x.transpose(1, 2).unsqueeze(3)  # [B, N, F, 1, C]
    gh, gw = grid
    x = x.view(B, Fr, gh // 2, 2, gw // 2, 2, C).permute(0, 2, 4, 1, 3, 5, 6)  # [B, gh/2, gw/2, F, 2, 2, C]
    return x.reshape(B, N // 4, Fr, 4, C)


#################################################################################
#                                     Blocks                                    #
#################################################################################

@functools.lru_cache(maxsize=32)
def _bicubic2x_matrix(size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[2*size, size]: row o holds the weights of ``F.interpolate(scale_factor=2, mode="bicubic")`` for output o
    (the interpolation of each unit impulse, so borders and the kernel are exactly PyTorch's)."""
    impulses = torch.eye(size, dtype=torch.float64).view(size, 1, size, 1)  # [size, 1, size, 1]
    out = F.interpolate(impulses, scale_factor=(2.0, 1.0), mode="bicubic", align_corners=False)  # [size, 1, 2s, 1]
    return out[:, 0, :, 0].t().contiguous().to(device=device, dtype=dtype)


def upsample2x_bicubic(x: torch.Tensor) -> torch.Tensor:
    """``F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)`` of [B, C, h, w] as two small matrix
    products (the filter is separable and linear). PyTorch's CUDA kernel gives each output pixel one thread that loops
    over all B*C channels: with 768 channels and a small grid that took 4.3 ms a batch of 4 whatever the frame size."""
    h, w = x.shape[-2:]
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    rows = _bicubic2x_matrix(h, x.device, dtype)  # [2h, h]
    cols = _bicubic2x_matrix(w, x.device, dtype)  # [2w, w]
    with torch.autocast(x.device.type, enabled=False):  # in x's precision, as the interpolation it replaces
        return torch.matmul(torch.matmul(rows, x.to(dtype)), cols.t()).to(x.dtype)  # [B, C, 2h, 2w]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """The layers both kinds of block have (official names): self-attention, temporal attention, MLP, each with
    its LayerNorm. The DiT and decoder blocks differ only in how they chain them."""

    def __init__(self, cfg: EdenConfig):
        super().__init__()
        D, eps = cfg.hidden_dim, cfg.norm_eps
        self.norm_self_attn = nn.LayerNorm(D, eps=eps)
        self.self_attn = SelfAttention(D, cfg.num_heads, cfg.qkv_bias)
        self.norm_temp_attn = nn.LayerNorm(D, eps=eps)
        self.temp_attn = TemporalAttention(D, cfg.num_heads, cfg.qkv_bias)
        self.norm_mlp = nn.LayerNorm(D, eps=eps)
        self.mlp = Mlp(D, cfg.mlp_hidden_dim)


class DiTBlock(Block):
    """adaLN-modulated self-attention, temporal attention to both frames' 2x2 patches, modulated MLP."""

    def forward(self, x: torch.Tensor, ctx: TemporalContext, modulation: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)  # [B, D] each
        with profile_range("self_attn"):
            x = x + gate_msa.unsqueeze(1) * self.self_attn(modulate(self.norm_self_attn(x), shift_msa, scale_msa))
        with profile_range("temporal_attn"):
            x = x + self.temp_attn(self.norm_temp_attn(x), ctx)  # [B, n, D]
        with profile_range("mlp"):
            x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm_mlp(x), shift_mlp, scale_mlp))
        return x  # [B, n, D]


class DecoderBlock(Block):
    """Self-attention over frame tokens and latent queries (frame tokens updated), temporal attention, MLP."""

    def forward(self, y: torch.Tensor, queries: torch.Tensor, ctx: TemporalContext) -> torch.Tensor:
        N = y.shape[1]
        with profile_range("self_attn"):
            x = torch.cat([y, queries], dim=1)  # [B, N + n, D]
            y = y + self.self_attn(self.norm_self_attn(x), num_queries=N)  # [B, N, D]
        with profile_range("temporal_attn"):
            y = y + self.temp_attn(self.norm_temp_attn(y), ctx)
        with profile_range("mlp"):
            y = y + self.mlp(self.norm_mlp(y))
        return y  # [B, N, D]


#################################################################################
#                                  The two halves                               #
#################################################################################

class EncodedFrames(NamedTuple):
    dit: torch.Tensor  # [B, N, D] tokens conditioning the DiT
    dec: torch.Tensor  # [B, N, D] tokens conditioning the decoder
    mean: torch.Tensor  # [B] per-frame mean of the padded frame
    std: torch.Tensor  # [B] per-frame (unbiased) std of the padded frame, + eps


class EdenEncoder(nn.Module):
    """Padded frames in [0, 1] -> per-frame tokens and normalisation statistics. Each frame is independent."""

    STD_EPS = 1e-8

    def __init__(self, cfg: EdenConfig):
        super().__init__()
        D, p = cfg.hidden_dim, cfg.patch_size
        self.cfg = cfg
        self.patch_cond_dit = nn.Conv2d(cfg.in_dim, D, kernel_size=p, stride=p)
        self.norm_cond_dit = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.patch_cond_dec = nn.Conv2d(cfg.in_dim, D, kernel_size=p, stride=p)
        self.norm_cond_dec = nn.LayerNorm(D, eps=cfg.norm_eps)

    def forward(self, frames: torch.Tensor) -> EncodedFrames:
        cfg, p = self.cfg, self.cfg.patch_size
        B = frames.shape[0]
        grid = (frames.shape[2] // p, frames.shape[3] // p)
        mean, std = frames.mean(dim=(1, 2, 3)), frames.std(dim=(1, 2, 3)) + self.STD_EPS  # [B] (any memory layout)
        x = patchify(frames, p).sub_(mean.view(B, 1, 1)).div_(std.view(B, 1, 1))  # [B, N, C*p*p] normalised
        pos = position_embedding(*grid, 1, cfg.hidden_dim, cfg.pos_embed_reference_grid, x.device)  # [1, N, D]
        dit = self.norm_cond_dit(patch_embed(x, self.patch_cond_dit) + pos)  # [B, N, D]
        dec = self.norm_cond_dec(patch_embed(x, self.patch_cond_dec) + pos)  # [B, N, D]
        return EncodedFrames(dit, dec, mean, std)


def patchify(frames: torch.Tensor, p: int) -> torch.Tensor:
    """Frames [B, C, H, W] (any memory layout) -> non-overlapping p x p patches [B, N, C*p*p], row-major over the
    grid, each patch in the (C, p, p) order of a Conv2d weight: one copy."""
    B, C, H, W = frames.shape
    x = frames.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # [B, gh, gw, C, p, p]
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def patch_embed(patches: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A kernel = stride patch embedding as the matrix product it is: patches [B, N, C*p*p] -> [B, N, D].

    The same numbers as ``conv(frames).flatten(2).transpose(1, 2)`` (up to summation order) at a fraction of the
    GPU time: cuDNN's float32 convolution for this shape took 2.3 ms of a 1080p frame's 4.1 on an H200.
    """
    return F.linear(patches, conv.weight.flatten(1), conv.bias)


class DiTContext(NamedTuple):
    """What the DiT needs at every step that does not change between steps."""
    temporal: tuple[TemporalContext, ...]  # per block
    difference: torch.Tensor  # [B, D] embedded frame difference
    grid: tuple[int, int]


def _matrix_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` once in the layout and dtype the matrix products take (contiguous; autocast's dtype when it is on), for
    an input every block multiplies: the same numbers as autocast casting it at each product, without the copies."""
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type), memory_format=torch.contiguous_format)
    return x.contiguous()


class EdenGenerator(nn.Module):
    """DiT (velocity of the latent flow) and decoder (latent -> frame), conditioned on a pair's tokens."""

    def __init__(self, cfg: EdenConfig):
        super().__init__()
        D, L, p = cfg.hidden_dim, cfg.latent_dim, cfg.patch_size
        self.cfg = cfg
        # DiT
        self.proj_in = nn.Linear(L, D)
        self.dit_blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.dit_depth)])
        self.norm_out = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.proj_out = nn.Linear(D, 2 * L)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.difference_embedder = nn.Linear(1, D)
        self.denoise_timestep_embedder = TimestepEmbedder(D, cfg.timestep_freq_dim)
        # decoder
        self.proj_token = nn.Linear(L, D)
        self.decoder_blocks = nn.ModuleList([DecoderBlock(cfg) for _ in range(cfg.decoder_depth)])
        final_dim = p * p * cfg.out_dim
        self.unpatchify = nn.Sequential(nn.LayerNorm(D, eps=cfg.norm_eps), nn.Linear(D, final_dim), nn.GELU(),
                                        nn.Linear(final_dim, final_dim))

    def _pos(self, grid: tuple[int, int], stride: int, device: torch.device) -> torch.Tensor:
        return position_embedding(*grid, stride, self.cfg.hidden_dim, self.cfg.pos_embed_reference_grid, device)

    # ------------------------------------------------------------------ DiT
    def dit_context(self, frames: torch.Tensor, difference: torch.Tensor, grid: tuple[int, int]) -> DiTContext:
        """Both frames' DiT tokens [B, 2, N, D], difference [B, 1] -> per-pair context reused by every step."""
        with profile_range("dit.context"):
            frames = _matrix_input(frames)
            temporal = tuple(blk.temp_attn.context(frames, window=4, grid=grid) for blk in self.dit_blocks)
            return DiTContext(temporal, self.difference_embedder(difference), grid)

    def velocity(self, latents: torch.Tensor, t: torch.Tensor, ctx: DiTContext) -> torch.Tensor:
        """latents [B, n, L] at times t [B] -> velocity [B, n, L]."""
        with profile_range("dit.head"):
            cond = self.denoise_timestep_embedder(t) + ctx.difference  # [B, D]
            modulation = self.adaLN_modulation(cond)  # [B, 6D]
            x = self.proj_in(latents) + self._pos(ctx.grid, 2, latents.device)  # [B, n, D]
        with profile_range("dit.block"):
            for blk, temporal in zip(self.dit_blocks, ctx.temporal):
                x = blk(x, temporal, modulation)  # [B, n, D]
        with profile_range("dit.head"):
            v, _ = self.proj_out(self.norm_out(x)).chunk(2, dim=-1)  # [B, n, L] (second half unused)
        return v

    # ------------------------------------------------------------------ decoder
    def decode(self, latents: torch.Tensor, frames: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """latents [B, n, L] (unscaled), both frames' decoder tokens [B, 2, N, D] -> normalised frame [B, C, H, W]."""
        B, p = latents.shape[0], self.cfg.patch_size
        gh, gw = grid
        with profile_range("decoder.head"):
            queries = self.proj_token(latents)  # [B, n, D]
            y = queries.transpose(1, 2).reshape(B, -1, gh // 2, gw // 2)  # [B, D, gh/2, gw/2]
            y = upsample2x_bicubic(y)  # [B, D, gh, gw]
            y = y.flatten(2).transpose(1, 2) + self._pos(grid, 1, latents.device)  # [B, N, D]
            queries = queries + self._pos(grid, 2, latents.device)  # [B, n, D]
        with profile_range("decoder.context"):
            frames = _matrix_input(frames)
            ctx = [blk.temp_attn.context(frames, window=1, grid=grid) for blk in self.decoder_blocks]
        with profile_range("decoder.block"):
            for blk, temporal in zip(self.decoder_blocks, ctx):
                y = blk(y, queries, temporal)  # [B, N, D]
        with profile_range("decoder.head"):
            y = self.unpatchify(y)  # [B, N, p*p*C]
            y = y.view(B, gh, gw, p, p, self.cfg.out_dim).permute(0, 5, 1, 3, 2, 4)  # [B, C, gh, p, gw, p]
            return y.reshape(B, self.cfg.out_dim, gh * p, gw * p)  # [B, C, H, W]

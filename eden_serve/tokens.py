"""Between the model's tensors and the wire format's blobs."""
from __future__ import annotations

import warnings

import numpy as np
import torch

from .config import EdenConfig
from .model import EncodedFrames
from .pipeline import Geometry, PairBatch
from .wire import INT8, MAX_SCALE, SCALE_BYTES, TokenBlob, WireError, shape_only


def wire_tensor(encoded: EncodedFrames, dtype: str = "float16") -> torch.Tensor:
    """The frames' tokens as the wire lays them out, on their device: [K, 2, N, D] in ``dtype``, or for int8 the
    rows [K, 2, N, D + 4] of values and scale (``quantize``)."""
    stacked = torch.stack([encoded.dit, encoded.dec], dim=1)
    return quantize(stacked) if dtype == INT8 else stacked.to(getattr(torch, dtype))


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Float tokens [..., D] -> int8 rows [..., D + 4] (wire format version 2): round(x / scale) in [-127, 127],
    then scale = absmax / 127 of the token as float32 bytes. A token with a NaN or infinite value gets a
    non-finite scale (``finite`` sees it)."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True) / 127  # [..., 1]; NaN/inf propagate
    q = torch.where(scale > 0, x / scale, torch.zeros_like(x)).round_().clamp_(-127, 127).to(torch.int8)
    return torch.cat([q, scale.contiguous().view(torch.int8)], dim=-1)


def scales_of(rows: torch.Tensor) -> torch.Tensor:
    """The float32 scales [...] of int8 rows [..., D + 4]."""
    return rows[..., -SCALE_BYTES:].contiguous().view(torch.float32)[..., 0]


def dequantize(rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8 rows [..., D + 4] -> tokens [..., D] in ``dtype``."""
    return (rows[..., :-SCALE_BYTES].to(dtype) * scales_of(rows).to(dtype).unsqueeze(-1))


def finite(tokens: torch.Tensor) -> torch.Tensor:
    """Whether wire tokens are usable (a 0-d bool tensor, no host synchronisation): float values finite, or int8
    scales finite, >= 0 and at most wire.MAX_SCALE."""
    if tokens.dtype == torch.int8:
        s = scales_of(tokens)
        return (torch.isfinite(s) & (s >= 0) & (s <= MAX_SCALE)).all()
    return torch.isfinite(tokens).all()


def check_finite(tokens: torch.Tensor, finite: torch.Tensor | bool) -> None:
    if not finite:
        raise OverflowError(f"tokens are not finite in {tokens.dtype}"
                            + (": ask for float32 tokens" if tokens.dtype == torch.float16 else ""))


def blob_metas(encoded: EncodedFrames, differences: list[torch.Tensor], geometry: Geometry, dtype: str,
               encoder: str = "", leads: list[bool] | None = None) -> list[TokenBlob]:
    """The blobs of encoded frames grouped as ``differences`` is (K_i frames -> K_i-1 differences; a group with a
    lead frame, per ``leads``, has K_i-1 encoded frames and its first difference is the blob's
    ``lead_difference``), with tokens that are only a shape (``wire.shape_only``): headers to write before the
    tokens themselves."""
    mean, std = encoded.mean.tolist(), encoded.std.tolist()
    N, D = encoded.dit.shape[1:]
    D += SCALE_BYTES if dtype == INT8 else 0  # int8 rows: the values, then the token's scale
    blobs, start = [], 0
    for diff, lead in zip(differences, leads or [False] * len(differences)):
        values = diff.tolist()
        lead_difference = values.pop(0) if lead else None
        k = len(values) + 1
        blobs.append(TokenBlob(shape_only((k, 2, N, D), dtype), (geometry.height, geometry.width), geometry.padding,
                               geometry.patch_size, mean[start:start + k], std[start:start + k], values, encoder,
                               lead_difference))
        start += k
    return blobs


def to_blobs(encoded: EncodedFrames, differences: list[torch.Tensor], geometry: Geometry, dtype: str = "float16",
             encoder: str = "", leads: list[bool] | None = None) -> list[TokenBlob]:
    """Encoded frames (all of one size, grouped as ``differences`` is: K_i frames -> K_i-1 differences) -> blobs
    with their tokens on the CPU: the encoder's answer in process (tests, benchmarks); the encoder service itself
    writes ``wire_tensor`` + ``blob_metas`` straight into its answers or segments."""
    tokens = wire_tensor(encoded, dtype)
    ok = finite(tokens)
    host = tokens.cpu().numpy()  # one host synchronisation for both
    check_finite(tokens, ok)
    blobs, start = blob_metas(encoded, differences, geometry, dtype, encoder, leads), 0
    for blob in blobs:
        blob.tokens, start = host[start:start + blob.num_frames], start + blob.num_frames
    return blobs


def check_fits(blob: TokenBlob, cfg: EdenConfig, max_pixels: int | None = None) -> Geometry:
    """Raise WireError unless the blob is a pair this model can use; return its geometry."""
    if blob.num_frames != 2:
        raise WireError(f"expected tokens of a pair (2 frames), got {blob.num_frames} frame(s)")
    if blob.hidden_dim != cfg.hidden_dim:
        raise WireError(f"tokens have hidden size {blob.hidden_dim} but the loaded model has {cfg.hidden_dim}: "
                        "they were made by an encoder of another model size")
    if blob.patch_size != cfg.patch_size:
        raise WireError(f"tokens use {blob.patch_size}-pixel patches but the loaded model uses {cfg.patch_size}")
    if blob.encoder and cfg.encoder_fingerprint and blob.encoder != cfg.encoder_fingerprint:
        raise WireError(f"tokens come from encoder weights {blob.encoder}, but this model pairs with encoder "
                        f"{cfg.encoder_fingerprint}: deploy both halves from the same checkpoint")
    geo = Geometry.for_size(*blob.size, cfg)
    if geo.padding != tuple(blob.padding):
        raise WireError(f"padding {list(blob.padding)} is not this model's padding {list(geo.padding)} for "
                        f"{blob.size[0]}x{blob.size[1]} frames")
    if max_pixels is not None and blob.size[0] * blob.size[1] > max_pixels:
        raise WireError(f"frames of {blob.size[1]}x{blob.size[0]} are over the limit of {max_pixels} pixels")
    return geo


def tokens_tensor(blob: TokenBlob, device: torch.device) -> torch.Tensor:
    """The blob's tokens on ``device`` [K, 2, N, D] (its own dtype); raise WireError if any is not finite."""
    return array_tensor(blob.tokens, device)


def array_tensor(arr: np.ndarray, device: torch.device) -> torch.Tensor:
    """A (possibly read-only) token array on ``device``; raise WireError if any value is not finite."""
    with warnings.catch_warnings():  # a read-only view is fine: the tensor is copied to the device or never written
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(arr) if arr.flags.writeable or device.type != "cpu" else torch.from_numpy(np.array(arr))
    t = t.to(device, non_blocking=True)
    if not finite(t):
        raise WireError("tokens contain NaN or infinite values" if t.dtype != torch.int8
                        else f"int8 tokens have scales that are not finite or outside [0, {MAX_SCALE:g}]")
    return t


def pair_batch(blobs: list[TokenBlob], tensors: list[torch.Tensor], geometry: Geometry,
               dtype: torch.dtype = torch.float32) -> PairBatch:
    """Pairs of one geometry -> a PairBatch on the tensors' device."""
    t = torch.stack(tensors)  # [B, 2, 2, N, D] (int8: [B, 2, 2, N, D + 4], values and scale per token)
    t = dequantize(t, dtype) if t.dtype == torch.int8 else t.to(dtype)
    device = t.device

    def vec(values):
        return torch.tensor(values, dtype=torch.float32, device=device)

    return PairBatch(dit=t[:, :, 0], dec=t[:, :, 1], mean=vec([b.mean for b in blobs]), std=vec([b.std for b in blobs]),
                     difference=vec([b.differences[0] for b in blobs]), geometry=geometry)

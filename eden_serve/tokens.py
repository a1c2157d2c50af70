"""Between the model's tensors and the wire format's blobs."""
from __future__ import annotations

import warnings

import numpy as np
import torch

from .config import EdenConfig
from .model import EncodedFrames
from .pipeline import Geometry, PairBatch
from .wire import TokenBlob, WireError, shape_only


def wire_tensor(encoded: EncodedFrames, dtype: str = "float16") -> torch.Tensor:
    """The frames' tokens as the wire lays them out, on their device: [K, 2, N, D] in ``dtype``."""
    return torch.stack([encoded.dit, encoded.dec], dim=1).to(getattr(torch, dtype))


def check_finite(tokens: torch.Tensor, finite: torch.Tensor | bool) -> None:
    if not finite:
        raise OverflowError(f"tokens are not finite in {tokens.dtype}"
                            + (": ask for float32 tokens" if tokens.dtype == torch.float16 else ""))


def blob_metas(encoded: EncodedFrames, differences: list[torch.Tensor], geometry: Geometry, dtype: str,
               encoder: str = "") -> list[TokenBlob]:
    """The blobs of encoded frames grouped as ``differences`` is (K_i frames -> K_i-1 differences), with tokens
    that are only a shape (``wire.shape_only``): headers to write before the tokens themselves."""
    mean, std = encoded.mean.tolist(), encoded.std.tolist()
    N, D = encoded.dit.shape[1:]
    blobs, start = [], 0
    for diff in differences:
        k = diff.shape[0] + 1
        blobs.append(TokenBlob(shape_only((k, 2, N, D), dtype), (geometry.height, geometry.width), geometry.padding,
                               geometry.patch_size, mean[start:start + k], std[start:start + k], diff.tolist(), encoder))
        start += k
    return blobs


def to_blobs(encoded: EncodedFrames, differences: list[torch.Tensor], geometry: Geometry, dtype: str = "float16",
             encoder: str = "") -> list[TokenBlob]:
    """Encoded frames (all of one size, grouped as ``differences`` is: K_i frames -> K_i-1 differences) -> blobs
    with their tokens on the CPU."""
    tokens = wire_tensor(encoded, dtype)
    finite = torch.isfinite(tokens).all()
    host = tokens.cpu().numpy()  # one host synchronisation for both
    check_finite(tokens, finite)
    blobs, start = blob_metas(encoded, differences, geometry, dtype, encoder), 0
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
    if not torch.isfinite(t).all():
        raise WireError("tokens contain NaN or infinite values")
    return t


def pair_batch(blobs: list[TokenBlob], tensors: list[torch.Tensor], geometry: Geometry,
               dtype: torch.dtype = torch.float32) -> PairBatch:
    """Pairs of one geometry -> a PairBatch on the tensors' device."""
    t = torch.stack(tensors).to(dtype)  # [B, 2, 2, N, D]
    device = t.device

    def vec(values):
        return torch.tensor(values, dtype=torch.float32, device=device)

    return PairBatch(dit=t[:, :, 0], dec=t[:, :, 1], mean=vec([b.mean for b in blobs]), std=vec([b.std for b in blobs]),
                     difference=vec([b.differences[0] for b in blobs]), geometry=geometry)

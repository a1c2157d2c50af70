"""The DiT's frame-difference input computed from 8-bit frames on the CPU with NumPy (no torch): what a client
pairing frames of different encoder calls sends with the pair. ``pipeline.frame_difference`` is the same formula on
the device."""
from __future__ import annotations

import numpy as np

from .config import EdenConfig


def frame_difference_uint8(frame0: np.ndarray, frame1: np.ndarray, cfg: EdenConfig) -> float:
    """``frame_difference`` of two [H, W, 3] uint8 frames on the CPU, for a client pairing frames of different
    encoder calls. Cosine similarity does not depend on the pixels' scale, so it works on the 8-bit values: dot
    products and norms are exact, only the division and the mean are rounded (float64); agrees with the float32
    version to about 1e-6 and is far faster on a CPU."""
    # planar float32: products of 8-bit values summed over 3 channels stay below 2**24, so they are exact
    a = np.ascontiguousarray(frame0.transpose(2, 0, 1), dtype=np.float32)
    b = np.ascontiguousarray(frame1.transpose(2, 0, 1), dtype=np.float32)
    dot = (a * b).sum(0)
    norms = (a * a).sum(0).astype(np.float64) * (b * b).sum(0)
    cos = np.where(norms > 0, dot / np.sqrt(np.maximum(norms, 1e-300)), 0.0)
    return float((cos.mean() - cfg.cos_sim_mean) / cfg.cos_sim_std)

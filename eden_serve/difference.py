"""The DiT's frame-difference input computed from 8-bit frames on the CPU with NumPy (no torch): what a client
pairing frames of different encoder calls sends with the pair. ``pipeline.frame_difference`` is the same formula on
the device."""
from __future__ import annotations

import numpy as np

from .config import EdenConfig


def frame_difference_uint8(frame0: np.ndarray, frame1: np.ndarray, cfg: EdenConfig, band: int = 64) -> float:
    """``frame_difference`` of two [H, W, 3] uint8 frames on the CPU, for a client pairing frames of different
    encoder calls. Cosine similarity does not depend on the pixels' scale, so it works on the 8-bit values: dot
    products and norms are exact, each pixel's division and square root are rounded once (float64), and the result
    is rounded to float32: the encoder's ``pipeline.frame_difference`` gives the same float32 number (it differs
    only in the order of the float64 sum), so the output does not depend on which side computed it. Works in bands
    of ``band`` rows that stay in the CPU's cache (19.5 against 52.8 ms for a 1080p pair on a 2-core CI host: the
    client computes one for every pair across encoder requests, on cores its video encoding needs), with few NumPy
    calls per band: each one takes the interpreter lock that the client's other threads wait for."""
    height, width, _ = frame0.shape
    total = 0.0
    for top in range(0, height, band):
        # planar float32: products of 8-bit values summed over 3 channels stay below 2**24, so they are exact
        a = np.ascontiguousarray(frame0[top:top + band].transpose(2, 0, 1), dtype=np.float32)
        b = np.ascontiguousarray(frame1[top:top + band].transpose(2, 0, 1), dtype=np.float32)
        dot = a[0] * b[0]
        dot += a[1] * b[1]
        dot += a[2] * b[2]
        norm0 = a[0] * a[0]
        norm0 += a[1] * a[1]
        norm0 += a[2] * a[2]
        norms = b[0] * b[0]
        norms += b[1] * b[1]
        norms += b[2] * b[2]
        norms = norms.astype(np.float64)
        norms *= norm0
        # a black pixel has norm 0 and dot 0: 0 / sqrt(1e-300) = 0, the cosine the device gives it
        np.sqrt(np.maximum(norms, 1e-300, out=norms), out=norms)
        total += float((dot / norms).sum())
    return float(np.float32((total / (height * width) - cfg.cos_sim_mean) / cfg.cos_sim_std))

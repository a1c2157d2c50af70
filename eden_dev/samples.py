"""Generated sample frames: shapes moving over a gradient, so a demo needs no data."""
from __future__ import annotations

import numpy as np


def moving_shapes(num_frames: int, height: int = 192, width: int = 256, step: float = 6.0) -> list[np.ndarray]:
    """``num_frames`` [H, W, 3] uint8 frames: a disc and a square moving in opposite directions."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    background = np.stack([xx / width, yy / height, 0.5 + 0.0 * xx], axis=-1) * 200 + 20
    frames = []
    for t in range(num_frames):
        f = background.copy()
        cx, cy = width * 0.3 + step * t, height * 0.5
        f[(xx - cx) ** 2 + (yy - cy) ** 2 < (height * 0.15) ** 2] = (230, 60, 40)
        sx, sy = width * 0.7 - step * t, height * 0.3
        f[(abs(xx - sx) < height * 0.1) & (abs(yy - sy) < height * 0.1)] = (40, 80, 220)
        frames.append(f.clip(0, 255).astype(np.uint8))
    return frames

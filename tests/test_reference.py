"""bench/reference.py (the speed reference, the official work pattern) gives the official frame too."""
import sys

import torch
from conftest import FIXTURE, ROOT

sys.path.insert(0, str(ROOT / "bench"))

from reference import load_reference  # noqa: E402

from eden_serve import checkpoint  # noqa: E402
from eden_serve.config import EdenConfig  # noqa: E402


def test_reference_matches_official(fixture_frames, expected):
    sd = checkpoint.read_official_checkpoint(FIXTURE / "eden_tiny.pt")
    model = load_reference(sd, EdenConfig.from_state_dict(sd), "cpu")
    frame = model.interpolate(fixture_frames[:1], fixture_frames[1:], expected["noise"])
    assert (frame - expected["frame"]).abs().max() <= 1e-4

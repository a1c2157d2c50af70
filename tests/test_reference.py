"""bench/reference.py (the speed reference, the official work pattern) gives the official frame too."""
from conftest import FIXTURE
from reference import load_reference  # bench/reference.py (bench is on pytest's pythonpath)

from eden_serve import checkpoint
from eden_serve.config import EdenConfig


def test_reference_matches_official(fixture_frames, expected):
    sd = checkpoint.read_official_checkpoint(FIXTURE / "eden_tiny.pt")
    model = load_reference(sd, EdenConfig.from_state_dict(sd), "cpu")
    frame = model.interpolate(fixture_frames[:1], fixture_frames[1:], expected["noise"])
    assert (frame - expected["frame"]).abs().max() <= 1e-4

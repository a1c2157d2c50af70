"""EDEN frame interpolation, split for serving: the shared core of the handlers, the client and the tests."""
from .config import CheckpointError, EdenConfig

__all__ = ["CheckpointError", "EdenConfig"]

"""EDEN frame interpolation, split for serving: the shared core of the handlers, the client and the tests.

Importing the package imports nothing else: the client uses its torch-free modules (wire, shm, images, protocol,
difference) on machines without torch."""
__all__ = ["CheckpointError", "EdenConfig"]


def __getattr__(name):
    if name in __all__:
        from . import config
        return getattr(config, name)
    raise AttributeError(name)

"""Shared fixtures: the tiny official-layout checkpoint (tests/fixtures/eden_tiny), its split weights, the archives
built by archive_scripts/build_archives.py, and one real TorchServe serving them for the whole session."""
from __future__ import annotations

import inspect
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "eden_tiny"

from eden_dev.launcher import TorchServe  # noqa: E402
from eden_serve import checkpoint  # noqa: E402

# The test deployment: small batches so that concurrent requests really batch, a low pixel limit so that the
# "absurd size" case is cheap to send.
TEST_SETTINGS = {"max_pixels": 640 * 480}
SHM_TTL_S = 20  # short, so that the sweep of expired segments can be seen


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def read_rgb(data_or_path) -> np.ndarray:
    src = io.BytesIO(data_or_path) if isinstance(data_or_path, (bytes, bytearray)) else data_or_path
    return np.asarray(Image.open(src).convert("RGB"))


def frame_tensor(path) -> torch.Tensor:
    return torch.from_numpy(read_rgb(path).copy()).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="session")
def expected():
    return load_file(FIXTURE / "expected.safetensors")


@pytest.fixture(scope="session")
def fixture_frames() -> torch.Tensor:
    return torch.stack([frame_tensor(FIXTURE / "frame0.png"), frame_tensor(FIXTURE / "frame1.png")])


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_weights")
    checkpoint.split_checkpoint(FIXTURE / "eden_tiny.pt", out)
    return out


@pytest.fixture(scope="session")
def tiny_models(tiny_weights):
    return checkpoint.load_encoder(tiny_weights), checkpoint.load_generator(tiny_weights)


@pytest.fixture(scope="session")
def shm_dir(tmp_path_factory) -> Path:
    """The test deployment's shared-memory folder (any folder works; /dev/shm only makes it faster)."""
    return tmp_path_factory.mktemp("shm")


@pytest.fixture(scope="session")
def tiny_store(tiny_weights, tmp_path_factory, shm_dir) -> Path:
    from eden_serve.archives import build
    store = tmp_path_factory.mktemp("model_store")
    build(tiny_weights, store, gpus=0, batch_size=4, max_batch_delay_ms=100, encoder_batch_size=4,  # (batches too)
          settings={**TEST_SETTINGS, "shm_dir": str(shm_dir), "shm_ttl_s": SHM_TTL_S})
    return store


@pytest.fixture(scope="session")
def server(tiny_store, tmp_path_factory):
    with TorchServe(tmp_path_factory.mktemp("serve"), tiny_store) as ts:
        yield ts


# ---------------------------------------------------------------------- the fast lane
# Every test that starts a TorchServe is marked ``server`` here, so ``pytest -m "not server"`` starts none: tests
# using a fixture that starts one (``server`` and every module fixture built on eden_dev.launcher.TorchServe or
# helpers_http.start_server, found in the fixture's source, however deep in the test's fixture closure), and tests
# whose own body starts one. A test that starts one some other way (a subprocess) carries the marker itself.
_STARTS_TORCHSERVE = ("TorchServe(", "start_server(")


def _starts_torchserve(func) -> bool:
    try:
        source = inspect.getsource(func)
    except (OSError, TypeError):
        return False
    return any(s in source for s in _STARTS_TORCHSERVE)


def needs_torchserve(item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    for defs in (info.name2fixturedefs.values() if info else ()):
        if any(d.argname == "server" or _starts_torchserve(d.func) for d in defs):
            return True
    return _starts_torchserve(getattr(item, "function", None))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if needs_torchserve(item):
            item.add_marker(pytest.mark.server)


def interruptible() -> None:
    """``preexec_fn`` for a client started to be interrupted: Ctrl-C (SIGINT) back to its default. A test runner
    started in the background of a non-interactive shell (``cmd &``) ignores SIGINT, every process it starts inherits
    that, and Python then installs no KeyboardInterrupt handler: the client would never see the signal."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)

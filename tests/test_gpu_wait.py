"""How workers wait for their GPU (eden_serve/gpu_wait.py): the setting, its checks, and on a GPU that a blocked
wait leaves the core free while a spinning one does not."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eden_serve import archives, gpu_wait
from eden_serve.service import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_blocking_waits_are_the_default_and_a_cpu_worker_ignores_them():
    assert Settings().gpu_wait == "block"
    assert "CPU worker" in gpu_wait.set_gpu_wait(torch.device("cpu"), "block")
    assert gpu_wait.current_mode(torch.device("cpu")) is None
    with pytest.raises(ValueError, match="gpu_wait must be one of"):
        gpu_wait.set_gpu_wait(torch.device("cpu"), "sleep")


def test_build_archives_set_takes_known_settings_only():
    assert archives.handler_settings(["gpu_wait=spin", "token_dtype=int8", "frame_cache=32",
                                      "warmup_sizes=[480x854]"]) == {
        "gpu_wait": "spin", "token_dtype": "int8", "frame_cache": 32, "warmup_sizes": ["480x854"]}
    with pytest.raises(ValueError, match="unknown setting 'gpu_wiat'"):
        archives.handler_settings(["gpu_wiat=spin"])
    with pytest.raises(ValueError, match="gpu_wait must be one of"):
        archives.handler_settings(["gpu_wait=fast"])
    with pytest.raises(ValueError, match="not NAME=VALUE"):
        archives.handler_settings(["gpu_wait"])


# A fresh process per mode: the mode must be set before the process's first CUDA call, as a worker does.
_WAIT = """
import json, sys, time, torch
from eden_serve import gpu_wait
dev = torch.device("cuda", 0)
note = gpu_wait.set_gpu_wait(dev, sys.argv[1])
torch.zeros(1, device=dev); torch.cuda.synchronize(dev)
torch.cuda._sleep(2_000_000)  # calibrate: cycles -> seconds
t = time.perf_counter(); torch.cuda.synchronize(dev); cal = time.perf_counter() - t
cycles = int(2_000_000 * 0.4 / max(cal, 1e-4))  # about 0.4 s of GPU time
torch.cuda._sleep(cycles)
w, c = time.perf_counter(), time.process_time()
torch.cuda.synchronize(dev)
print(json.dumps({"note": note, "mode": gpu_wait.current_mode(dev), "wall": time.perf_counter() - w,
                  "cpu": time.process_time() - c}))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_blocked_wait_leaves_the_core_free():
    got = {}
    for mode in ("spin", "block"):
        r = subprocess.run([sys.executable, "-c", _WAIT, mode], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        got[mode] = json.loads(r.stdout.strip().splitlines()[-1])
        assert got[mode]["mode"] == mode, got
        assert got[mode]["wall"] > 0.2, got  # the wait did happen
    assert got["spin"]["cpu"] > 0.7 * got["spin"]["wall"], got  # a core busy for the whole wait
    assert got["block"]["cpu"] < 0.1 * got["block"]["wall"], got  # asleep


class _FakeDriver:
    """The four driver calls gpu_wait makes, on a context whose flags start at ``flags``."""

    def __init__(self, flags: int):
        self.flags, self.calls = flags, []

    def cuInit(self, _):
        return 0

    def cuDeviceGet(self, handle, ordinal):
        handle._obj.value = 100 + ordinal
        return 0

    def cuDevicePrimaryCtxGetState(self, handle, flags, active):
        flags._obj.value, active._obj.value = self.flags, 0
        return 0

    def cuDevicePrimaryCtxSetFlags(self, handle, flags):
        self.calls.append((handle.value, flags.value))
        self.flags = flags.value
        return 0


def test_the_scheduling_bits_change_and_the_others_stay(monkeypatch):
    driver = _FakeDriver(flags=0x08 | 0x01)  # another flag (map host) kept, spin replaced
    monkeypatch.setattr(gpu_wait.ctypes, "CDLL", lambda name: driver)
    assert gpu_wait.set_gpu_wait(torch.device("cuda", 1), "block") == "GPU waits on cuda:1: block"
    assert driver.calls == [(101, 0x08 | 0x04)]
    assert gpu_wait.current_mode(torch.device("cuda", 1)) == "block"
    monkeypatch.setattr(gpu_wait.ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError("not found")))
    assert "no CUDA driver library" in gpu_wait.set_gpu_wait(torch.device("cuda", 0), "block")

"""The README's main command (./run.sh demo runs python -m eden_dev.demo) works end to end."""
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.server


def test_demo_runs_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, "-m", "eden_dev.demo", "--workdir", str(tmp_path)], capture_output=True,
                       text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "RANDOM-WEIGHT checkpoint" in r.stdout and "12 -> 23 frames" in r.stdout
    # the clip goes through the user's command (a subprocess, no transport flag): shared memory, the server being here
    assert "python -m eden_client video sample_clip.mp4" in r.stdout and "transport: shm" in r.stdout, r.stdout
    assert (tmp_path / "middle.png").stat().st_size > 0 and (tmp_path / "sample_clip_x2.mp4").stat().st_size > 0
    assert not (tmp_path / "serve" / "key_file.json").exists()  # TorchServe stopped

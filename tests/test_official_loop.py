"""bench/official_loop.py runs the official EDEN code next to bench/reference.py; on the tiny fixture both give the
same frames. Needs a checkout of the official repo in .official/EDEN (git-ignored, see bench/NOTES.md): skipped
without one. A subprocess: the script puts the checkout on sys.path and stubs modules."""
import json
import subprocess
import sys

import pytest
from conftest import FIXTURE, ROOT

OFFICIAL = ROOT / ".official" / "EDEN"
pytestmark = pytest.mark.skipif(not (OFFICIAL / "inference.py").is_file(), reason="no .official/EDEN checkout")


def test_official_loop_runs_and_matches_reference(tmp_path):
    out = tmp_path / "official_loop.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "official_loop.py"), "--official-dir", str(OFFICIAL),
                        "--checkpoint", str(FIXTURE / "eden_tiny.pt"), "--sizes", "90x120", "--frames", "3",
                        "--repeats", "1", "--device", "cpu", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads(out.read_text())["sizes"]["90x120"]
    assert row["generated"] == 2
    for v in ("xformers", "no_xformers"):
        assert row[f"official_{v}_s_per_frame"] > 0
        assert row[f"reference_vs_official_{v}_frames"]["max_abs_diff_8bit"] <= 1

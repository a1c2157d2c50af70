"""python -m eden_client batch through a real TorchServe: the mirrored tree, failures that do not stop the batch, the
summary and exit codes, and resuming after the client is killed halfway."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from fractions import Fraction

import pytest
from conftest import ROOT, interruptible

from eden_dev import clips

av = pytest.importorskip("av")
pytestmark = pytest.mark.server


def batch_cmd(server, *args):
    return [sys.executable, "-m", "eden_client", "batch", *map(str, args), "--encoder-url", server.inference_url,
            "--key-file", str(server.key_file)]


def run_batch(server, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(batch_cmd(server, *args), capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def frame_count(path):
    if path.is_dir():
        return len(list(path.iterdir()))
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def partials(folder):
    return [p for p in folder.rglob("*") if ".partial" in p.name]


def test_tree_failures_summary_and_exit_codes(server, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    clips.write_video(src / "a.mp4", clips.clip_frames(5), Fraction(30000, 1001))
    clips.write_video(src / "sub" / "b.webm", clips.clip_frames(4), Fraction(24), codec="libvpx-vp9", audio=False)
    clips.write_video(src / "sub" / "c.avi", clips.clip_frames(4, 45, 67), Fraction(25), codec="mpeg4")
    clips.write_frame_folder(src / "sub" / "shot", clips.clip_frames(3))
    clips.write_frame_folder(src / "mixed", clips.clip_frames(2))  # frames beside another input
    clips.write_video(src / "mixed" / "m.mp4", clips.clip_frames(2), Fraction(25), audio=False)
    (src / "broken.mp4").write_bytes(b"\x00" * 1000)
    (src / ".hidden.mp4").write_bytes(b"\x00" * 10)

    r = run_batch(server, src, out, "--factor", "2", "--jobs", "2")
    assert r.returncode == 1, r.stdout + r.stderr
    assert frame_count(out / "a.mp4") == 9
    assert frame_count(out / "sub" / "b.mkv") == 7  # WebM allows only VP8/VP9/AV1: H.264 goes to .mkv
    assert frame_count(out / "sub" / "c.avi") == 7
    assert frame_count(out / "sub" / "shot") == 5
    assert frame_count(out / "mixed" / "_frames") == 3 and frame_count(out / "mixed" / "m.mp4") == 3
    assert not (out / "broken.mp4").exists() and not partials(out)
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["status", "input", "output"]
    assert any(line.startswith("failed") and "broken.mp4" in line and "not a video FFmpeg can read" in line
               for line in lines)
    assert lines[-1] == "6 done, 0 skipped, 1 failed"

    r = run_batch(server, src, out, "--factor", "2")
    assert r.returncode == 1 and r.stdout.splitlines()[-1] == "0 done, 6 skipped, 1 failed"
    (src / "broken.mp4").unlink()
    r = run_batch(server, src, out, "--factor", "2", "--quiet")
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "0 done, 6 skipped, 0 failed" and r.stderr == ""

    r = run_batch(server, tmp_path / "nothing-here", out)
    assert r.returncode == 2 and "nothing-here: no such folder" in r.stderr
    (tmp_path / "one.mp4").write_bytes(b"\x00" * 10)
    r = run_batch(server, tmp_path / "one.mp4", out)
    assert r.returncode == 2 and "one.mp4: is not a folder (one video: eden-client video)" in r.stderr
    r = run_batch(server, src, src)
    assert r.returncode == 2 and "OUT_DIR must be another folder than IN_DIR" in r.stderr


def _start_and_stop_midway(server, src, out, sig):
    """Start a batch of one input at a time, wait until the first output is complete, then send ``sig``; returns
    the finished process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(batch_cmd(server, src, out, "--factor", "4", "--jobs", "1"), cwd=ROOT, env=env,
                            preexec_fn=interruptible,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "v0.mp4").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    time.sleep(0.3)  # into the second video
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    return proc


def _videos(src, n=3, frames=12):
    src.mkdir()
    for i in range(n):
        clips.write_video(src / f"v{i}.mp4", clips.clip_frames(frames, step=1.0 + i), Fraction(30000, 1001))


def test_resume_after_the_client_is_killed(server, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    _videos(src)
    proc = _start_and_stop_midway(server, src, out, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    first = out / "v0.mp4"
    stamp = first.stat().st_mtime_ns
    assert not (out / "v2.mp4").exists()  # killed before the end: the rest is missing or partial

    r = run_batch(server, src, out, "--factor", "4")
    assert r.returncode == 0, r.stdout + r.stderr
    table = r.stdout.splitlines()
    assert any(line.startswith("skipped") and "v0.mp4" in line for line in table)  # nothing redone
    assert table[-1] in ("2 done, 1 skipped, 0 failed", "1 done, 2 skipped, 0 failed")
    assert first.stat().st_mtime_ns == stamp
    for i in range(3):  # nothing missing, nothing half-written
        assert frame_count(out / f"v{i}.mp4") == 11 * 4 + 1
    assert not partials(out)


def test_ctrl_c_removes_the_partial_output_and_exits_130(server, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    _videos(src, n=2, frames=16)
    proc = _start_and_stop_midway(server, src, out, signal.SIGINT)
    assert proc.returncode == 130
    assert (out / "v0.mp4").exists() and not (out / "v1.mp4").exists() and not partials(out)

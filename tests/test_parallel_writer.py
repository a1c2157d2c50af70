"""eden_client.parallel_writer.ParallelWriter: per-frame work on several threads, frames committed in order,
errors kept."""
import random
import time

import numpy as np
import pytest

from eden_client.parallel_writer import ParallelWriter
from eden_client.sinks import PngFolderSink
from conftest import read_rgb


class Recorder:
    def __init__(self, fail_at=None):
        self.committed, self.closed, self.fail_at = [], None, fail_at

    def prepare(self, image):
        time.sleep(random.random() / 200)  # finish out of order
        if self.fail_at is not None and int(image[0, 0, 0]) == self.fail_at:
            raise ValueError("cannot prepare")
        return int(image[0, 0, 0])

    def commit(self, value, pts, duration):
        self.committed.append((value, pts, duration))

    def close(self, complete=True):
        self.closed = complete


def frames(n):
    return [np.full((2, 2, 3), i, np.uint8) for i in range(n)]


def test_frames_are_committed_in_order():
    sink = Recorder()
    writer = ParallelWriter(sink, threads=4, depth=3)
    for i, f in enumerate(frames(40)):
        writer.write(f, i * 2, 2)
    writer.close()
    assert sink.committed == [(i, i * 2, 2) for i in range(40)] and sink.closed is True


def test_an_error_discards_the_output_and_is_raised():
    sink = Recorder(fail_at=5)
    writer = ParallelWriter(sink, threads=2)
    with pytest.raises(ValueError, match="cannot prepare"):
        for i, f in enumerate(frames(30)):
            writer.write(f, i, 1)
        writer.close()
    if sink.closed is None:  # raised by write: the caller closes incomplete
        writer.close(complete=False)
    assert sink.closed is False and [v for v, _, _ in sink.committed] == list(range(5))


def test_png_folder_through_the_writer(tmp_path):
    sink = ParallelWriter(PngFolderSink(tmp_path / "out"), threads=3)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (16, 24, 3), dtype=np.uint8) for _ in range(12)]
    for i, im in enumerate(images):
        sink.write(im, i, 1)
    sink.close()
    written = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in written] == [f"{i:08d}.png" for i in range(12)]
    assert all(np.array_equal(read_rgb(p), im) for p, im in zip(written, images))


def test_the_writer_says_where_its_time_went():
    class Slow(Recorder):
        def commit(self, value, pts, duration):
            time.sleep(0.01)  # the encoder is the slower side
            super().commit(value, pts, duration)
    sink = Slow()
    writer = ParallelWriter(sink, threads=2, depth=2)
    for i, f in enumerate(frames(12)):
        writer.write(f, i, 1)
    writer.close()
    s = writer.seconds
    assert set(s) == {"prepare", "commit", "commit_waiting", "prepare_waiting", "write_blocked"}
    assert s["commit"] >= 0.1 and s["prepare"] > 0 and s["write_blocked"] > 0.02


def test_video_frames_prepared_on_one_thread_do_not_share_pixels(tmp_path):
    """VideoSink.prepare fills each thread's one RGB frame again for every image: what it hands back must be the
    converted copy, so two images prepared in a row on one thread stay two images (and match the input)."""
    pytest.importorskip("av")
    from fractions import Fraction
    from eden_client.frames_io import VideoMeta
    from eden_client.sinks import Encoding, VideoSink
    rng = np.random.default_rng(0)
    a = np.repeat(np.repeat(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), 8, 0), 8, 1)  # [48, 64, 3] blocks
    b = 255 - a
    sink = VideoSink(tmp_path / "o.mp4", VideoMeta(Fraction(1, 25), Fraction(25), 64, 48), 1, Encoding())
    try:
        fa, fb = sink.prepare(a), sink.prepare(b)
        back = [f.to_ndarray(format="rgb24").astype(int) for f in (fa, fb)]
        assert fa is not fb
        assert np.abs(back[0] - a).mean() < 12 and np.abs(back[1] - b).mean() < 12  # a and b differ by ~128
    finally:
        sink.close(complete=False)


def test_short_switches_for_a_run_and_back():
    import sys
    from eden_client.gil import short_switches
    before = sys.getswitchinterval()
    with short_switches(0.0007):
        assert sys.getswitchinterval() == pytest.approx(0.0007)
    assert sys.getswitchinterval() == before
    with short_switches():  # the default, 0.2 ms
        assert sys.getswitchinterval() == pytest.approx(min(before, 0.0002))


def test_switch_interval_from_the_environment(monkeypatch):
    from eden_client.gil import SWITCH_INTERVAL_S, switch_interval
    monkeypatch.setenv("EDEN_SWITCH_INTERVAL_S", "0.001")
    assert switch_interval() == 0.001
    for bad in ("", "0", "-1", "fast"):
        monkeypatch.setenv("EDEN_SWITCH_INTERVAL_S", bad)
        assert switch_interval() == SWITCH_INTERVAL_S


@pytest.mark.parametrize("engine", ["ffmpeg", "pillow"])
def test_png_encoder_is_lossless_from_several_threads(engine):
    """FFmpeg's PNG encoder (PyAV installed) and Pillow's (without PyAV) give back the same pixels, with sizes
    changing between frames and several threads encoding at once."""
    import io
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from eden_client.sinks import PngEncoder
    encode = PngEncoder()
    if engine == "pillow":
        encode.av = None
    else:
        assert encode.av is not None  # PyAV is a test dependency (eden-serve[video])
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(17, 31), (17, 31), (8, 6), (17, 31)] * 4]
    images[1][:] = 7  # a flat frame compresses
    with ThreadPoolExecutor(3) as pool:
        pngs = list(pool.map(encode, images))
    assert all(p[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs) and len(pngs[1]) < len(pngs[0])
    assert all(np.array_equal(np.asarray(Image.open(io.BytesIO(p)).convert("RGB")), im) for p, im in zip(pngs, images))


def test_the_writers_threads_run_at_a_lower_priority_and_the_caller_keeps_its_own():
    """The output's encoding (prepare threads, the committing thread and x264's threads started from it) runs a
    few nice levels below the threads that keep the deployment fed; Linux keeps the level per thread."""
    import os
    import threading

    from eden_client.parallel_writer import BACKGROUND_NICE, lower_priority
    before = os.getpriority(os.PRIO_PROCESS, 0)
    seen = {}

    def background():
        lower_priority()
        seen["writer"] = os.getpriority(os.PRIO_PROCESS, 0)
        child = threading.Thread(target=lambda: seen.setdefault("child", os.getpriority(os.PRIO_PROCESS, 0)))
        child.start()
        child.join()
    t = threading.Thread(target=background)
    t.start()
    t.join()
    assert seen["writer"] == seen["child"] == min(19, before + BACKGROUND_NICE)
    assert os.getpriority(os.PRIO_PROCESS, 0) == before

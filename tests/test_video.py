"""The video client: scheduling (with a fake deployment, fast), then real clips made with PyAV through a real
TorchServe with the tiny model: frame counts, timing, audio, metadata, scene cuts, frame folders and odd inputs."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT, read_rgb

from eden_client.api import EdenClient, EncoderAnswer, TokensLost
from eden_client.convert import Options, convert
from eden_client.frames_io import Frame, FramesError
from eden_client.keys import KeySource
from eden_client.scenes import SceneDetector, ssim, thumbnail
from eden_client.sources import natural_key
from eden_client.video import MAX_CHUNK, SHM_SCHEDULE, Interpolator, frame_seed, output_count
from eden_client.video_cli import parse_rate
from eden_dev import clips
from eden_serve import pipeline, wire
from eden_serve.config import EdenConfig

av = pytest.importorskip("av")


# ---------------------------------------------------------------------- a fake deployment
class FakeEden:
    """Stands in for EdenClient: tokens carry each frame's mean value, the "middle frame" is the mean of the pair's
    values. Records every frame sent to the encoder, every pair's difference and seed, and the concurrency."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.encoded: list[int] = []  # id() of every array sent
        self.requests = 0
        self.pairs: list[tuple[float, float, float, int]] = []  # value a, value b, difference, seed
        self.lock = threading.Lock()
        self.active = {"encode": 0, "generate": 0}
        self.overlap = False
        self.cfg = EdenConfig()
        self.answers: list[str] = []  # encoder answers handed out (their "segments")
        self.released: list[str] = []

    def _enter(self, kind):
        with self.lock:
            self.active[kind] += 1
            if self.active["encode"] and self.active["generate"]:
                self.overlap = True

    def _leave(self, kind):
        with self.lock:
            self.active[kind] -= 1

    def encode_frames(self, frames, dtype="float16", lead=False):
        """As the encoder: with ``lead`` the first frame gives only its difference with the next (no tokens)."""
        self._enter("encode")
        time.sleep(self.delay)
        x = torch.stack([torch.tensor(f).permute(2, 0, 1).float() / 255 for f in frames])
        diffs = pipeline.frame_difference(x[:-1], x[1:], self.cfg)[:, 0].tolist() if len(frames) > 1 else []
        lead_difference = diffs.pop(0) if lead else None
        frames = frames[1:] if lead else frames
        with self.lock:
            self.encoded += [id(f) for f in frames]
            self.requests += 1
        h, w = frames[0].shape[:2]
        geo = pipeline.Geometry.for_size(h, w, self.cfg)
        n = geo.grid[0] * geo.grid[1]
        tokens = np.zeros((len(frames), 2, n, 4), np.float32)
        tokens[:, 0, 0, 0] = [f.astype(np.float64).mean() for f in frames]
        blob = wire.TokenBlob(tokens, (h, w), geo.padding, 16, [0.5] * len(frames), [0.2] * len(frames), diffs, "",
                              lead_difference)
        self._leave("encode")
        with self.lock:  # (named under the lock: two requests answered at once get two names)
            enc = EncoderAnswer(wire.from_bytes(blob.to_bytes()), segment=f"answer-{len(self.answers)}")
            self.answers.append(enc.segment)
        return enc

    def release(self, enc):
        with self.lock:
            assert enc.segment in self.answers and enc.segment not in self.released, "released twice or unknown"
            self.released.append(enc.segment)

    def generate_pair(self, first, i, second, j, difference, seed=None):
        self._enter("generate")
        time.sleep(self.delay)
        with self.lock:
            assert first.segment not in self.released and second.segment not in self.released, "used after release"
        blob = wire.TokenBlob.pair(first.blob.frame(i), second.blob.frame(j), difference)
        a, b = (float(v) for v in blob.tokens[:, 0, 0, 0])
        with self.lock:
            self.pairs.append((a, b, blob.differences[0], seed))
        h, w = blob.size
        self._leave("generate")
        return np.full((h, w, 3), round((a + b) / 2), np.uint8), seed


def flat_frames(values, h=40, w=56):
    return [Frame(np.full((h, w, 3), v, np.uint8), i, 1) for i, v in enumerate(values)]


def run_fake(values, factor, **kw):
    fake = FakeEden(kw.pop("delay", 0.0))
    out = []
    stats = Interpolator(fake, factor, **kw).run(flat_frames(values), lambda img, pts, d: out.append((img, pts, d)))
    assert sorted(fake.released) == sorted(fake.answers)  # every encoder answer released once, none kept
    return fake, stats, out


class LosingEden(FakeEden):
    """As if the encoder worker holding the second answer's tokens on its GPU stopped: pairs using it get 410."""

    def generate_pair(self, first, i, second, j, difference, seed=None):
        if "answer-1" in (first.segment, second.segment):
            raise TokensLost("eden_ditdec: HTTP 410: the encoder worker that held these tokens has stopped", 410)
        return super().generate_pair(first, i, second, j, difference, seed)


def test_lost_device_tokens_are_encoded_again_with_the_same_frames():
    values = [0, 128, 200, 120, 40, 96, 0, 64, 232, 8, 160, 80]
    _, clean, want = run_fake(values, 4, chunk=4, max_inflight=3)
    fake = LosingEden()
    got = []
    stats = Interpolator(fake, 4, chunk=4, max_inflight=3).run(flat_frames(values),
                                                              lambda img, pts, d: got.append((img, pts, d)))
    assert sorted(fake.released) == sorted(fake.answers)  # the extra answers released too
    assert stats.reencoded > 0 and clean.reencoded == 0
    assert [(int(i[0, 0, 0]), p, d) for i, p, d in got] == [(int(i[0, 0, 0]), p, d) for i, p, d in want]


def test_schedule_defaults_follow_the_transport_and_flags_override_them():
    from eden_client.video import HTTP_SCHEDULE, SHM_SCHEDULE, TOKEN_WINDOW_BYTES, WINDOW_BYTES
    from eden_client.video_cli import options_from
    shm, http = FakeEden(), FakeEden()
    shm.transport, http.transport = "shm", "http"
    for fake, want in ((shm, SHM_SCHEDULE), (http, HTTP_SCHEDULE), (FakeEden(), HTTP_SCHEDULE)):
        i = Interpolator(fake)
        assert (i.max_inflight, i.encoder_inflight, i.chunk) == (want.max_inflight, want.encoder_inflight,
                                                                 want.chunk)
        assert i.window == (want.window or want.max_inflight + want.chunk)
    i = Interpolator(shm, max_inflight=5, chunk=2, encoder_inflight=1)
    assert (i.max_inflight, i.encoder_inflight, i.chunk) == (5, 1, 2)
    # same host: many pairs open (the window), fewer where their frames or their tokens would pass WINDOW_BYTES /
    # TOKEN_WINDOW_BYTES, never fewer than the requests in flight need; a window given is kept as it is
    i = Interpolator(shm)
    least = SHM_SCHEDULE.max_inflight + SHM_SCHEDULE.chunk
    assert SHM_SCHEDULE.window > least
    hd, uhd = 1080 * 1920 * 3, 2160 * 3840 * 3
    assert i.fitted_window(hd) == SHM_SCHEDULE.window
    assert i.fitted_window(1440 * 2560 * 3) == TOKEN_WINDOW_BYTES // (1440 * 2560 * 3 * 4)  # tokens: 4 B a pixel byte
    assert i.fitted_window(uhd) == least
    assert Interpolator(shm, token_dtype="int8").fitted_window(1440 * 2560 * 3) == SHM_SCHEDULE.window
    assert Interpolator(shm, factor=4).fitted_window(hd) == min(WINDOW_BYTES // (hd * 4),
                                                                TOKEN_WINDOW_BYTES // (hd * 4 * 2))
    assert Interpolator(shm, window=40).window == 40 and not Interpolator(shm, window=40)._fit_window
    assert Interpolator(shm, window=0)._fit_window
    # four runs at once (batch --jobs 4) share the bounds: 1080p frames then fit 4 times fewer pairs' tokens
    assert Interpolator(shm, sharing=4).fitted_window(hd) == max(least, TOKEN_WINDOW_BYTES // 4 // (hd * 4))
    _, stats, _ = run_fake([0, 8, 16, 24, 32], 2, delay=0.01)
    occupancy = stats.schedule.pop("occupancy")
    tiny = HTTP_SCHEDULE.fitted(40 * 56)  # (the run's frames: the schedule fitted to their size)
    assert stats.schedule == {"max_inflight": tiny.max_inflight, "encoder_inflight": tiny.encoder_inflight,
                              "chunk": tiny.chunk, "window": tiny.max_inflight + tiny.chunk}
    # what was in flight while the scheduler waited: levels as means, limits as shares of that time
    assert set(occupancy) == {"open_segments", "encoder_inflight", "ditdec_inflight", "window_full",
                              "encoder_at_limit", "ditdec_at_limit"}
    assert 0 < occupancy["open_segments"] <= 4 and 0 < occupancy["ditdec_inflight"] <= 4
    assert 0 <= occupancy["window_full"] <= 1 and occupancy["encoder_inflight"] <= HTTP_SCHEDULE.encoder_inflight
    base = dict(factor=None, target_fps=None, max_depth=None, seed=0, fps=None, no_scene_detect=False,
                scene_threshold=0.5, max_inflight=None, encoder_chunk=None, encoder_inflight=None,
                token_dtype="float16", codec="libx264", crf=None, pix_fmt=None, preset="veryfast", encoders=None)
    o = options_from(SimpleNamespace(**base))
    assert o.max_inflight is o.encoder_chunk is o.encoder_inflight is None  # the transport decides
    with pytest.raises(FramesError, match="--encoder-inflight must be at least 1"):
        options_from(SimpleNamespace(**{**base, "encoder_inflight": 0}))


def test_the_schedule_is_fitted_to_the_frames_size():
    """Measured for 1080p: smaller frames get larger encoder requests over shared memory (16 frames at 480p, two
    in flight); 1080p and larger keep the numbers, and HTTP keeps its own at every size; what a flag asks for is
    kept at every size, and a chunk lowered by a 413 stays lowered, with the encoder requests for it."""
    from eden_client.video import FULL_HD, HTTP_SCHEDULE, MAX_CHUNK, SHM_SCHEDULE
    as_tuple = lambda s: (s.max_inflight, s.encoder_inflight, s.chunk)  # noqa: E731
    assert SHM_SCHEDULE.pixels == FULL_HD
    for pixels in (FULL_HD, 1920 * 1088, 2160 * 3840, 4320 * 7680):
        assert as_tuple(SHM_SCHEDULE.fitted(pixels)) == as_tuple(SHM_SCHEDULE)
    assert as_tuple(SHM_SCHEDULE.fitted(480 * 854)) == (32, 2, 16)
    assert as_tuple(SHM_SCHEDULE.fitted(720 * 1280)) == (32, 2, 9)
    assert as_tuple(SHM_SCHEDULE.fitted(40 * 56)) == (32, 2, MAX_CHUNK)
    for pixels in (40 * 56, 480 * 854, FULL_HD, 2160 * 3840):
        assert as_tuple(HTTP_SCHEDULE.fitted(pixels)) == as_tuple(HTTP_SCHEDULE)
    assert SHM_SCHEDULE.fitted(480 * 854).window == SHM_SCHEDULE.window
    shm = FakeEden()
    shm.transport = "shm"
    small = np.zeros((48, 64, 3), np.uint8)
    i = Interpolator(shm)
    assert i.fit(small) == SHM_SCHEDULE.window and (i.chunk, i.encoder_inflight) == (MAX_CHUNK, 2)
    i = Interpolator(shm, chunk=4, encoder_inflight=3, max_inflight=7)
    i.fit(small)
    assert (i.chunk, i.encoder_inflight, i.max_inflight) == (4, 3, 7)
    i = Interpolator(shm, chunk=4)  # a chunk asked for: the encoder requests in flight are the transport's own
    i.fit(small)
    assert (i.chunk, i.encoder_inflight) == (4, SHM_SCHEDULE.encoder_inflight)
    i = Interpolator(FakeEden(), max_inflight=8)  # (over HTTP) max_inflight asked for, the chunk the transport's
    i.fit(small)
    assert (i.max_inflight, i.chunk, i.encoder_inflight) == (8, HTTP_SCHEDULE.chunk, HTTP_SCHEDULE.encoder_inflight)
    out = []
    stats = Interpolator(shm).run(flat_frames(range(0, 160, 8)), lambda *a: out.append(a))
    assert stats.encoder_requests == 2 and stats.schedule["chunk"] == MAX_CHUNK and len(out) == 39
    i = Interpolator(shm)
    i._chunk_cap = 4  # (as a 413 leaves it: the server's max_frames was lower)
    i.fit(small)
    assert (i.chunk, i.encoder_inflight) == (4, SHM_SCHEDULE.encoder_inflight)


def test_occupancy_says_which_limit_held_the_run():
    """With slow answers and a window of 3 open pairs, the window is what the scheduler waits on (full most of the
    time, DiT+decoder requests under their limit); with room for every pair, the requests are at their limit."""
    def run(window, inflight):
        # (answers slow enough that the scheduler's own time, longer on a loaded 2-core host, stays a small share)
        _, stats, _ = run_fake(list(range(0, 240, 8)), 2, delay=0.03, window=window, max_inflight=inflight, chunk=2)
        return stats.schedule["occupancy"]
    tight, roomy = run(3, 8), run(64, 2)
    assert tight["window_full"] > 0.5 and tight["ditdec_at_limit"] < 0.5, tight
    assert roomy["window_full"] < 0.2 and roomy["ditdec_at_limit"] > 0.5, roomy


def test_the_window_is_fitted_to_each_runs_frames():
    """One Interpolator, two runs: each run's window comes from its own frames (the stats say which)."""
    fake = FakeEden()
    fake.transport = "shm"
    interp = Interpolator(fake)
    small = interp.run(flat_frames([0, 8, 16]), lambda *a: None)
    interp.fitted_window = lambda nbytes: 41 if nbytes > 40 * 56 * 3 else 77  # (a 4K clip would take minutes here)
    big = interp.run(flat_frames([0, 8, 16], 48, 64), lambda *a: None)
    again = interp.run(flat_frames([0, 8, 16]), lambda *a: None)
    assert (small.schedule["window"], big.schedule["window"], again.schedule["window"]) == (96, 41, 77)


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_order_counts_and_one_encoding_per_frame(factor):
    values = [0, 128, 200, 120, 40, 96, 0, 64, 232, 8, 160, 80]  # multiples of 8: every midpoint is exact
    fake, stats, out = run_fake(values, factor, chunk=4, max_inflight=3)
    n = len(values)
    assert stats.output_frames == len(out) == output_count(n, factor) == (n - 1) * factor + 1
    got = [int(img[0, 0, 0]) for img, _, _ in out]
    # midpoints of midpoints: a linear ramp between consecutive inputs (values chosen to stay exact)
    want = []
    for a, b in zip(values, values[1:]):
        want += [a]
        vals = {0: float(a), factor: float(b)}
        step = factor
        while step > 1:
            for p in range(0, factor, step):
                vals[p + step // 2] = round((vals[p] + vals[p + step]) / 2)
            step //= 2
        want += [int(vals[k]) for k in range(1, factor)]
    assert got == want + [values[-1]]
    assert [pts for _, pts, _ in out] == list(range(0, (n - 1) * factor + 1))  # time base / factor, exact
    # every frame sent to the encoder once: the N inputs and the middles that are ends of finer pairs
    assert len(fake.encoded) == len(set(fake.encoded)) == n + (n - 1) * (factor // 2 - 1) == stats.encoded_frames
    assert fake.requests == stats.encoder_requests
    assert stats.ditdec_requests == (n - 1) * (factor - 1)


def test_pair_differences_are_the_pairs_own():
    """The difference of every pair is frame_difference of its two frames, from the blob or computed here."""
    rng = np.random.default_rng(0)
    frames = [Frame(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), i, 1) for i in range(7)]
    fake = FakeEden()

    def image_of(value):  # the frame whose mean the (float32) token carries
        return min((f.image for f in frames), key=lambda img: abs(img.astype(np.float64).mean() - value))

    Interpolator(fake, 2, chunk=3).run(frames, lambda *a: None)
    assert len(fake.pairs) == 6
    cfg = EdenConfig()
    for a, b, diff, _ in fake.pairs:
        x0, x1 = (torch.tensor(image_of(v)).permute(2, 0, 1)[None].float() / 255 for v in (a, b))
        assert diff == pytest.approx(float(pipeline.frame_difference(x0, x1, cfg)), abs=1e-5)


def test_lead_frames_give_the_pairs_across_requests_their_difference(monkeypatch):
    """Over shared memory each input chunk's encoder request also carries the frame before it, for the difference
    of the pair they make alone (no tokens): the client computes no difference from the pixels, each frame is still
    encoded once, and every pair gets its own frames' tokens and difference. An encoder that predates lead frames
    (encodes the lead as a frame of its own) gives the same pairs. A full request (the server's max_frames) has no
    room for a lead; EDEN_LEAD_FRAMES=0 turns them off."""
    from eden_client import video

    rng = np.random.default_rng(1)
    frames = [Frame(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), i, 1) for i in range(10)]
    cfg = EdenConfig()

    def image_of(value):
        return min((f.image for f in frames), key=lambda img: abs(img.astype(np.float64).mean() - value))

    def not_here(*_):
        raise AssertionError("a difference computed in the client")

    class Older(FakeEden):  # the field is unknown to it: the lead is encoded like the others
        def encode_frames(self, frames, dtype="float16", lead=False):
            return super().encode_frames(frames, dtype)

    for fake in (FakeEden(), Older()):
        fake.transport = "shm"
        with monkeypatch.context() as m:
            m.setattr(video, "frame_difference_uint8", not_here)
            stats = Interpolator(fake, 2, chunk=3).run(frames, lambda *a: None)
        assert stats.encoder_requests == 4 and stats.lead_frames == 3  # chunks 3, 3, 3, 1: the last three led
        assert stats.encoded_frames == 10 + 3 * isinstance(fake, Older)
        assert len(fake.pairs) == 9
        for a, b, diff, _ in fake.pairs:
            x0, x1 = (torch.tensor(image_of(v)).permute(2, 0, 1)[None].float() / 255 for v in (a, b))
            assert diff == pytest.approx(float(pipeline.frame_difference(x0, x1, cfg)), abs=1e-5)
        assert sorted(round(a) for a, *_ in fake.pairs) == sorted(round(f.image.mean()) for f in frames[:-1])

    full = FakeEden()
    full.transport = "shm"
    forty = [Frame(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), i, 1) for i in range(40)]
    stats = Interpolator(full, 2, chunk=MAX_CHUNK).run(forty, lambda *a: None)
    assert stats.lead_frames == 1 and stats.encoded_frames == 40  # chunks of 16, 16 (full: no lead), 8 (led)
    monkeypatch.setenv("EDEN_LEAD_FRAMES", "0")
    off = FakeEden()
    off.transport = "shm"
    assert Interpolator(off, 2, chunk=3).run(frames, lambda *a: None).lead_frames == 0


def test_too_large_encoder_answers_are_split():
    """A 413 (the answer would pass the server's response limit) -> the chunk is sent in halves, then smaller."""
    from eden_client.errors import ServeError

    class Limited(FakeEden):
        def encode_frames(self, frames, dtype="float16"):
            if len(frames) > 2:
                raise ServeError("eden_encoder: HTTP 413: response too large", 413)
            return super().encode_frames(frames, dtype)

    fake = Limited()
    out = []
    stats = Interpolator(fake, 2, chunk=8).run(flat_frames(list(range(0, 240, 16))), lambda img, *_: out.append(img))
    assert len(out) == 29 and [int(o[0, 0, 0]) for o in out[::2]] == list(range(0, 240, 16))
    assert len(fake.encoded) == len(set(fake.encoded)) == 15 == stats.encoded_frames


def test_seeds_are_deterministic_and_distinct():
    fake1, _, _ = run_fake([0, 100, 200, 50], 4, seed=7)
    fake2, _, _ = run_fake([0, 100, 200, 50], 4, seed=7)
    seeds = sorted(p[3] for p in fake1.pairs)
    assert seeds == sorted(p[3] for p in fake2.pairs) and len(set(seeds)) == len(seeds)
    assert frame_seed(7, 1) == frame_seed(7, 1) != frame_seed(8, 1)
    assert all(0 <= s < 2**63 for s in seeds)


def test_encoder_and_ditdec_requests_overlap_and_memory_is_bounded():
    read = []
    written = []
    fake = FakeEden(delay=0.005)

    def frames():
        for f in flat_frames([(i * 37) % 256 for i in range(120)]):
            read.append(f.pts)
            # frames held (read, not yet written): at most the window (max_inflight + chunk segments) and the
            # writer's queue (16 output frames), whatever the length
            assert len(read) - len(written) // 2 <= (4 + 4) + 16 // 2 + 2
            yield f

    stats = Interpolator(fake, 2, max_inflight=4, chunk=4).run(frames(), lambda *a: written.append(a))
    assert stats.output_frames == 239 and fake.overlap


def test_cut_repeats_the_previous_frame():
    # a flat frame, then a very different textured one: SSIM of the thumbnails far below the threshold
    a = np.full((40, 56, 3), 90, np.uint8)
    b = clips.shot_b(1, 40, 56)[0]
    fake = FakeEden()
    out = []
    frames = [Frame(a, 0, 1), Frame(a.copy(), 1, 1), Frame(b, 2, 1), Frame(b.copy(), 3, 1)]
    stats = Interpolator(fake, 4, detector=SceneDetector(0.25)).run(frames, lambda img, *_: out.append(img))
    assert stats.cuts == 1 and len(out) == 13
    assert all(np.array_equal(out[k], a) for k in range(4, 8)) and np.array_equal(out[8], b)
    assert stats.ditdec_requests == 2 * 3  # no requests for the cut


def test_answers_are_released_when_every_pair_is_a_cut():
    """A run whose pairs are all scene cuts needs no tokens: it can end before the encoder answers; they are
    released all the same."""
    a, b = np.full((40, 56, 3), 90, np.uint8), clips.shot_b(1, 40, 56)[0]
    fake = FakeEden(delay=0.05)
    frames = [Frame(img, k, 1) for k, img in enumerate([a, b, a, b, a])]
    stats = Interpolator(fake, 2, chunk=2, detector=SceneDetector(0.25)).run(frames, lambda *_: None)
    assert stats.cuts == 4 and stats.ditdec_requests == 0
    assert sorted(fake.released) == sorted(fake.answers) and fake.answers


def test_a_lead_over_the_servers_frame_limit_is_dropped_not_the_chunk():
    """A request one frame over the server's max_frames because of its lead (413): the same frames go again without
    it, the chunk stays, and only chunks shorter than that get leads from then on."""
    from eden_client.errors import ServeError

    class EightFrames(FakeEden):
        transport = "shm"

        def encode_frames(self, frames, dtype="float16", lead=False):
            if len(frames) > 8:
                raise ServeError("eden_encoder: HTTP 413: 9 frames in one request: at most 8", 413)
            return super().encode_frames(frames, dtype, lead)

    fake = EightFrames()
    interp = Interpolator(fake, 2, chunk=8)
    stats = interp.run(flat_frames(list(range(0, 240, 8))), lambda *_: None)  # 30 frames: chunks 8, 8, 8, 6
    assert interp.chunk == 8 and stats.encoder_requests == 4 and stats.encoded_frames == 30
    assert stats.lead_frames == 1  # the chunk of 6 (the chunks of 8 would make 9)
    assert sorted(fake.released) == sorted(fake.answers)


def test_thumbnails_and_similarity_made_beside_the_scheduler():
    """convert's reading side gives every frame its thumbnail and its SSIM with the previous frame (the scheduler
    then only compares a number), the same values as computed in the scheduler, and the same cut decisions."""
    from eden_client.convert import prepared
    shots = clips.clip_frames(8, 48, 64, cut_at=4)
    frames = list(prepared([Frame(f, i, 1) for i, f in enumerate(shots)], thumbnails=True))
    assert [f.pts for f in frames] == list(range(8)) and frames[0].similarity is None
    for prev, cur in zip(frames, frames[1:]):
        assert np.array_equal(cur.thumb, thumbnail(cur.image))
        assert cur.similarity == ssim(thumbnail(prev.image), thumbnail(cur.image))
    detector = SceneDetector(0.25)
    assert [detector.is_cut(p.thumb, c.thumb, c.similarity) for p, c in zip(frames, frames[1:])] == \
        [detector.is_cut(thumbnail(p.image), thumbnail(c.image)) for p, c in zip(frames, frames[1:])] == \
        [False, False, False, True, False, False, False]
    assert not SceneDetector(None).is_cut(frames[3].thumb, frames[4].thumb, frames[4].similarity)


def test_input_frames_made_on_several_threads_are_the_decoders_in_order(tmp_path):
    """convert's reading side converts a video's frames (and reads a folder's) on several threads: the same
    pixels, time stamps and durations, in order, as one thread reading them; a folder's odd frame is refused where
    it comes, after the frames before it; stopping early leaves nothing running."""
    from eden_client.convert import prepared
    from eden_client.sources import FolderSource, VideoSource
    shots = clips.clip_frames(40, 48, 64, cut_at=20)
    path = tmp_path / "v.mp4"
    clips.write_video(path, shots, Fraction(24), pts=[3 * i + (i % 3 == 0) for i in range(40)], audio=False,
                      time_base=Fraction(1, 72))
    one = list(VideoSource(path))
    many = list(prepared(VideoSource(path), thumbnails=True, threads=4))
    assert [(f.pts, f.duration) for f in many] == [(f.pts, f.duration) for f in one] and len(many) == 40
    assert all(np.array_equal(a.image, b.image) for a, b in zip(one, many))
    # a video's thumbnails come from the decoded frames (swscale's area average to luma): scenes.thumbnail's
    # measure within a few levels on average (1.2 for a 480p clip; more for the saturated colours of these tiny
    # frames, where the RGB frame's luma differs from the stream's own), the same similarities within 0.02 and the
    # same cut
    assert all(np.abs(f.thumb - thumbnail(f.image)).mean() <= 5 for f in many)
    assert all(abs(c.similarity - ssim(thumbnail(p.image), thumbnail(c.image))) <= 0.02 for p, c in zip(many, many[1:]))
    assert [p.similarity for p in many][:2] == [None, ssim(many[0].thumb, many[1].thumb)]
    detector = SceneDetector(0.25)
    assert [k for k in range(1, 40) if detector.is_cut(many[k - 1].thumb, many[k].thumb, many[k].similarity)] == \
        [k for k in range(1, 40) if detector.is_cut(thumbnail(many[k - 1].image), thumbnail(many[k].image))] == [20]
    # a folder: read on the threads too; the odd frame fails in its place
    clips.write_frame_folder(tmp_path / "f", shots[:6])
    odd = sorted((tmp_path / "f").iterdir())[4]
    odd.write_bytes(clips.encode_png(np.zeros((8, 8, 3), np.uint8)))
    seen = []
    with pytest.raises(FramesError, match="every frame of a folder must have one size"):
        for f in prepared(FolderSource(tmp_path / "f"), thumbnails=False, threads=3):
            seen.append(f.pts)
    assert seen == [0, 1, 2, 3]
    stream = prepared(VideoSource(path), thumbnails=True, threads=2)
    next(stream)
    stream.close()  # (cancels what is queued, waits for what runs)


def test_scene_measure():
    shots = clips.clip_frames(8, 48, 64, cut_at=4)
    thumbs = [thumbnail(f) for f in shots]
    assert ssim(thumbs[0], thumbs[0]) == pytest.approx(1.0)
    same_shot = [ssim(thumbs[i], thumbs[i + 1]) for i in (0, 1, 2, 4, 5, 6)]
    assert min(same_shot) > 0.5 and ssim(thumbs[3], thumbs[4]) < 0.25


def test_ssim_is_the_mean_over_every_8x8_window():
    """The fast form against SSIM written out window by window (Wang et al.: uniform 8x8 windows, stride 1)."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    rng = np.random.default_rng(3)
    for _ in range(3):
        a = rng.random((32, 32)) * 255
        b = 0.6 * a + rng.random((32, 32)) * 100
        values = []
        for i in range(25):
            for j in range(25):
                x, y = a[i:i + 8, j:j + 8], b[i:i + 8, j:j + 8]
                mx, my = x.mean(), y.mean()
                vx, vy, cov = (x * x).mean() - mx * mx, (y * y).mean() - my * my, (x * y).mean() - mx * my
                values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
        assert ssim(a, b) == pytest.approx(float(np.mean(values)), abs=1e-12)


def test_progress_on_a_terminal_and_in_a_log():
    import io
    from eden_client.progress import Progress
    tty = io.StringIO()
    p = Progress(total_frames=100, total_items=2, stream=tty, tty=True)
    p.start(0, "a.mp4", 50)
    p.update(0, 10)
    p.finish(0, "done a.mp4")
    p.close()
    text = tty.getvalue()
    assert "\r[0/2] 10/100 frames" in text and "a.mp4 10/50" in text and "done a.mp4\n" in text
    log = io.StringIO()
    p = Progress(total_frames=50, stream=log, tty=False)
    p.start(0, "a.mp4", 50)
    for i in range(50):
        p.update(0, i)
    p.finish(0, "done a.mp4")
    assert log.getvalue() == "start a.mp4 (50 frames)\ndone a.mp4\n" and "\r" not in log.getvalue()
    quiet = io.StringIO()
    p = Progress(stream=quiet, tty=True, quiet=True)
    p.start(0, "a.mp4", 5)
    p.update(0, 1)
    p.finish(0, "done")
    assert quiet.getvalue() == ""


def test_natural_order_and_rates():
    names = ["f10.png", "f2.png", "f1.png", "F3.png", "f0.png"]
    assert sorted(names, key=natural_key) == ["f0.png", "f1.png", "f2.png", "F3.png", "f10.png"]
    assert parse_rate("30000/1001") == parse_rate("29.97") == Fraction(30000, 1001)
    assert parse_rate("25") == 25 and parse_rate("12.5") == Fraction(25, 2)


def test_missing_key_file_and_dead_address_are_said_at_once(tmp_path):
    """No key file: said before anything starts (no "start ..." line); no server at the address: one try, no
    30 s of retries."""
    clips.write_frame_folder(tmp_path / "in", clips.clip_frames(3))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EDEN_INFERENCE_KEY", None)
    cmd = [sys.executable, "-m", "eden_client", "video", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
           "--encoder-url", "http://127.0.0.1:9"]
    r = subprocess.run(cmd + ["--key-file", str(tmp_path / "nokeys.json")], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=60)
    assert r.returncode == 1 and "nokeys.json does not exist" in r.stderr and "start in" not in r.stderr
    (tmp_path / "keys.json").write_text(json.dumps({"inference": {"key": "k"}, "management": {"key": "m"}}))
    t0 = time.monotonic()
    r = subprocess.run(cmd + ["--key-file", str(tmp_path / "keys.json")], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=60)
    assert r.returncode == 1 and "gave up after 1 try" in r.stderr and "Is TorchServe running" in r.stderr
    assert time.monotonic() - t0 < 20 and not (tmp_path / "out").exists()


def test_a_missing_input_is_said_before_keys_or_servers(tmp_path):
    """A typo in the input (or batch's folders) is the first thing said, exit 2, even with no key file and no server:
    a key or an address problem does not hide it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EDEN_INFERENCE_KEY", None)
    env.pop("EDEN_KEY_FILE", None)

    def client(*args):
        return subprocess.run([sys.executable, "-m", "eden_client", *map(str, args), "--encoder-url",
                               "http://127.0.0.1:9"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    r = client("video", tmp_path / "typo.mp4", "-o", tmp_path / "out.mp4")
    assert r.returncode == 2 and "typo.mp4: no such video file or frame folder" in r.stderr, r.stderr
    (tmp_path / "empty").mkdir()  # inputs that exist but hold no frames: opened (and refused) before connecting
    r = client("video", tmp_path / "empty", "-o", tmp_path / "out.mp4")
    assert r.returncode == 2 and "empty: no frames" in r.stderr and "no key" not in r.stderr, r.stderr
    (tmp_path / "notes.mp4").write_text("not a video")
    r = client("video", tmp_path / "notes.mp4", "-o", tmp_path / "out.mp4")
    assert r.returncode == 2 and "not a video FFmpeg can read" in r.stderr and "no key" not in r.stderr, r.stderr
    r = client("batch", tmp_path / "typo", tmp_path / "out")
    assert r.returncode == 2 and "typo: no such folder" in r.stderr, r.stderr
    (tmp_path / "in").mkdir()
    r = client("batch", tmp_path / "in", tmp_path / "in")
    assert r.returncode == 2 and "OUT_DIR must be another folder than IN_DIR" in r.stderr, r.stderr
    assert "no key" not in r.stderr


# ---------------------------------------------------------------------- real clips, real TorchServe
RATE = Fraction(30000, 1001)


@pytest.fixture(scope="module")
def client(server):
    return EdenClient.connect(server.inference_url, encoder_keys=KeySource(key_file=server.key_file))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    clips.write_video(d / "shapes.mp4", clips.clip_frames(9, 48, 64), RATE)
    clips.write_video(d / "cut.mp4", clips.clip_frames(8, 48, 64, cut_at=4), RATE, audio=False)
    clips.write_video(d / "vfr.mkv", clips.clip_frames(5, 48, 64), time_base=Fraction(1, 1000),
                      pts=[0, 40, 60, 140, 160])
    clips.write_video(d / "tagged.mov", clips.clip_frames(4, 48, 64), RATE, rotation=90,
                      color={"color_range": 1, "colorspace": 1, "color_primaries": 1, "color_trc": 1})
    clips.write_video(d / "ten.mkv", clips.clip_frames(4, 48, 64), Fraction(24), pix_fmt="yuv420p10le",
                      audio=False)
    clips.write_video(d / "one.mp4", clips.clip_frames(1, 48, 64), RATE)
    return d


def probe(path):
    """(frames [pts...], video stream facts, audio packets [(pts, bytes)...])"""
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        frames = list(c.decode(v))
        facts = {"rate": v.average_rate, "time_base": v.time_base, "width": frames[0].width,
                 "height": frames[0].height, "pix_fmt": frames[0].format.name, "rotation": frames[0].rotation,
                 "color": [v.codec_context.color_range, v.codec_context.colorspace,
                           v.codec_context.color_primaries, v.codec_context.color_trc],
                 "duration": sum(f.duration for f in frames) * v.time_base}
    with av.open(str(path)) as c:
        audio = [(p.pts, bytes(p)) for p in c.demux(*c.streams.audio) if p.size] if c.streams.audio else []
    return frames, facts, audio


def run_client(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "eden_client", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def conn(server):
    return ["--encoder-url", server.inference_url, "--key-file", server.key_file]


@pytest.mark.server
def test_cli_x2_counts_timing_audio_and_one_encoding_per_frame(server, clip_dir, tmp_path):
    out, stats_json = tmp_path / "x2.mp4", tmp_path / "stats.json"
    r = run_client("video", clip_dir / "shapes.mp4", "-o", out, "--stats-json", stats_json, *conn(server))
    assert r.returncode == 0, r.stderr
    stats = json.loads(stats_json.read_text())
    frames_in, facts_in, audio_in = probe(clip_dir / "shapes.mp4")
    # the chunk fitted to the clip's frame size (small frames: larger chunks, eden_client/video.py Schedule.fitted)
    chunk = SHM_SCHEDULE.fitted(facts_in["width"] * facts_in["height"]).chunk
    requests = math.ceil(9 / chunk)
    assert "9 -> 17 frames" in r.stdout and f"encoder: 9 frames in {requests} request{'s' * (requests != 1)}," in r.stdout
    # the count the issue asks for: every input frame sent to the encoder exactly once
    assert stats["encoded_frames"] == stats["input_frames"] == 9 and stats["encoder_requests"] == requests
    assert stats["schedule"]["chunk"] == chunk
    assert stats["token_bytes"] > 0 and stats["ditdec_requests"] == 8
    # where the command's time went, its own start (interpreter and imports) included
    assert set(stats["phases"]) == {"start", "connect", "open", "run", "finish"} and 0 < stats["phases"]["start"] < 60
    frames_out, facts_out, audio_out = probe(out)
    assert len(frames_out) == 17
    assert facts_out["rate"] == Fraction(60000, 1001)  # exact, not 60
    assert [f.pts * facts_out["time_base"] for f in frames_out[::2]] == [f.pts * facts_in["time_base"]
                                                                        for f in frames_in]
    assert abs(facts_out["duration"] - facts_in["duration"]) <= 1 / RATE
    assert audio_out == audio_in and len(audio_in) > 5  # copied packet for packet


@pytest.mark.server
def test_cli_several_encoders_make_the_same_video(server, tmp_path):
    """``--encoders 2`` (what a many-core host gets by default): the output's segments made by two x264 encoders
    at once are one stream with the same frames, time stamps and audio as one encoder's, each segment starting with
    a keyframe (eden_client/segment_encoder.py)."""
    src = tmp_path / "long.mp4"
    # 71 output frames, all within the last two segments' worth: halves of what is left, 36, 18 and 17 frames
    clips.write_video(src, clips.clip_frames(36, 48, 64), RATE)
    outs = {}
    for encoders in (1, 2):
        out, stats_json = tmp_path / f"e{encoders}.mp4", tmp_path / f"e{encoders}.json"
        r = run_client("video", src, "-o", out, "--encoders", encoders, "--stats-json", stats_json, *conn(server))
        assert r.returncode == 0, r.stderr
        assert json.loads(stats_json.read_text())["encoders"] == encoders
        assert ("2 video encoders on segments" in r.stdout) == (encoders == 2)
        outs[encoders] = probe(out)
        with av.open(str(out)) as c:
            packets = [packet for packet in c.demux(c.streams.video[0]) if packet.size]
        keys = [i for i, packet in enumerate(packets) if packet.is_keyframe]
        assert keys[0] == 0 and ({36, 54} <= set(keys)) == (encoders == 2)
    (frames1, facts1, audio1), (frames2, facts2, audio2) = outs[1], outs[2]
    assert len(frames2) == 71 and [f.pts for f in frames2] == [f.pts for f in frames1]
    assert facts2 == facts1 and audio2 == audio1 and len(audio1) > 20
    err = np.mean([np.abs(a.to_ndarray(format="rgb24").astype(int) - b.to_ndarray(format="rgb24")).mean()
                   for a, b in zip(frames1, frames2)])
    assert err < 2  # two lossy encodings of the same frames at CRF 18
    r = run_client("video", src, "-o", tmp_path / "bad.mp4", "--encoders", 0, *conn(server))
    assert r.returncode == 2 and "--encoders must be at least 1" in r.stderr


@pytest.mark.server
@pytest.mark.parametrize("factor", [4, 8])
def test_x4_x8_counts_rate_and_duration(client, clip_dir, tmp_path, factor):
    out = tmp_path / f"x{factor}.mp4"
    stats = convert(clip_dir / "shapes.mp4", out, client, Options(factor=factor, max_inflight=4))
    frames_out, facts, audio = probe(out)
    _, facts_in, audio_in = probe(clip_dir / "shapes.mp4")
    assert len(frames_out) == stats.output_frames == 8 * factor + 1
    assert facts["rate"] == RATE * factor
    assert abs(facts["duration"] - facts_in["duration"]) <= 1 / RATE
    assert audio == audio_in
    assert stats.encoded_frames == 9 + 8 * (factor // 2 - 1)  # inputs + middles that start finer pairs


@pytest.mark.server
def test_one_encoder_request_per_input_frame(client, clip_dir, tmp_path, monkeypatch):
    """With --encoder-chunk 1 the count is literal: encoder requests = input frames. Every pair spans two requests:
    over shared memory each request after the first carries the frame before it for that pair's difference, which
    the encoder gives (no tokens for it); the same frames come out when the client computes the differences
    itself (EDEN_LEAD_FRAMES=0)."""
    stats = convert(clip_dir / "shapes.mp4", tmp_path / "c1", client, Options(factor=2, encoder_chunk=1))
    assert stats.encoder_requests == stats.encoded_frames == stats.input_frames == 9
    assert stats.output_frames == 17 and stats.token_bytes > 0
    assert stats.lead_frames == (8 if client.transport == "shm" else 0)
    monkeypatch.setenv("EDEN_LEAD_FRAMES", "0")
    plain = convert(clip_dir / "shapes.mp4", tmp_path / "c1_plain", client, Options(factor=2, encoder_chunk=1))
    assert plain.lead_frames == 0 and plain.encoded_frames == 9
    for a, b in zip(sorted((tmp_path / "c1").iterdir()), sorted((tmp_path / "c1_plain").iterdir()), strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


@pytest.mark.server
def test_frame_folder_natural_order_png_output_and_reproducible(client, tmp_path):
    frames = clips.clip_frames(11, 48, 64)
    clips.write_frame_folder(tmp_path / "in", frames)  # f0.png .. f10.png, not zero-padded
    for name in ("a", "b"):
        convert(tmp_path / "in", tmp_path / name, client, Options(factor=2))
    out = sorted((tmp_path / "a").iterdir())
    assert [p.name for p in out[:2]] == ["00000000.png", "00000001.png"] and len(out) == 21
    for k, f in enumerate(frames):  # input frames pass through untouched, in natural order (f10 last)
        assert np.array_equal(read_rgb(out[2 * k]), f)
    assert all(p.read_bytes() == (tmp_path / "b" / p.name).read_bytes() for p in out)  # same seeds, same frames
    assert not list(tmp_path.glob(".*partial*"))


@pytest.mark.server
def test_frame_folders_need_no_pyav(server, tmp_path):
    """As on the GPU host: PyAV missing, frame folder in, PNG folder out; a video asks for PyAV by name."""
    clips.write_frame_folder(tmp_path / "in", clips.clip_frames(3))
    code = ("import sys; sys.modules['av'] = None; from eden_client.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [*map(str, conn(server)), "--quiet"]
    r = subprocess.run([sys.executable, "-c", code, "video", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                        *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "out").iterdir())) == 5
    r = subprocess.run([sys.executable, "-c", code, "video", str(tmp_path / "in"), "-o", str(tmp_path / "o.mp4"),
                        *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 2 and "needs PyAV: pip install av" in r.stderr


@pytest.mark.server
def test_scene_cut_detected_and_frames_repeated(server, client, clip_dir, tmp_path):
    stats = convert(clip_dir / "cut.mp4", tmp_path / "cut", client, Options(factor=4))
    assert stats.cuts == 1 and stats.ditdec_requests == 6 * 3
    out = [read_rgb(p) for p in sorted((tmp_path / "cut").iterdir())]
    assert len(out) == 29
    assert all(np.array_equal(out[k], out[12]) for k in (13, 14, 15))  # the cut pair is 3 -> 4
    assert not np.array_equal(out[12], out[16])
    r = run_client("video", clip_dir / "cut.mp4", "-o", tmp_path / "nocut", "--no-scene-detect", *conn(server))
    assert r.returncode == 0 and "0 scene cuts" in r.stdout


@pytest.mark.server
def test_variable_frame_rate_keeps_its_timestamps(client, clip_dir, tmp_path):
    out = tmp_path / "vfr.mkv"
    convert(clip_dir / "vfr.mkv", out, client, Options(factor=2))
    frames, facts, audio = probe(out)
    times = [f.pts * facts["time_base"] for f in frames]
    assert times == [Fraction(t, 1000) for t in (0, 20, 40, 50, 60, 100, 140, 150, 160)]
    assert audio == probe(clip_dir / "vfr.mkv")[2]


@pytest.mark.server
def test_rotation_colour_tags_and_ten_bit(client, clip_dir, tmp_path):
    convert(clip_dir / "tagged.mov", tmp_path / "tagged.mov", client, Options(factor=2))
    frames_in, facts_in, _ = probe(clip_dir / "tagged.mov")
    frames, facts, _ = probe(tmp_path / "tagged.mov")
    assert facts["rotation"] == 90 and facts["color"] == facts_in["color"] == [1, 1, 1, 1]
    # same matrix both ways: the first frame's colours do not shift
    a, b = frames_in[0].to_ndarray(format="rgb24").astype(int), frames[0].to_ndarray(format="rgb24").astype(int)
    assert np.abs(a.mean((0, 1)) - b.mean((0, 1))).max() < 2
    convert(clip_dir / "ten.mkv", tmp_path / "ten.mkv", client, Options(factor=2))
    frames, facts, _ = probe(tmp_path / "ten.mkv")
    assert len(frames) == 7 and facts["pix_fmt"] == "yuv420p10le"


@pytest.mark.server
def test_one_frame_video_is_copied_through(client, clip_dir, tmp_path):
    stats = convert(clip_dir / "one.mp4", tmp_path / "one.mp4", client, Options(factor=4))
    frames, facts, audio = probe(tmp_path / "one.mp4")
    assert len(frames) == 1 and stats.encoder_requests == 0 and audio == probe(clip_dir / "one.mp4")[2]


@pytest.mark.server
def test_odd_size_grey_and_alpha_frames(client, tmp_path):
    from PIL import Image
    folder = tmp_path / "odd"
    folder.mkdir()
    frames = clips.clip_frames(3, 45, 67)
    Image.fromarray(frames[0]).convert("L").save(folder / "f0.png")
    Image.fromarray(frames[1]).convert("RGBA").save(folder / "f1.png")
    Image.fromarray(frames[2]).save(folder / "f2.png")
    convert(folder, tmp_path / "png", client, Options(factor=2))
    out = sorted((tmp_path / "png").iterdir())
    assert len(out) == 5 and read_rgb(out[1]).shape == (45, 67, 3)
    assert np.array_equal(read_rgb(out[2]), frames[1])  # alpha dropped, colours kept
    convert(folder, tmp_path / "odd.mp4", client, Options(factor=2, fps=Fraction(24000, 1001)))
    frames_out, facts, _ = probe(tmp_path / "odd.mp4")
    assert len(frames_out) == 5 and (facts["width"], facts["height"]) == (68, 46)  # yuv420p needs even sides
    assert facts["rate"] == Fraction(48000, 1001)


@pytest.mark.server
def test_clear_errors(server, tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_client("video", tmp_path / "empty", "-o", tmp_path / "o.mp4", *conn(server))
    assert r.returncode == 2 and "no frames (expected PNG or JPEG" in r.stderr
    mixed = tmp_path / "mixed"
    clips.write_frame_folder(mixed, clips.clip_frames(3, 48, 64))
    clips.write_frame_folder(mixed, clips.clip_frames(1, 48, 80), pattern="g{}.png")
    r = run_client("video", mixed, "-o", tmp_path / "m.mp4", *conn(server))
    assert r.returncode == 2 and "g0.png is 80x48 but f0.png is 64x48" in r.stderr
    assert not list(tmp_path.glob("*.mp4")) and not list(tmp_path.glob(".*partial*"))
    clips.write_video(tmp_path / "pcm.avi", clips.clip_frames(3), Fraction(25), codec="mpeg4")  # PCM audio
    r = run_client("video", tmp_path / "pcm.avi", "-o", tmp_path / "pcm.mp4", *conn(server))
    assert r.returncode == 2 and "the copied audio (pcm_s16le) may not fit .mp4: write .mkv" in r.stderr
    assert not list(tmp_path.glob("*.mp4")) and not list(tmp_path.glob(".*partial*"))
    (tmp_path / "bad.mp4").write_bytes(b"not a video at all" * 100)
    r = run_client("video", tmp_path / "bad.mp4", "-o", tmp_path / "x.mp4", *conn(server))
    assert r.returncode == 2 and "not a video FFmpeg can read" in r.stderr


@pytest.mark.server
def test_shm_transport_gives_the_same_video_and_leaves_no_segment(server, shm_dir, clip_dir, tmp_path):
    """python -m eden_client video --transport shm: the same frames as over HTTP, x4 (generated frames encoded too),
    and every shared-memory segment removed by the end."""
    folder = tmp_path / "in"
    clips.write_frame_folder(folder, clips.clip_frames(7, 48, 64))
    outs = {}
    for transport in ("http", "shm"):
        outs[transport] = tmp_path / transport
        r = run_client("video", folder, "-o", outs[transport], "--factor", "4", "--fps", "25", "--transport",
                       transport, "--shm-dir", shm_dir, *conn(server))
        assert r.returncode == 0, r.stderr
    http, fast = sorted(outs["http"].iterdir()), sorted(outs["shm"].iterdir())
    assert len(http) == len(fast) == 25
    assert all(np.array_equal(read_rgb(a), read_rgb(b)) for a, b in zip(http, fast))
    assert not [p for p in shm_dir.iterdir() if p.name.startswith(("eden-", ".eden-"))]


def test_the_summary_says_what_set_the_pace():
    from eden_client.convert import pace_note
    from eden_client.sinks import Encoding
    x264 = Encoding()
    assert pace_note(10.0, {"write_blocked": 8.0, "commit_waiting": 0.1}, x264) == (
        "pace set by the output's encoding (libx264 preset veryfast: --preset superfast is faster, for larger files)")
    assert pace_note(10.0, {"write_blocked": 8.0}, Encoding(preset="ultrafast")) == "pace set by the output's encoding"
    assert pace_note(10.0, {"write_blocked": 8.0}, None) == "pace set by the output's encoding (PNG files)"
    assert pace_note(10.0, {"write_blocked": 0.2, "commit_waiting": 7.0}, x264) == "pace set by the servers"
    assert pace_note(10.0, {"write_blocked": 3.0, "commit_waiting": 3.0}, x264) == ""
    assert pace_note(0.0, {}, x264) == ""
    assert pace_note(5.0, {"commit_waiting": 3.0}, x264, finish_s=1.3) == (
        "pace set by the servers; the output's encoding ended 1.3 s after the last answer")
    assert pace_note(5.0, {}, x264, finish_s=1.3) == "the output's encoding ended 1.3 s after the last answer"
    assert pace_note(5.0, {"commit_waiting": 3.0}, x264, finish_s=0.4) == "pace set by the servers"

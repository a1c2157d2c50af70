"""Target frame rates (--target-fps): the output time grid, the dyadic positions each output frame shows, the
scheduler computing each needed midpoint once, and the stamps a player reads from the written video. A fake
deployment (no server): each frame carries an id in its first pixel and the fake knows the exact time of every id,
so the time shown by every output frame is checked exactly."""
from __future__ import annotations

import math
import threading
from fractions import Fraction

import numpy as np
import pytest

from eden_client.api import EncoderAnswer
from eden_client.convert import Options, convert, expected_outputs
from eden_client.frames_io import Frame
from eden_client.scenes import SceneDetector
from eden_client.video import (DEFAULT_MAX_DEPTH, Interpolator, TimeGrid, dyadic_path, frame_seed, max_time_error,
                          target_count)
from eden_serve import pipeline, protocol, wire
from eden_serve.config import EdenConfig

H, W = 32, 32


def stamp(image_id: int, h: int = H, w: int = W) -> np.ndarray:
    """A flat frame whose first pixel holds ``image_id`` (24 bits)."""
    img = np.full((h, w, 3), 128, np.uint8)
    img[0, 0] = (image_id & 255, (image_id >> 8) & 255, image_id >> 16)
    return img


def id_of(image: np.ndarray) -> int:
    r, g, b = (int(v) for v in image[0, 0])
    return r | g << 8 | b << 16


class TimedFake:
    """Stands in for EdenClient. Tokens carry each frame's id; the DiT+decoder's "middle frame" gets a new id whose
    time is the exact mean of its two ends' times. Records every frame encoded and every pair generated."""

    def __init__(self, times: dict[int, Fraction]):
        self.time = dict(times)  # id -> seconds
        self.next_id = max(times) + 1
        self.encoded: list[int] = []
        self.pairs: list[tuple[int, int, int]] = []  # (id a, id b, seed)
        self.made: dict[int, int] = {}  # id of a generated frame -> its seed
        self.lock = threading.Lock()
        self.cfg = EdenConfig()
        self.live: set[str] = set()
        self.answers = 0

    def encode_frames(self, frames, dtype="float16"):
        h, w = frames[0].shape[:2]
        geo = pipeline.Geometry.for_size(h, w, self.cfg)
        tokens = np.zeros((len(frames), 2, geo.grid[0] * geo.grid[1], 4), np.float32)
        tokens[:, 0, 0, 0] = [id_of(f) for f in frames]
        blob = wire.TokenBlob(tokens, (h, w), geo.padding, 16, [0.5] * len(frames), [0.2] * len(frames),
                              [0.0] * (len(frames) - 1), "")
        with self.lock:
            self.encoded += [id_of(f) for f in frames]
            self.answers += 1
            enc = EncoderAnswer(wire.from_bytes(blob.to_bytes()), segment=f"answer-{self.answers}")
            self.live.add(enc.segment)
        return enc

    def release(self, enc):
        with self.lock:
            self.live.remove(enc.segment)

    def generate_pair(self, first, i, second, j, difference, seed=None):
        a, b = int(first.blob.tokens[i, 0, 0, 0]), int(second.blob.tokens[j, 0, 0, 0])
        with self.lock:
            assert first.segment in self.live and second.segment in self.live, "used after release"
            new = self.next_id
            self.next_id += 1
            self.time[new] = (self.time[a] + self.time[b]) / 2
            self.pairs.append((a, b, seed))
            self.made[new] = seed
        return stamp(new, *first.blob.size), seed


def clip(times: list[Fraction], time_base: Fraction) -> tuple[list[Frame], dict[int, Fraction]]:
    """Input frames at ``times`` (seconds, multiples of ``time_base``), ids 1..N."""
    frames = [Frame(stamp(i + 1), int(t / time_base), 1) for i, t in enumerate(times)]
    return frames, {i + 1: t for i, t in enumerate(times)}


def run(times, time_base, **kw):
    frames, known = clip(times, time_base)
    fake = TimedFake(known)
    out = []
    interp = Interpolator(fake, time_base=time_base, **kw)
    stats = interp.run(frames, lambda img, pts, d: out.append((id_of(img), pts, d)))
    assert not fake.live  # every encoder answer released
    return fake, stats, out, interp


def nearest_dyadic(t: Fraction, times: list[Fraction], depth: int) -> Fraction:
    """What the spec says output time t shows: the nearest multiple of 2^-depth of its input interval."""
    i = max(k for k, ti in enumerate(times) if ti <= t)
    if i == len(times) - 1:
        return times[i]
    a, b = times[i], times[i + 1]
    q = math.floor((t - a) / (b - a) * 2 ** depth + Fraction(1, 2))
    return a + Fraction(q, 2 ** depth) * (b - a)


# ---------------------------------------------------------------------- the grid
def test_time_grid_is_exact():
    grid = TimeGrid.make(60, Fraction(1, 24), 0)
    assert grid.time_base == Fraction(1, 60) and grid.step == 1 and grid.pts(7) == 7
    ntsc = TimeGrid.make(Fraction(60000, 1001), Fraction(1001, 24000), 0)
    assert ntsc.time_base == Fraction(1001, 60000) and ntsc.time(5) == Fraction(5 * 1001, 60000)
    # a stream that does not start on the output grid: the time base fits both the start and 1/R
    late = TimeGrid.make(60, Fraction(1, 48), 1)
    assert late.time_base == Fraction(1, 240) and late.step == 4
    assert [late.pts(k) for k in range(3)] == [5, 9, 13] and late.time(2) == Fraction(1, 48) + Fraction(2, 60)
    assert target_count(Fraction(0), Fraction(8, 24), Fraction(60)) == 21  # 9 frames at 24 fps: 8 intervals x 2.5
    assert target_count(Fraction(0), Fraction(9, 24), Fraction(60)) == 23  # floor(22.5) + 1
    assert expected_outputs(9, Fraction(24), Options(target_fps=Fraction(60))) == 21
    assert expected_outputs(9, Fraction(24), Options(factor=4)) == 33


def test_dyadic_paths():
    assert dyadic_path(16, 32) == [16]
    assert dyadic_path(13, 32) == [16, 8, 12, 14, 13]
    assert dyadic_path(26, 32) == [16, 24, 28, 26]
    assert dyadic_path(0, 32) == dyadic_path(32, 32) == []


def test_max_time_error_of_the_default_depth():
    assert DEFAULT_MAX_DEPTH == 5
    for rate in (Fraction(24000, 1001), Fraction(24), Fraction(25), Fraction(30000, 1001), Fraction(30),
                 Fraction(50), Fraction(60)):
        assert max_time_error(rate, DEFAULT_MAX_DEPTH) < Fraction(1, 1000)  # under 1 ms at common rates
    assert max_time_error(Fraction(24), 5) == Fraction(1, 1536)


# ---------------------------------------------------------------------- 24 -> 60 through the scheduler
@pytest.mark.parametrize("depth", [3, 5, 7])
def test_24_to_60_frames_times_and_one_request_per_midpoint(depth):
    n = 13
    times = [Fraction(i, 24) for i in range(n)]
    fake, stats, out, _ = run(times, Fraction(1, 24), target_fps=Fraction(60), max_depth=depth, chunk=3,
                              max_inflight=4)
    # the count and stamps a player expects: 2.5 output frames per input interval, stamps k in 1/60 s, exact
    assert stats.output_frames == len(out) == (n - 1) * 5 // 2 + 1 == 31
    assert [(pts, d) for _, pts, d in out] == [(k, 1) for k in range(31)]
    for k, (image_id, _, _) in enumerate(out):
        t = Fraction(k, 60)
        assert fake.time[image_id] == nearest_dyadic(t, times, depth)
        assert abs(fake.time[image_id] - t) <= max_time_error(Fraction(24), depth)
        if k % 5 == 0:  # the times meet every second input frame: that input frame itself, not a generated one
            assert image_id == 2 * (k // 5) + 1
    assert stats.max_time_error_ms == pytest.approx(
        1000 * max(float(abs(fake.time[i] - Fraction(k, 60))) for k, (i, _, _) in enumerate(out)))
    # only the needed midpoints, each once: positions shown and their ancestors
    span = 2 ** depth
    wanted = set()
    for k in range(31):
        t = Fraction(k, 60)
        i = min(int(t * 24), n - 2)
        q = math.floor((t - times[i]) * 24 * span + Fraction(1, 2))
        wanted |= {(i, p) for p in dyadic_path(q, span)}
    made = [(fake.time[a], fake.time[b]) for a, b, _ in fake.pairs]
    assert len(made) == len(set(made)) == stats.ditdec_requests == len(wanted)
    assert {(i, int(((ta + tb) / 2 - times[i]) * 24 * span)) for ta, tb in made
            for i in [int(ta * 24)]} == wanted
    # every frame encoded once: the inputs and the generated frames that are ends of finer pairs
    assert len(fake.encoded) == len(set(fake.encoded)) == stats.encoded_frames
    ends = {a for a, _, _ in fake.pairs} | {b for _, b, _ in fake.pairs}
    assert set(fake.encoded) == ends
    # seeds: from the pair and its dyadic position, distinct
    seeds = [s for _, _, s in fake.pairs]
    assert len(set(seeds)) == len(seeds)
    first = next(s for a, b, s in fake.pairs if (fake.time[a], fake.time[b]) == (0, Fraction(1, 24)))
    assert first == frame_seed(0, "0+1/2")


def test_24_to_60_cost_at_the_default_depth():
    """The numbers in docs/videos.md: model calls per output frame for 24 -> 60 and 30 -> 60 at the default depth."""
    _, stats, out, _ = run([Fraction(i, 24) for i in range(49)], Fraction(1, 24), target_fps=Fraction(60))
    assert len(out) == 121 and stats.ditdec_requests == 24 * 16  # 16 per two input intervals (5 output frames)
    assert stats.ditdec_requests / (len(out) - 1) == pytest.approx(3.2)
    assert stats.max_time_error_ms == pytest.approx(0.4 / 32 / 24 * 1000)  # 0.52 ms
    assert (stats.encoded_frames - 49) / (len(out) - 1) == pytest.approx(2.4)  # generated ends of finer pairs
    _, stats, out, _ = run([Fraction(i, 30) for i in range(49)], Fraction(1, 30), target_fps=Fraction(60))
    assert len(out) == 97 and stats.ditdec_requests == 48 and stats.encoded_frames == 49
    assert stats.max_time_error_ms == 0


def test_ntsc_24_to_60_is_the_same_schedule():
    times = [Fraction(1001 * i, 24000) for i in range(9)]
    fake, stats, out, _ = run(times, Fraction(1001, 24000), target_fps=Fraction(60000, 1001))
    assert [pts for _, pts, _ in out] == list(range(21))
    assert stats.ditdec_requests == 4 * 16 and stats.max_time_error_ms < 0.6


def test_30_to_60_matches_factor_2():
    """An exact x2 rate shows the same frames at the same stamps as --factor 2 (its seeds are its own)."""
    times = [Fraction(i, 30) for i in range(10)]
    fake_t, stats_t, out_t, _ = run(times, Fraction(1, 30), target_fps=Fraction(60))
    fake_f, stats_f, out_f, _ = run(times, Fraction(1, 30), factor=2)
    assert [(fake_t.time[i], p, d) for i, p, d in out_t] == [(fake_f.time[i], p, d) for i, p, d in out_f]
    assert stats_t.ditdec_requests == stats_f.ditdec_requests == 9


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_factor_seeds_are_the_output_index(factor):
    """The factor path is the same machinery and keeps its seeds: frame_seed(seed, output index)."""
    times = [Fraction(i, 25) for i in range(5)]
    fake, stats, out, _ = run(times, Fraction(1, 25), factor=factor, seed=3)
    seeds = {k: fake.made[image_id] for k, (image_id, _, _) in enumerate(out) if image_id in fake.made}
    assert seeds == {k: frame_seed(3, k) for k in range(4 * factor + 1) if k % factor}
    assert len(fake.made) == stats.ditdec_requests == 4 * (factor - 1)


def test_variable_frame_rate_is_sampled_on_its_own_times():
    """VFR input (ms stamps 0, 40, 60, 140, 160) at 50 fps: a constant-rate output over the input's times."""
    times = [Fraction(t, 1000) for t in (0, 40, 60, 140, 160)]
    fake, stats, out, _ = run(times, Fraction(1, 1000), target_fps=Fraction(50))
    assert [pts for _, pts, _ in out] == list(range(9))
    shown = [fake.time[i] for i, _, _ in out]
    assert shown == [Fraction(t, 1000) for t in (0, 20, 40, 60, 80, 100, 120, 140, 160)]
    assert out[2][0] == 2 and out[3][0] == 3 and out[7][0] == 4 and out[8][0] == 5  # input frames at their times
    assert stats.ditdec_requests == 1 + 3  # 1/2 of (0, 40); 1/4, 1/2, 3/4 of (60, 140)


def test_last_frame_only_where_the_grid_meets_it_and_lone_frames():
    times = [Fraction(i, 24) for i in range(4)]  # last input at 1/8 s: no 60 fps stamp there
    fake, stats, out, interp = run(times, Fraction(1, 24), target_fps=Fraction(60))
    assert len(out) == target_count(times[0], times[-1], Fraction(60)) == 8 and out[-1][1] == 7
    assert all(fake.time[i] < times[-1] for i, _, _ in out)
    _, stats, out, _ = run([Fraction(0)], Fraction(1, 24), target_fps=Fraction(60))
    assert [(i, p) for i, p, _ in out] == [(1, 0)] and stats.encoder_requests == 0
    assert out[0][2] == 2 or out[0][2] == 3  # the lone frame keeps its own duration (1/24 s = 2.5 steps)


def test_slower_target_drops_and_places_frames():
    times = [Fraction(i, 60) for i in range(11)]
    fake, stats, out, _ = run(times, Fraction(1, 60), target_fps=Fraction(24))
    assert len(out) == 5 and [fake.time[i] for i, _, _ in out] == [Fraction(k, 24) for k in range(5)]
    assert stats.ditdec_requests == 2  # 2.5 input steps per output: every other frame is a midpoint


def test_scene_cut_repeats_the_first_frame():
    from eden_dev import clips
    a = np.full((H, W, 3), 90, np.uint8)
    b = clips.shot_b(1, H, W)[0]
    frames = [Frame(a, 0, 1), Frame(a.copy(), 1, 1), Frame(b, 2, 1), Frame(b.copy(), 3, 1)]
    fake = TimedFake({1: Fraction(0)})
    fake.encode_frames = lambda fr, dtype="float16": TimedFake.encode_frames(fake, [stamp(1)] * len(fr))
    out = []
    stats = Interpolator(fake, time_base=Fraction(1, 24), target_fps=Fraction(60), detector=SceneDetector(0.25)) \
        .run(frames, lambda img, pts, d: out.append(img))
    assert stats.cuts == 1 and len(out) == 8  # t = 0 .. 7/60 (last input at 3/24 = 7.5/60)
    # the cut pair is (1/24, 2/24): outputs k = 3, 4 (t = 3/60, 4/60; u = 0.5, 0.75) repeat frame 1
    assert np.array_equal(out[3], a) and np.array_equal(out[4], a)
    assert np.array_equal(out[5], b)  # t = 5/60 = 2/24: the next shot's first frame itself
    assert id_of(out[1]) not in (0, 1) and id_of(out[6]) not in (0, 1)  # generated (u = 0.4 of pairs 0 and 2)
    assert stats.ditdec_requests == 2 * 8  # pairs 0 and 2 (u = 0.4 and 0.8 each), none for the cut


# ---------------------------------------------------------------------- what a player reads
def test_24_to_60_video_stamps_rate_and_audio(tmp_path):
    av = pytest.importorskip("av")
    from eden_dev import clips
    src = tmp_path / "in.mp4"
    clips.write_video(src, clips.clip_frames(13, 48, 64), Fraction(24))
    fake = TimedFake({1: Fraction(0)})
    fake.encode_frames = lambda fr, dtype="float16": TimedFake.encode_frames(fake, [stamp(1)] * len(fr))
    fake.generate_pair = lambda *a, **k: (np.zeros((48, 64, 3), np.uint8), k.get("seed"))
    stats = convert(src, tmp_path / "out.mp4", fake, Options(target_fps=Fraction(60)))
    assert stats.output_frames == 31
    # where the client's time went (--stats-json): reading, the writer's threads, the encoder
    assert set(stats.client_seconds) == {"read", "prepare", "commit", "commit_waiting", "prepare_waiting",
                                           "write_blocked"}
    assert stats.client_seconds["read"] > 0 and stats.client_seconds["commit"] > 0
    with av.open(str(tmp_path / "out.mp4")) as c:
        v = c.streams.video[0]
        frames = list(c.decode(v))
        assert v.average_rate == 60
        assert [f.pts * v.time_base for f in frames] == [Fraction(k, 60) for k in range(31)]
    with av.open(str(src)) as a, av.open(str(tmp_path / "out.mp4")) as b:
        audio_in = [bytes(p) for p in a.demux(*a.streams.audio) if p.size]
        audio_out = [bytes(p) for p in b.demux(*b.streams.audio) if p.size]
    assert audio_out == audio_in and len(audio_in) > 5


@pytest.mark.parametrize("chunk", [1, 4])
def test_a_lone_frame_is_not_encoded(chunk):
    for kw in ({"factor": 4}, {"target_fps": Fraction(60)}):
        fake, stats, out, _ = run([Fraction(0)], Fraction(1, 24), chunk=chunk, **kw)
        assert len(out) == 1 and fake.answers == stats.encoder_requests == 0


# ---------------------------------------------------------------------- batch reruns with other settings
def test_batch_rerun_with_other_settings_redoes_the_output(tmp_path):
    from eden_client.batch import run_batch, settings_path
    from eden_dev import clips
    src, out = tmp_path / "in", tmp_path / "out"
    clips.write_frame_folder(src / "shot", [stamp(i + 1) for i in range(5)])

    def batch(**kw):
        fake = TimedFake({i + 1: Fraction(i, 24) for i in range(5)})
        jobs, code = run_batch(src, out, fake, Options(fps=Fraction(24), **kw), quiet=True)
        assert code == 0
        return jobs[0], len(list((out / "shot").iterdir()))

    job, frames = batch(factor=2)
    assert job.status == "done" and frames == 9 and settings_path(out / "shot").is_file()
    job, frames = batch(factor=2)
    assert job.status == "skipped" and "already done with these settings" in job.detail and frames == 9
    job, frames = batch(target_fps=Fraction(60))
    assert job.status == "done" and frames == 11
    assert "redone, settings changed (factor 2 -> (none), max_depth (none) -> 5, target_fps (none) -> 60)" \
        in job.detail
    job, frames = batch(target_fps=Fraction(60), seed=1)
    assert job.status == "done" and "seed 0 -> 1" in job.detail
    settings_path(out / "shot").unlink()  # an output made before records existed is kept as it is
    job, frames = batch(factor=4)
    assert job.status == "skipped" and "settings not recorded" in job.detail and frames == 11
    assert not [p for p in out.rglob("*") if "partial" in p.name]


# ---------------------------------------------------------------------- 4K by default
def test_4k_is_admitted_where_the_gpu_has_the_memory():
    import torch
    from eden_serve import limits
    from eden_serve.config import EdenConfig
    gpu = torch.device("cuda", 0)
    pixels, note = limits.resolve_max_pixels(0, gpu, batch_size=4, total_memory=141 * 2**30)  # an H200
    assert pixels == 4096 * 2160 >= 3840 * 2160 and "4K" in note
    pixels, note = limits.resolve_max_pixels(0, gpu, batch_size=4, total_memory=16 * 2**30)
    assert pixels == 2560 * 1440 and "has 16.0 GiB" in note and "smaller --batch-size" in note
    assert limits.resolve_max_pixels(0, gpu, batch_size=1, total_memory=16 * 2**30)[0] == 4096 * 2160
    # every worker on the GPU may run a 4K batch at once: four of them (two per model, one GPU) need 4x the memory
    assert limits.resolve_max_pixels(0, gpu, 4, 141 * 2**30, workers_on_gpu=4)[0] == 4096 * 2160
    pixels, note = limits.resolve_max_pixels(0, gpu, 4, 48 * 2**30, workers_on_gpu=4)
    assert pixels == 2560 * 1440 and "for its 4 worker(s)" in note and "fewer --workers-per-gpu" in note
    pixels, own = limits.resolve_max_pixels(640 * 480, gpu, 4, 141 * 2**30)  # the archive's own setting wins
    assert pixels == 640 * 480 and "max_pixels setting" in own
    pixels, note = limits.resolve_max_pixels(0, torch.device("cpu"), batch_size=4)
    assert pixels == 2560 * 1440 and "CPU worker" in note
    message = limits.explain("frame0: 3840x2160 is 8294400 pixels, over the limit of 3686400", note)
    assert message.startswith("frame0: 3840x2160") and "CPU worker" in message
    assert limits.explain("truncated blob", note) == "truncated blob"
    # the wire at 4K (released model, float16): a pair passes TorchServe's 256 MiB body limits, 4 frames do not
    cfg = EdenConfig()
    pair = wire.expected_nbytes(2, 2160, 4096, cfg.hidden_dim, "float16", cfg.pad_multiple, cfg.patch_size)
    four = wire.expected_nbytes(4, 2160, 3840, cfg.hidden_dim, "float16", cfg.pad_multiple, cfg.patch_size)
    assert pair + wire.MAX_HEADER_BYTES < protocol.MAX_BODY_BYTES < four


def test_after_a_413_chunks_formed_earlier_are_split_before_sending():
    from eden_client.errors import ServeError

    class Limited(TimedFake):
        sent: list[int] = []

        def encode_frames(self, frames, dtype="float16"):
            self.sent.append(len(frames))
            if len(frames) > 2:
                raise ServeError("eden_encoder: HTTP 413: response too large", 413)
            return super().encode_frames(frames, dtype)

    times = [Fraction(i, 24) for i in range(25)]
    frames, known = clip(times, Fraction(1, 24))
    fake = Limited(known)
    out = []
    Interpolator(fake, factor=2, chunk=4, max_inflight=16, time_base=Fraction(1, 24)).run(
        frames, lambda img, *_: out.append(img))
    assert len(out) == 49 and fake.sent.count(2) + fake.sent.count(1) >= 12
    assert sum(n > 2 for n in fake.sent) <= 2  # the 413s: the first chunk (and one sent meanwhile), not every one


def test_a_pair_over_the_request_limit_says_what_to_do():
    from eden_client.errors import ServeError

    class Refusing(TimedFake):
        def generate_pair(self, *a, **k):
            raise ServeError("eden_ditdec: HTTP 413: Request Entity Too Large", 413)

    frames, known = clip([Fraction(0), Fraction(1, 24)], Fraction(1, 24))
    with pytest.raises(ServeError, match="over TorchServe's request limit .* --token-dtype float16 or --transport shm"):
        Interpolator(Refusing(known), factor=2, token_dtype="float32").run(frames, lambda *a: None)


# ---------------------------------------------------------------------- through a real TorchServe
@pytest.mark.server
def test_24_to_60_through_the_server(server, tmp_path):
    """The tiny model served by TorchServe: 13 frames at 24 fps -> 31 at 60 fps, the input frames where the times
    meet, the same frames again on a rerun (seeds from the dyadic positions), and the counts of docs/videos.md."""
    from conftest import read_rgb
    from eden_client.api import EdenClient
    from eden_client.keys import KeySource
    from eden_dev import clips
    frames = clips.clip_frames(13, 48, 64)
    clips.write_frame_folder(tmp_path / "in", frames)
    client = EdenClient.connect(server.inference_url, encoder_keys=KeySource(key_file=server.key_file))
    options = Options(target_fps=Fraction(60), fps=Fraction(24), max_inflight=8)
    stats = convert(tmp_path / "in", tmp_path / "a", client, options)
    assert stats.output_frames == 31 and stats.ditdec_requests == 6 * 16
    assert stats.encoded_frames == 13 + 6 * 12 and stats.max_time_error_ms < 0.53
    out = sorted((tmp_path / "a").iterdir())
    assert len(out) == 31
    for k in range(0, 31, 5):
        assert np.array_equal(read_rgb(out[k]), frames[2 * k // 5])
    convert(tmp_path / "in", tmp_path / "b", client, options)
    # same seeds, same frames: to within one level, as requests in flight may share batches differently
    for p in out:
        a, b = read_rgb(p).astype(int), read_rgb(tmp_path / "b" / p.name).astype(int)
        assert np.abs(a - b).max() <= 1


def test_cli_flags():
    import argparse
    from eden_client.frames_io import FramesError
    from eden_client.video_cli import add_interpolation_args, options_from
    p = argparse.ArgumentParser()
    add_interpolation_args(p)
    o = options_from(p.parse_args(["--target-fps", "59.94"]))
    assert o.target_fps == Fraction(60000, 1001) and o.max_depth == DEFAULT_MAX_DEPTH
    assert options_from(p.parse_args([])).factor == 2 and options_from(p.parse_args([])).target_fps is None
    assert options_from(p.parse_args(["--target-fps", "60000/1001", "--max-depth", "3"])).max_depth == 3
    with pytest.raises(SystemExit):
        p.parse_args(["--factor", "4", "--target-fps", "60"])  # one or the other
    with pytest.raises(FramesError, match="--max-depth must be 1..10"):
        options_from(p.parse_args(["--target-fps", "60", "--max-depth", "0"]))
    with pytest.raises(FramesError, match="--max-depth goes with --target-fps"):
        options_from(p.parse_args(["--factor", "4", "--max-depth", "3"]))
    help_text = p.format_help()
    assert "--target-fps RATE" in help_text and "default 5" in help_text.replace("\n", " ").replace("  ", " ")


def test_batch_redo_that_fails_keeps_the_old_output_and_its_record(tmp_path, monkeypatch):
    from eden_client import batch as batch_mod
    from eden_dev import clips
    src, out = tmp_path / "in", tmp_path / "out"
    clips.write_frame_folder(src / "shot", [stamp(i + 1) for i in range(3)])
    fake = TimedFake({i + 1: Fraction(i, 24) for i in range(3)})
    assert batch_mod.run_batch(src, out, fake, Options(fps=Fraction(24)), quiet=True)[1] == 0
    record = batch_mod.settings_path(out / "shot").read_text()

    def broken(*a, **k):
        raise RuntimeError("server gone")

    monkeypatch.setattr(batch_mod, "convert", broken)
    jobs, code = batch_mod.run_batch(src, out, fake, Options(fps=Fraction(24), seed=5), quiet=True)
    assert code == 1 and jobs[0].status == "failed" and "server gone" in jobs[0].detail
    # a frame folder is removed before it is redone; its old record is harmless (no output: it is redone)
    assert not (out / "shot").exists() and batch_mod.settings_path(out / "shot").read_text() == record


def test_target_rate_memory_is_bounded():
    times = [Fraction(i, 24) for i in range(200)]
    frames, known = clip(times, Fraction(1, 24))
    fake = TimedFake(known)
    read, written = [], []

    def source():
        for f in frames:
            read.append(f.pts)
            # inputs held (read, not yet written): the window (max_inflight + chunk pairs) and the writer's queue
            # (16 output frames, 2.5 per input), whatever the length
            assert len(read) - len(written) / 2.5 <= (4 + 4) + 16 / 2.5 + 3
            yield f

    stats = Interpolator(fake, max_inflight=4, chunk=4, time_base=Fraction(1, 24), target_fps=Fraction(60)).run(
        source(), lambda *a: written.append(a))
    assert stats.output_frames == len(written) == 199 * 5 // 2 + 1

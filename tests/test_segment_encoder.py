"""eden_client.segment_encoder: one H.264 stream made by several x264 encoders on consecutive segments (real libx264
through PyAV; the memory bound with a stand-in encoder that only waits)."""
from __future__ import annotations

import threading
import time
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest

from eden_client import segment_encoder
from eden_client.segment_encoder import Plan, SegmentEncoder, plan

import av  # a test dependency (eden-serve[video])


def test_plan_by_cores_and_frame_size():
    """From 720p up one encoder per 8 cores (what one x264 stream keeps busy at 1080p, bench/NOTES.md session 9),
    at most 8; one below 720p, for other codecs and on small machines; the user's count wins; segments 60-250
    frames."""
    assert plan("libx264", 1920, 1080, 16).encoders == 2
    assert plan("libx264", 1920, 1080, 32).encoders == 4
    assert plan("libx264", 1280, 720, 16).encoders == 2
    assert plan("libx264", 854, 480, 32) == Plan(1)
    assert plan("libx264", 854, 480, 32, encoders=4).encoders == 4
    assert plan("libx264", 1920, 1080, 2) == Plan(1)
    assert plan("libx265", 1920, 1080, 32) == Plan(1) and plan("libvpx-vp9", 854, 480, 64) == Plan(1)
    assert plan("libx264", 1920, 1080, 32, encoders=1) == Plan(1)
    mine = plan("libx264", 64, 48, 2, encoders=3)
    assert mine.encoders == 3 and mine.segment_frames == 250 and mine.threads == 1
    for cores in (8, 16, 32, 64, 128):
        for w, h in ((854, 480), (1920, 1080), (3840, 2160)):
            p = plan("libx264", w, h, cores)
            assert p.encoders == 1 or 60 <= p.segment_frames <= 250
            assert p.queued_frames * w * h * 1.5 <= (1 << 30)  # frames waiting for their encoder: 1 GiB at most
    assert plan("libx264", 3840, 2160, 64) == Plan(1) and plan("libx264", 1920, 1080, 64).encoders == 5
    assert plan("libx264", 3840, 2160, 64, encoders=8) == Plan(1)  # the user's count within the queue too


def short_segments(monkeypatch, encoders, w=64, h=48):
    """Segments of 60 frames (the shortest but at the end) for ``encoders`` encoders of w x h frames: the queue's
    budget made that small."""
    monkeypatch.setattr(segment_encoder, "QUEUE_BYTES", int(encoders * 60 * w * h * 1.5))


def gradient(i, h=48, w=64):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([(np.sin((xx + 3 * i) / 9.) * 100 + 120), (np.cos((yy + 2 * i) / 7.) * 100 + 120),
                     (xx + yy + 5 * i) % 256], -1).astype(np.uint8)


def write(path, images, encoders, audio_from=None, rate=Fraction(25), frames=None):
    from eden_client.frames_io import VideoMeta
    from eden_client.sinks import Encoding, VideoSink
    h, w = images[0].shape[:2]
    sink = VideoSink(path, VideoMeta(1 / rate, rate, w, h, audio_from=audio_from), 2, Encoding(encoders=encoders),
                     frames)
    for i, image in enumerate(images):
        sink.write(image, i, 1)
    sink.close()
    return sink


def read(path):
    with av.open(str(path)) as c:
        packets = [(p.pts, p.dts, p.is_keyframe) for p in c.demux(c.streams.video[0]) if p.size]
    with av.open(str(path)) as c:
        frames = [(f.pts, f.to_ndarray(format="rgb24")) for f in c.decode(video=0)]
    with av.open(str(path)) as c:
        audio = [(p.pts, bytes(p)) for p in c.demux(*c.streams.audio) if p.size] if c.streams.audio else []
    return packets, frames, audio


def test_segments_make_one_ordinary_stream_with_the_audio(tmp_path, monkeypatch):
    """Three encoders, segments of 60 frames, the last of one frame: every frame decodes, in order, at the time
    stamps and with the durations one encoder gives, each segment starts with a keyframe, the audio is copied packet
    for packet, and the pixels are as good."""
    from eden_dev import clips
    short_segments(monkeypatch, 3)
    rng = np.random.default_rng(0)
    images = [gradient(i) if i % 3 else rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for i in range(121)]
    source = tmp_path / "with_audio.mp4"
    clips.write_video(source, images[:75], Fraction(25))
    one = read(write(tmp_path / "one.mp4", images, 1, source).path)
    sink = write(tmp_path / "three.mp4", images, 3, source)
    assert (sink.plan.encoders, sink.plan.segment_frames) == (3, 60)
    packets, frames, audio = read(sink.path)
    assert [pts for pts, _ in frames] == [pts for pts, _ in one[1]] and len(frames) == 121
    # a one-frame segment's own encoder sees no reordering delay: its decoding time is the stream's
    assert [b[1] - a[1] for a, b in zip(packets, packets[1:])] == [b[1] - a[1] for a, b in zip(one[0], one[0][1:])]
    assert [i for i, (_, _, key) in enumerate(packets) if key] == [0, 60, 120]
    assert all(b[1] > a[1] for a, b in zip(packets, packets[1:]))  # decoding order strictly increasing
    assert audio == one[2] and len(audio) > 50
    _, _, source_audio = read(source)
    assert audio == source_audio

    def psnr(decoded):
        err = np.mean([(f.astype(float) - im) ** 2 for (_, f), im in zip(decoded, images)])
        return 10 * np.log10(255 ** 2 / err)
    assert abs(psnr(frames) - psnr(one[1])) < 0.5
    # the total known: the last two segments' worth in halves (31, then the 30 left), so the end is short
    packets, frames, audio = read(write(tmp_path / "known.mp4", images, 3, source, frames=121).path)
    assert [i for i, (_, _, key) in enumerate(packets) if key] == [0, 60, 91]
    assert [pts for pts, _ in frames] == [pts for pts, _ in one[1]] and audio == source_audio


def test_the_last_segments_are_shorter_with_every_thread():
    encoder = SegmentEncoder(SlowContext, Plan(2, 60, 3, 6), b"headers", total=200)
    starts, lengths = [0], []
    while starts[-1] < 200:
        frames, threads = encoder.length(starts[-1])
        lengths.append((frames, threads))
        starts.append(starts[-1] + frames)
    assert lengths == [(60, 3), (60, 3), (40, 6), (20, 6), (20, 6)]
    assert encoder.length(200) == encoder.length(10 ** 6) == (60, 3)  # more frames than expected: full segments
    encoder.abort()


def test_an_encoders_error_reaches_the_writer_and_nothing_is_left(tmp_path, monkeypatch):
    from eden_client.frames_io import FramesError, VideoMeta
    from eden_client.sinks import Encoding, VideoSink, partial_path
    short_segments(monkeypatch, 2)
    out = tmp_path / "o.mp4"
    sink = VideoSink(out, VideoMeta(Fraction(1, 25), Fraction(25), 64, 48), 2, Encoding(encoders=2))
    made = []

    def failing_second_segment(threads):
        made.append(1)
        if len(made) == 2:
            raise RuntimeError("the encoder could not start")
        return VideoSink._new_encoder(sink, threads)
    sink._new_encoder = failing_second_segment
    sink.segments.make_context = failing_second_segment
    with pytest.raises(FramesError, match="could not start"):
        for i in range(200):
            sink.write(gradient(i), i, 1)
        sink.close()
    sink.close(complete=False)
    assert not out.exists() and not partial_path(out).exists()
    assert not [t for t in threading.enumerate() if t.name.startswith("eden-encoder")]


def test_encoders_with_other_headers_are_refused():
    """Two settings that make different stream headers cannot share one stream."""
    def context(preset):
        c = av.CodecContext.create("libx264", "w")
        c.width, c.height, c.pix_fmt, c.time_base = 64, 48, "yuv420p", Fraction(1, 25)
        c.options = {"preset": preset, "crf": "18"}
        c.flags |= av.codec.context.Flags.global_header  # headers apart, as an mp4 stream has them
        return c
    reference = context("veryfast")
    reference.open()
    presets = iter(["veryfast", "placebo"])
    encoder = SegmentEncoder(lambda threads: context(next(presets)), Plan(2, 60, 1), reference.extradata)
    frame = av.VideoFrame.from_ndarray(gradient(0), format="rgb24").reformat(format="yuv420p")
    with pytest.raises(RuntimeError, match="different stream headers"):
        for i in range(200):
            frame.pts = i
            encoder.encode(frame)
        encoder.flush()
    encoder.abort()


class SlowContext:
    """Stands in for a codec context: holds nothing, takes a while, gives one packet a frame."""
    extradata = b"headers"
    outstanding = 0
    most = 0
    lock = threading.Lock()

    def __init__(self, threads):
        pass

    def open(self):
        pass

    def encode(self, frame):
        time.sleep(0.002)
        if frame is None:
            return []
        with SlowContext.lock:
            SlowContext.outstanding -= 1
        return [SimpleNamespace(pts=frame.pts, dts=None)]


def test_frames_waiting_stay_within_the_plan_and_packets_come_in_order():
    p = Plan(3, 5, 1)
    encoder = SegmentEncoder(SlowContext, p, b"headers")
    out = []
    for i in range(100):
        with SlowContext.lock:
            SlowContext.outstanding += 1
            SlowContext.most = max(SlowContext.most, SlowContext.outstanding)
        out += encoder.encode(SimpleNamespace(pts=i))
    out += encoder.flush()
    assert [packet.pts for packet in out] == list(range(100))
    assert SlowContext.most <= p.queued_frames + 1


def test_outputs_written_at_once_share_the_cores(tmp_path, monkeypatch):
    """``batch --jobs 2`` (or two inputs a Ray node runs at once): each output's plan counts on its share of the
    cores, not on all of them."""
    from eden_client import convert, sinks
    from eden_client.convert import Options
    from eden_client.frames_io import VideoMeta
    from eden_client.sinks import Encoding, VideoSink
    monkeypatch.setattr(sinks, "usable_cores", lambda: 32)
    monkeypatch.setattr(convert, "usable_cores", lambda: 32)
    meta = VideoMeta(Fraction(1, 25), Fraction(25), 1920, 1080)
    for sharing, encoders in ((1, 4), (2, 2), (4, 1)):
        cores = Options().shared_by(sharing).output_cores()
        assert cores == 32 // sharing
        sink = VideoSink(tmp_path / f"s{sharing}.mp4", meta, 2, Encoding(), cores=cores if sharing > 1 else None)
        try:
            assert sink.plan.encoders == encoders
        finally:
            sink.close(complete=False)


def write_at(path, pts, encoders, frames=None):
    """Frames at the time stamps ``pts`` (1/1000 s) through VideoSink; the file's video packets (pts, dts)."""
    from eden_client.frames_io import VideoMeta
    from eden_client.sinks import Encoding, VideoSink
    sink = VideoSink(path, VideoMeta(Fraction(1, 1000), Fraction(25), 64, 48), 1, Encoding(encoders=encoders), frames)
    for k, t in enumerate(pts):
        sink.write(gradient(k), t, (pts[k + 1] - t) if k + 1 < len(pts) else 40)
    sink.close()
    with av.open(str(path)) as c:
        return [(p.pts, p.dts) for p in c.demux(c.streams.video[0]) if p.size]


@pytest.mark.parametrize("case", ["uneven spacing", "one gap", "fewer frames expected"])
def test_decoding_times_are_one_encoders_whatever_the_spacing(tmp_path, monkeypatch, case):
    """x264 gives packet n the time of frame n - d (d: its B-frame reordering) and the first d packets their own less
    an opening delay; with several encoders the stream must get the same (each segment's encoder starts its own
    opening, and a first segment shorter than the reordering measured none): with frames unevenly spaced, one gap in
    regular ones, or far more frames than the writer was told to expect (a first segment of 16)."""
    short_segments(monkeypatch, 3)
    rng = np.random.default_rng(2)
    if case == "uneven spacing":
        pts = np.cumsum(rng.choice([10, 30, 40, 120], 200)).tolist()
    else:
        pts = [40 * k + (500 if case == "one gap" and k >= 97 else 0) for k in range(200)]
    frames = 2 if case == "fewer frames expected" else None
    one = write_at(tmp_path / "one.mp4", pts, 1)
    three = write_at(tmp_path / "three.mp4", pts, 3, frames)
    # the same decoding times and frames; the order within a group of pictures is each encoder's own choice
    assert [dts for _, dts in three] == [dts for _, dts in one]
    assert sorted(t for t, _ in three) == sorted(t for t, _ in one) and len(three) == len(pts)
    assert all(t >= dts for t, dts in three)

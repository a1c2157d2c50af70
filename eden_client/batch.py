"""``batch IN_DIR OUT_DIR``: every video file and every folder of frames under IN_DIR, mirrored under OUT_DIR.

* A video ``IN_DIR/a/b.mp4`` becomes ``OUT_DIR/a/b.mp4`` (same container, so its audio always fits; ``.webm``
  becomes ``.mkv`` unless the codec is VP8/VP9/AV1, the only ones WebM allows). A folder holding PNG/JPEG frames,
  ``IN_DIR/a/shot``, becomes the folder of PNG frames ``OUT_DIR/a/shot`` (frames at the root of IN_DIR go to
  ``OUT_DIR/<name of IN_DIR>``; a folder whose frames sit beside other inputs, e.g. ``IN_DIR/a/f0.png`` and
  ``IN_DIR/a/b.mp4``, writes its frames to ``OUT_DIR/a/_frames``). Hidden files and folders, and OUT_DIR if it
  lies inside IN_DIR, are skipped.
* Done means the final name exists: outputs are written under a temporary name and renamed when complete, so a
  crash or Ctrl-C never leaves something that looks done, and a rerun skips exactly what was finished and redoes
  (from the start) what was not.
* The settings that decide an output's frames (factor or target rate, seed, scene cuts, codec, ...) are recorded
  next to it (``.NAME.eden.json``); a rerun with other settings redoes that output (the new one replaces the old
  when complete) and says what changed. An output without a record (made before records existed) is kept.
* One failing input does not stop the others; the run ends with a table (done / skipped / failed and why) and exit
  code 0 if nothing failed, 1 otherwise (130 if interrupted).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .convert import Options, convert, expected_outputs
from .frames_io import VIDEO_EXTENSIONS, FramesError
from .progress import Progress
from .sinks import check_no_links
from .sources import DEFAULT_FOLDER_FPS, FRAME_EXTENSIONS, frame_files, natural_key, open_source

MIXED_FRAMES = "_frames"
WEBM_CODECS = ("libvpx", "libvpx-vp9", "libaom-av1", "libsvtav1", "librav1e")


class Cancelled(Exception):
    """The batch was interrupted (Ctrl-C): running jobs stop and remove their partial output."""


@dataclass
class Job:
    src: Path
    dst: Path
    name: str  # the input's path relative to IN_DIR, for messages
    status: str = "pending"  # done | skipped | failed | interrupted
    detail: str = ""
    frames: int = 0  # expected output frames (0: unknown)
    redo: str = ""  # the output exists but was made with other settings: what changed
    out_dir: Path | None = None  # OUT_DIR, inside which no link is written through


def output_path(src: Path, in_dir: Path, out_dir: Path, codec: str) -> Path:
    rel = src.relative_to(in_dir)
    if src.is_dir():
        return out_dir / (rel if rel.parts else in_dir.name)
    suffix = src.suffix.lower()
    if suffix == ".webm" and codec not in WEBM_CODECS:
        suffix = ".mkv"
    return (out_dir / rel).with_suffix(suffix)


def find_jobs(in_dir: Path, out_dir: Path, codec: str) -> list[Job]:
    """Every video file and every folder with frames under ``in_dir`` (recursively, natural order)."""
    in_dir, out_dir = in_dir.resolve(), out_dir.resolve()
    jobs = []
    for root, dirs, files in os.walk(in_dir):
        root_path = Path(root)
        dirs[:] = sorted((d for d in dirs if not d.startswith(".") and (root_path / d).resolve() != out_dir),
                         key=natural_key)
        visible = [f for f in files if not f.startswith(".")]
        if any(f.lower().endswith(FRAME_EXTENSIONS) for f in visible):
            jobs.append(root_path)
        jobs += [root_path / f for f in sorted(visible, key=natural_key) if f.lower().endswith(VIDEO_EXTENSIONS)]
    holding_inputs = {parent for q in jobs for parent in q.parents}
    result = []
    for p in jobs:
        dst = output_path(p, in_dir, out_dir, codec)
        if p.is_dir() and p != in_dir and p in holding_inputs:
            dst = dst / MIXED_FRAMES  # the mirrored folder also holds the outputs of the inputs under it
        result.append(Job(p, dst, str(p.relative_to(in_dir)) if p != in_dir else ".", out_dir=out_dir))
    return result


def _expected_frames(job: Job, options: Options) -> int:
    if job.src.is_dir():
        return expected_outputs(len(frame_files(job.src)), options.fps or DEFAULT_FOLDER_FPS, options)
    try:
        source = open_source(job.src)
    except Exception:  # noqa: BLE001 - reported when the job runs
        return 0
    try:
        return expected_outputs(source.count, source.meta.rate, options)
    finally:
        source.close()


SETTINGS_VERSION = 1


def settings_path(dst: Path) -> Path:
    """Where the settings an output was made with are recorded: a hidden file beside it."""
    return dst.with_name(f".{dst.name}.eden.json")


def wanted_settings(job: Job, options: Options) -> dict:
    return options.settings(video_output=not job.src.is_dir())  # a video in, a video out


def recorded_settings(dst: Path) -> dict | None:
    """The settings recorded with ``dst`` (None: no record, or one this version cannot read)."""
    try:
        fd = os.open(settings_path(dst), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # never through a link
        with os.fdopen(fd, "rb") as f:
            data = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != SETTINGS_VERSION or not isinstance(
            data.get("settings"), dict):
        return None
    return data["settings"]


def record_settings(dst: Path, settings: dict) -> None:
    """Write the record beside ``dst`` through a fresh temporary file (O_EXCL: a link planted under a temporary
    name is never written through), renamed over the record (a link there is replaced, not followed)."""
    path = settings_path(dst)
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"version": SETTINGS_VERSION, "settings": settings}, indent=1))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def settings_change(old: dict, new: dict) -> str:
    """What differs, e.g. 'factor 2 -> (none), target_fps (none) -> 60'."""
    def show(v):
        return "(none)" if v is None else str(v)
    return ", ".join(f"{k} {show(old.get(k))} -> {show(new.get(k))}" for k in sorted(set(old) | set(new))
                     if old.get(k) != new.get(k))


def process(job: Job, client, options: Options, on_progress) -> None:
    """Convert one input and record the settings it was made with; sets ``job.status`` and ``job.detail`` (never
    raises for a failing input). Also what each task of a Ray cluster runs on its node (eden_client/cluster.py)."""
    try:
        if job.out_dir is not None:  # a link planted inside OUT_DIR is never written through
            check_no_links(Path(job.out_dir).resolve(), job.dst)
            check_no_links(Path(job.out_dir).resolve(), settings_path(job.dst))
        settings = wanted_settings(job, options)
        if job.redo and job.dst.is_dir():
            # other settings than the output's: a video is replaced when the new one is complete, but a folder
            # of frames cannot be renamed over, so the old one goes first. The old record stays until the new
            # output is complete: if this run stops before, the next one still sees the old settings.
            shutil.rmtree(job.dst)
        stats = convert(job.src, job.dst, client, options, on_progress=on_progress)
        record_settings(job.dst, settings)
        job.status = "done"
        job.detail = (f"{stats.input_frames} -> {stats.output_frames} frames, {stats.fps:.1f} fps, "
                      f"{stats.cuts} scene cut{'s' * (stats.cuts != 1)}, encoder {stats.encoded_frames} frames "
                      f"in {stats.encoder_requests} requests ({stats.token_bytes / 1e6:.1f} MB of tokens)")
        if job.redo:
            job.detail = f"redone, settings changed ({job.redo}): {job.detail}"
    except Cancelled:
        job.status, job.detail = "interrupted", "stopped, partial output removed"
    except FramesError as e:
        job.status, job.detail = "failed", str(e).splitlines()[0]
    except Exception as e:  # noqa: BLE001 - one failing input must not stop the batch
        job.status, job.detail = "failed", f"{type(e).__name__}: {e}".splitlines()[0]


def check_folders(in_dir: Path, out_dir: Path) -> None:
    """FramesError naming the problem unless IN_DIR is a folder and OUT_DIR another one (the CLI checks this before
    it asks anything of the servers, so a typo is not hidden behind a key or an address problem)."""
    if not in_dir.is_dir():
        why = "is not a folder (one video: eden-client video)" if in_dir.exists() else "no such folder"
        raise FramesError(f"{in_dir}: {why}")
    if in_dir.resolve() == out_dir.resolve():
        raise FramesError(f"OUT_DIR must be another folder than IN_DIR ({in_dir}): outputs keep the inputs' names")


def run_batch(in_dir: Path, out_dir: Path, client, options: Options, workers: int = 1,
              quiet: bool = False, runner=None) -> tuple[list[Job], int]:
    """Process what is not done yet; returns the jobs (with status and detail) and the exit code. ``runner``
    (pending jobs, progress) -> interrupted, if given, runs the pending jobs instead of this process's threads."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    check_folders(in_dir, out_dir)
    jobs = find_jobs(in_dir, out_dir, options.encoding.codec)
    if runner is None and workers > 1:  # the outputs written at once share this machine's cores for encoding
        options = options.shared_by(workers)
    pending = []
    for job in jobs:
        if job.dst.exists():
            old, new = recorded_settings(job.dst), wanted_settings(job, options)
            if old is None:
                job.status, job.detail = "skipped", "already done (settings not recorded: remove it to redo)"
                continue
            if old == new:
                job.status, job.detail = "skipped", "already done with these settings"
                continue
            job.redo = settings_change(old, new)
        if runner is None:  # (a cluster's tasks count on their node: opening 10,000 inputs here takes minutes)
            job.frames = _expected_frames(job, options)
        pending.append(job)
    progress = Progress(sum(j.frames for j in pending), len(pending), quiet=quiet)
    cancel = threading.Event()

    def run(key: int, job: Job) -> None:
        if cancel.is_set():
            job.status, job.detail = "interrupted", "not started"
            return

        def on_progress(done: int) -> None:
            if cancel.is_set():
                raise Cancelled()
            progress.update(key, done)

        progress.start(key, job.name, job.frames)
        process(job, client, options, on_progress)
        progress.finish(key, f"{job.status} {job.name}: {job.detail}")

    if runner is not None:  # somewhere else runs the pending inputs (eden_client/cluster.py: a Ray cluster)
        interrupted = runner(pending, progress)
        progress.close()
        return jobs, 130 if interrupted else (1 if any(j.status == "failed" for j in jobs) else 0)

    interrupted = False
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="eden-batch")
    futures = [pool.submit(run, k, job) for k, job in enumerate(pending)]
    try:
        for f in futures:
            f.result()
    except KeyboardInterrupt:
        interrupted = True
        cancel.set()
        pool.shutdown(wait=True, cancel_futures=True)
        for job in pending:
            if job.status == "pending":
                job.status, job.detail = "interrupted", "not started"
    pool.shutdown()
    progress.close()
    failed = any(j.status == "failed" for j in jobs)
    return jobs, 130 if interrupted else (1 if failed else 0)


def summary_table(jobs: list[Job]) -> str:
    """A plain-text table: status, input, output, detail; then the counts."""
    rows = [("status", "input", "output", "detail")] + [(j.status, j.name, str(j.dst), j.detail) for j in jobs]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
    counts = {s: sum(j.status == s for j in jobs) for s in ("done", "skipped", "failed", "interrupted")}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n or s != "interrupted") or "nothing to do")
    return "\n".join(lines)

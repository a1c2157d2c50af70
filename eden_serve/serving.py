"""What the two TorchServe handlers do, over the core: parse and check each request, batch same-size work, answer.

A TorchServe batch is a list of requests (one dict of name -> value each: multipart fields, query parameters, or
``body`` for a raw body). Every request gets its own answer, in order: a bad request gets a 4xx with a JSON message
and does not disturb the others; the worker keeps serving.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import logging
import re
import secrets
import socket
import threading
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from . import acceleration, checkpoint, framerefs, handoff, images, limits, pipeline, shm, tokens, ts_patches, wire

log = logging.getLogger(__name__)


class RequestError(Exception):
    """A request the handler refuses; ``status`` is its HTTP code, ``kind`` the answer's error "type" if not the
    default (BadInput under 500, Unavailable from 500)."""

    def __init__(self, message: str, status: int = 400, kind: str | None = None):
        super().__init__(message)
        self.status = status
        self.kind = kind


REASONS = {400: "Bad Request", 409: "Conflict", 410: "Gone", 413: "Payload Too Large", 500: "Internal Server Error",
           503: "Service Unavailable", 507: "Insufficient Storage"}
FRAME_FIELD = re.compile(r"frame([0-9]{1,4})")  # ASCII digits only ("frame²" is not a frame field)
REMOTE_HEADER = shm.REMOTE_HEADER


@dataclass(frozen=True)
class Settings:
    """Handler settings: the ``eden`` section of the archive's model-config.yaml."""
    max_pixels: int = 0  # per frame; 0: 4K where the GPU has the memory, else 2560x1440 (eden_serve/limits.py)
    min_side: int = 32  # one latent cell: anything smaller is not a video frame
    max_frames: int = 16  # frames per encoder request
    max_response_bytes: int = 256 * 1024 * 1024  # keep equal to config.properties' max_response_size
    token_dtype: str = "float16"  # default wire dtype; a request may ask for float32 or int8
    png_compress_level: int = 1
    torch_threads: int = 0  # CPU threads per worker (0: torch's default)
    compute_dtype: str = "auto"  # DiT+decoder matrix precision: auto (bfloat16 on GPU, float32 on CPU), float32, ...
    shm_dir: str = shm.DEFAULT_DIR  # same-host transport (eden_serve/shm.py); "" turns it off
    shm_ttl_s: float = 600.0  # segments older than this are swept
    shm_quota_bytes: int = 4 << 30  # what the shm folder may hold before answers through it are refused (507)
    shm_group: str = ""  # a group that shares the shm folder with this user (folder 0770); "": this user only
    fast_socket_reads: bool = True  # eden_serve/ts_patches.py: read request bodies without repeated copies
    frame_cache: int = 16  # DiT+decoder: frames of shared-memory segments kept on the device (each uploaded once)
    http_frame_cache_bytes: int = 1 << 30  # DiT+decoder: frames received over HTTP kept for pairs that name them
    device_handoff: bool = True  # encoder on a GPU: keep tokens there for shm requests that ask (eden_serve/handoff.py)
    handoff_max_bytes: int = 8 << 30  # encoder: GPU memory held for handed-off tokens; past it, tokens go to host
    # DiT+decoder GPU kernels (eden_serve/acceleration.py; nothing changes on a CPU), all off by default
    compile_mode: str = "off"  # off | default | max-autotune-no-cudagraphs: torch.compile of the blocks
    attention_backend: str = "auto"  # auto | cudnn | flash | efficient | math: SDPA backend tried first
    cuda_graphs: bool = False  # the Euler steps and the decoder replayed as CUDA graphs per (size, batch)
    fused_ops: bool = False  # with compile: the temporal attention without its concatenation
    cast_weights: bool = False  # matrix weights stored in the compute dtype (same numbers as autocast's casts)
    float8: bool = False  # experimental: the blocks' linear layers in float8 (changes the numbers: measure quality)
    warmup_sizes: tuple = ()  # "HxW" sizes compiled and captured at worker start, e.g. [480x854, 1080x1920]
    warmup_batches: tuple = ()  # batch sizes warmed per size (default: 1 and the model's batchSize)
    compile_cache_dir: str = ""  # persistent torch.compile cache, so a restarted worker starts quickly
    max_graphs: int = 8  # CUDA graph pairs kept (least recently used dropped)

    @classmethod
    def from_context(cls, context) -> "Settings":
        section = (getattr(context, "model_yaml_config", None) or {}).get("eden", {}) or {}
        known = {f.name for f in fields(cls)}
        unknown = set(section) - known
        if unknown:
            raise ValueError(f"unknown settings in model-config.yaml 'eden' section: {sorted(unknown)}")
        return cls(**section)


# ---------------------------------------------------------------------- request values
def _as_bytes(value: Any) -> bytes | bytearray | None:
    """A frame or body: binary only. TorchServe decodes text/* and application/json values to str or objects unless
    told not to (BatchService.initialize tells it); those are refused, so a reference can never arrive as text."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return value
    what = "text" if isinstance(value, str) else f"a {type(value).__name__}"
    raise RequestError(f"expected binary data, got {what} (send it with a binary content type, e.g. "
                       "application/octet-stream)")


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        value = value.encode()
    value = _as_bytes(value)
    if value is None:
        return None
    try:
        return bytes(value).decode().strip()
    except UnicodeDecodeError:
        raise RequestError("parameter is not UTF-8 text") from None


def parse_seed(value: Any) -> int | None:
    text = _text(value)
    if text is None or text == "":
        return None
    try:
        seed = int(text)
    except ValueError:
        raise RequestError(f"seed must be an integer, got {text[:40]!r}") from None
    if not 0 <= seed <= pipeline.MAX_SEED:
        raise RequestError(f"seed must be between 0 and {pipeline.MAX_SEED}")
    return seed


def parse_token_dtype(value: Any, default: str) -> str:
    text = _text(value) or default
    if text not in wire.DTYPES:
        raise RequestError(f"dtype must be one of {sorted(wire.DTYPES)}, got {text[:40]!r}")
    return text


def request_header(context, idx: int, name: str) -> str | None:
    """A request header, whatever the case the client sent its name in (TorchServe keeps it as sent)."""
    name = name.lower()
    for key, value in (context.get_all_request_header(idx) or {}).items():
        if isinstance(key, str) and key.lower() == name and isinstance(value, str):
            return value
    return None


def check_binary(context, idx: int, name: str) -> None:
    """Refuse a frame or body sent with a text or JSON content type (TorchServe keeps each part's content type in
    the request's headers, as {name: {"content-type": ...}}): frames and token blobs are binary."""
    entry = (context.get_all_request_header(idx) or {}).get(name) if context is not None else None
    ctype = entry.get("content-type") if isinstance(entry, dict) else None
    ctype = (ctype.decode(errors="replace") if isinstance(ctype, bytes) else str(ctype or "")).split(";")[0]
    ctype = ctype.strip().lower()
    if ctype.startswith("text/") or ctype == "application/json" or ctype.endswith("+json"):
        raise RequestError(f"{name} was sent as {ctype[:60]}: frames and token blobs are binary (send them as "
                           "application/octet-stream, image/png, application/x-eden-tokens, ...)")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"compute_dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    return getattr(torch, name)


def select_device(context) -> torch.device:
    gpu_id = context.system_properties.get("gpu_id")
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device("cuda", int(gpu_id))
    return torch.device("cpu")


# ---------------------------------------------------------------------- handler metrics
# Sent once per batch through TorchServe's metrics cache (``context.metrics``); on the metrics port
# (metrics_mode=prometheus) with labels ModelName, Level="Model" and Hostname. Declared in deploy/metrics.yaml
# (the containers' metrics_config); config.properties auto-detects them instead (model_metrics_auto_detect).
METRIC_STAGE_SECONDS = {  # stage timed in BatchService.run -> histogram of its seconds per batch
    "encode": "eden_encode_seconds",  # encoder: normalisation + patch embeddings of the batch's frames
    "serialize": "eden_serialize_seconds",  # encoder: token blobs written
    "denoise": "eden_denoise_seconds",  # DiT+decoder: the Euler steps
    "decode": "eden_decode_seconds",  # DiT+decoder: the decoder to pixels
    "png": "eden_png_seconds",  # DiT+decoder: PNG encoding of the answers
}
METRIC_BATCH_SIZE = "eden_batch_size"  # gauge: requests in the last batch
METRIC_BATCHES = "eden_batches_total"  # counter: batches handled (mean batch = requests / batches)
METRIC_BATCHED_REQUESTS = "eden_batched_requests_total"  # counter: requests handled in those batches
METRIC_REQUEST_BYTES = "eden_request_bytes_total"  # counter: body bytes received (frames or tokens)
METRIC_RESPONSE_BYTES = "eden_response_bytes_total"  # counter: body bytes answered (tokens, PNG or errors)
METRIC_TOKEN_BYTES_OUT = "eden_token_bytes_out_total"  # counter, encoder: token blob bytes sent out
METRIC_TOKEN_BYTES_IN = "eden_token_bytes_in_total"  # counter, DiT+decoder: token blob bytes taken in


def unexpected(e: BaseException, during: str) -> RequestError:
    """An exception no check expected, as one request's answer: bad input if it is the kind that parsing hostile
    values raises (400), a server fault otherwise (500, logged with its traceback)."""
    text = str(e)[:200] or type(e).__name__
    if isinstance(e, (ValueError, OverflowError, RecursionError, TypeError, KeyError, IndexError, UnicodeError)):
        return RequestError(f"bad request ({type(e).__name__} while {during}): {text}")
    log.error("unexpected %s while %s", type(e).__name__, during, exc_info=e)
    return RequestError(f"server error while {during} ({type(e).__name__}: {text}); see the server's log", 500,
                        "InternalError")


# ---------------------------------------------------------------------- the handlers
class BatchService:
    """Common frame of both handlers: initialize, then per batch parse -> group -> run -> answer."""

    def __init__(self):
        self.initialized = False
        self.limit_note = ""  # why max_pixels is what it is (set in initialize)

    def initialize(self, context):
        self.settings = Settings.from_context(context)
        # values reach the handler as the bytes that were sent: no JSON or text decoding by TorchServe (whose cost
        # a request would choose, and whose str could carry a shared-memory reference past a proxy's check)
        os.environ["TS_DECODE_INPUT_REQUEST"] = "false"
        if self.settings.fast_socket_reads:
            ts_patches.apply()
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        self.device = select_device(context)
        pixels, self.limit_note = limits.resolve_max_pixels(
            self.settings.max_pixels, self.device, int(context.system_properties.get("batch_size") or 1))
        self.settings = dataclasses.replace(self.settings, max_pixels=pixels)
        self.model_dir = context.system_properties["model_dir"]
        self.batch_size = int(context.system_properties.get("batch_size") or 1)
        self.cfg = checkpoint.load_config(self.model_dir)
        self.store = self.open_store()
        self._last_sweep = 0.0
        self.compute_dtype = resolve_dtype(self.settings.compute_dtype, self.device)
        self.load()
        self.initialized = True
        log.info("%s ready on %s (%s)", type(self).__name__, self.device, self.cfg)

    def load(self):
        raise NotImplementedError

    def open_store(self) -> shm.ShmStore | None:
        """The shared-memory store, its folder created (0700, or 0770 with shm_group) or checked; a folder that is
        not private is logged and refused (requests that need it are answered 500 ShmFolderUnsafe) until fixed."""
        s = self.settings
        if not s.shm_dir:
            return None
        store = shm.ShmStore(s.shm_dir, s.shm_ttl_s, quota_bytes=s.shm_quota_bytes, group=s.shm_group or None)
        try:
            store.ensure_dir()
        except shm.ShmUnsafe as e:
            log.error("shared-memory transport refused: %s", e)
        except OSError as e:
            log.error("shared-memory folder %s cannot be created: %s", s.shm_dir, e)
        return store

    def shm_store(self, context, idx: int) -> shm.ShmStore:
        """The store for request idx, after checking it may use it (a local request, the folder still private)."""
        if self.store is None:
            raise RequestError("the shared-memory transport is off on this server (shm_dir is empty): send the "
                               "bytes in the request")
        if request_header(context, idx, REMOTE_HEADER) is not None:
            raise RequestError("shared-memory references and replies are for clients on the server's own host: "
                               "send the bytes themselves")
        try:
            self.store.ensure_dir()
        except shm.ShmUnsafe as e:
            raise RequestError(str(e), 500, shm.UNSAFE_FOLDER) from None
        except OSError as e:
            raise RequestError(f"the shared-memory folder cannot be created: {shm._reason(e)}", 500,
                               shm.UNSAFE_FOLDER) from None
        return self.store

    def parse(self, request: dict, context, idx: int) -> tuple[Any, Any]:
        """-> (group key, parsed item); raise RequestError for a bad request."""
        raise NotImplementedError

    def run(self, items: list) -> list:
        """Items of one group -> one answer each: (body bytes, content type, headers)."""
        raise NotImplementedError

    def value(self, raw: Any, name: str, context=None, idx: int = 0):
        """A request value as bytes, following a shared-memory reference ``{"segment": NAME}`` if it is one."""
        data = _as_bytes(raw)
        if data is None or not shm.is_ref(data):
            return data
        ref = self.ref(data, context, idx)
        return self.store.read(self.segment_of(ref, name))

    @staticmethod
    def segment_of(ref: dict, name: str) -> str:
        """The segment a whole-value reference names."""
        if set(ref) != {"segment"}:
            raise RequestError(f"{name}: a reference here must be {{'segment': NAME}}")
        return ref["segment"]

    def ref(self, data, context=None, idx: int = 0) -> dict:
        if context is None:
            if self.store is None:
                raise RequestError("the shared-memory transport is off on this server (shm_dir is empty): send "
                                   "the bytes in the request")
        else:
            self.shm_store(context, idx)
        return shm.parse_ref(data)

    def wants_shm(self, context, idx: int) -> bool:
        """Whether request idx asked for its answer through shared memory (X-Eden-Reply: shm) and may have it."""
        if self.store is None or (request_header(context, idx, "X-Eden-Reply") or "").lower() != "shm":
            return False
        self.shm_store(context, idx)
        return True

    def reply(self, context, idx: int, body, content_type: str, headers: dict):
        """Answer one request, in the body or, if it asked (X-Eden-Reply: shm), through a shared-memory segment
        (``body`` may be one already: a ``shm.Segment``)."""
        if isinstance(body, shm.Segment):
            headers = {**headers, "X-Eden-Content-Type": content_type}
            body, content_type = shm.make_ref(segment=body.name, bytes=body.nbytes), shm.REF_CONTENT_TYPE
        elif self.wants_shm(context, idx):
            name = self.store.write(body)
            nbytes = sum(memoryview(b).nbytes for b in body) if isinstance(body, list) else len(body)
            headers = {**headers, "X-Eden-Content-Type": content_type}
            body, content_type = shm.make_ref(segment=name, bytes=nbytes), shm.REF_CONTENT_TYPE
        elif isinstance(body, list):
            body = b"".join(body)
        context.set_response_content_type(idx, content_type)
        for name, value in headers.items():
            context.set_response_header(idx, name, value)
        return body

    def sweep(self) -> None:
        now = time.monotonic()
        if self.store is not None and now - self._last_sweep > min(10.0, self.store.ttl_s):
            self._last_sweep = now
            try:
                removed = self.store.sweep()
            except Exception:  # noqa: BLE001 - housekeeping never costs a batch its answers
                log.warning("sweeping %s failed", self.store.root, exc_info=True)
                return
            if removed:
                log.info("swept %d expired shared-memory segments", removed)

    @contextlib.contextmanager
    def stage(self, name: str):
        """Time a stage of ``run`` (synchronising the GPU at its end): the times go to ``record_metrics``."""
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._stages[name] = self._stages.get(name, 0.0) + time.perf_counter() - start

    @contextlib.contextmanager
    def timed(self, name: str):
        """Time part of a stage (no synchronisation of its own: what it times waits for its own copies); reported
        in X-Eden-Stages like the stages. "transfer": moving the tokens (out of the encoder, into the DiT+decoder)."""
        start = time.perf_counter()
        yield
        self._stages[name] = self._stages.get(name, 0.0) + time.perf_counter() - start

    def record_metrics(self, context, stages: dict[str, float], batch_size: int, bytes_in: int,
                       bytes_out: int) -> None:
        """Called once per batch with the stage times (seconds), the batch size and body bytes in and out.

        Sends the METRIC_* metrics above to TorchServe; a metrics failure is logged and never fails the batch."""
        metrics = getattr(context, "metrics", None)
        if metrics is None:  # not under TorchServe (unit tests)
            return
        try:
            from ts.metrics.metric_type_enum import MetricTypes

            def send(name, value, unit, kind):  # fresh dimension list each time: TorchServe appends to it
                metrics.add_metric(name, value, unit=unit, dimensions=[], metric_type=kind)

            for stage, seconds in stages.items():
                if stage in METRIC_STAGE_SECONDS:
                    send(METRIC_STAGE_SECONDS[stage], round(seconds, 6), "s", MetricTypes.HISTOGRAM)
            send(METRIC_BATCH_SIZE, batch_size, "count", MetricTypes.GAUGE)
            send(METRIC_BATCHES, 1, "count", MetricTypes.COUNTER)
            send(METRIC_BATCHED_REQUESTS, batch_size, "count", MetricTypes.COUNTER)
            send(METRIC_REQUEST_BYTES, bytes_in, "B", MetricTypes.COUNTER)
            send(METRIC_RESPONSE_BYTES, bytes_out, "B", MetricTypes.COUNTER)
            if isinstance(self, EncoderService):
                send(METRIC_TOKEN_BYTES_OUT, bytes_out, "B", MetricTypes.COUNTER)
            elif isinstance(self, DitDecService):
                send(METRIC_TOKEN_BYTES_IN, bytes_in, "B", MetricTypes.COUNTER)
        except Exception:  # noqa: BLE001 - metrics must never cost an answer
            log.warning("could not record handler metrics", exc_info=True)

    def handle(self, data: list[dict], context) -> list:
        self._stages: dict[str, float] = {}
        self.sweep()
        answers: list = [None] * len(data)
        groups: dict = defaultdict(list)
        with self.stage("parse"):  # reading, checking and uploading the inputs
            for idx, request in enumerate(data):
                try:
                    if (probe := self.probe_of(request)) is not None:
                        answers[idx] = self.answer_probe(probe, context, idx)
                        continue
                    key, item = self.parse(request, context, idx)
                    groups[key].append((idx, item))
                except RequestError as e:
                    answers[idx] = self._error(context, idx, e)
                except shm.ShmFull as e:
                    answers[idx] = self._error(context, idx, RequestError(str(e), 507))
                except (wire.WireError, images.ImageError, shm.ShmError) as e:
                    answers[idx] = self._error(context, idx, RequestError(limits.explain(str(e), self.limit_note)))
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    answers[idx] = self._error(context, idx, RequestError(
                        "the GPU ran out of memory for this request's inputs: retry, or send smaller frames", 503))
                except Exception as e:  # noqa: BLE001 - whatever one request makes fail, it fails alone
                    answers[idx] = self._error(context, idx, unexpected(e, "reading the request"))
        for items in groups.values():
            indices = [i for i, _ in items]
            results = self.run_isolated([item for _, item in items])
            stages = ",".join(f"{k}={1000 * v:.2f}" for k, v in self._stages.items())
            for idx, result in zip(indices, results):
                if isinstance(result, RequestError):
                    answers[idx] = self._error(context, idx, result)
                    continue
                body, content_type, headers = result
                headers = {**headers, "X-Eden-Device": str(self.device), "X-Eden-Stages": stages,
                           "X-Eden-Batch": str(len(items))}
                try:
                    answers[idx] = self.reply(context, idx, body, content_type, headers)
                except shm.ShmFull as e:
                    answers[idx] = self._error(context, idx, RequestError(str(e), 507))
                except OSError as e:
                    answers[idx] = self._error(context, idx, RequestError(f"cannot write the reply to shared "
                                                                          f"memory: {shm._reason(e)}", 507))
                except RequestError as e:
                    answers[idx] = self._error(context, idx, e)
                except Exception as e:  # noqa: BLE001
                    answers[idx] = self._error(context, idx, unexpected(e, "answering"))
        bytes_in = sum(len(v) for r in data for v in r.values() if isinstance(v, (bytes, bytearray)))
        bytes_out = sum(len(a) for a in answers if isinstance(a, (bytes, bytearray)))
        self.record_metrics(context, self._stages, len(data), bytes_in, bytes_out)
        return answers

    # ------------------------------------------------------------------ transport probes (eden_serve/shm.py)
    def probe_of(self, request: dict) -> dict | None:
        """The reference of a probe request (a body ``EDENREF1{"probe": ...}``), else None."""
        body = request.get("body") if request.get("body") is not None else request.get("data")
        if not isinstance(body, (bytes, bytearray)) or not shm.is_ref(body) or len(body) > shm.MAX_REF_BYTES:
            return None
        try:
            ref = shm.parse_ref(body)
        except shm.ShmError:
            return None
        return ref if set(ref) == {"probe"} else None

    def can_hand_off(self) -> bool:
        """Whether this worker takes part in the device handoff (encoder: exports tokens; DiT+decoder: imports)."""
        return False

    def answer_probe(self, ref: dict, context, idx: int) -> bytes:
        """``{"probe": null}``: where this worker keeps shared-memory segments, its host and device.
        ``{"probe": NAME}``: the hash of segment NAME's bytes, also written to a new segment named in the answer,
        so the client knows both directions work (it removes both)."""
        store = self.shm_store(context, idx)  # (refused for remote clients and folders that are not private)
        answer = {"shm_dir": str(store.root), "host": socket.gethostname(), "device": str(self.device),
                  "handoff": self.can_hand_off()}
        name = ref["probe"]
        if name is not None:
            data = store.read(name)
            if len(data) > 4096:
                raise RequestError("a probe segment holds at most 4096 bytes")
            answer["probe"] = shm.probe_answer(data)
            try:
                answer["reply"] = store.write(answer["probe"].encode())
            except OSError as e:
                raise RequestError(f"cannot write to shared memory: {e.strerror}", 507) from None
        context.set_response_content_type(idx, "application/json")
        return json.dumps(answer).encode()
    def run_isolated(self, items: list) -> list:
        """``run`` on a group; if it fails in a way no request was refused for (a RequestError), each request runs
        again alone, so that one request that breaks the run fails alone."""
        try:
            return self.run(items)
        except RequestError as e:
            return [e] * len(items)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return [RequestError("the GPU ran out of memory for this batch: retry, or send smaller frames",
                                 503)] * len(items)
        except Exception as e:  # noqa: BLE001
            if len(items) == 1:
                return [unexpected(e, "computing the answer")]
            log.warning("a batch of %d failed (%s: %s): running its requests one by one", len(items),
                        type(e).__name__, e)
            return [r for item in items for r in self.run_isolated([item])]

    def _error(self, context, idx: int, error: RequestError) -> bytes:
        context.set_response_status(error.status, REASONS.get(error.status, "Error"), idx)
        context.set_response_content_type(idx, "application/json")
        log.info("request %d refused (%d): %s", idx, error.status, error)
        kind = error.kind or ("BadInput" if error.status < 500 else "Unavailable")
        return json.dumps({"code": error.status, "type": kind, "message": str(error)}).encode()


class EncoderService(BatchService):
    """Frames (multipart fields frame0, frame1, ... as PNG/JPEG/raw, or shared-memory references to them) -> a token
    blob (application/x-eden-tokens) of all of them.

    Form field ``dtype`` (or header X-Eden-Token-Dtype): float16 (default), float32 or int8 tokens (8-bit with a
    scale per token, wire format version 2).
    """

    def load(self):
        self.encoder = checkpoint.load_encoder(self.model_dir, self.device)
        # handed-off tokens, by segment name: (tensor, bytes, time, open descriptor of the segment for its lock);
        # kept until the segment is released
        self.held: dict[str, tuple[torch.Tensor, int, float, int]] = {}
        self.held_lock = threading.Lock()
        self.handoff = (self.settings.device_handoff and self.store is not None
                        and handoff.available(self.device))
        if self.handoff:
            threading.Thread(target=self._reaper, name="eden-handoff-reaper", daemon=True).start()

    def parse(self, request, context, idx):
        s = self.settings
        odd = [k for k in request if isinstance(k, str) and k.startswith("frame") and not FRAME_FIELD.fullmatch(k)]
        if odd:
            raise RequestError(f"field {odd[0][:40]!r} is not a frame field: frame0, frame1, ... (ASCII digits)")
        names = sorted((k for k in request if isinstance(k, str) and FRAME_FIELD.fullmatch(k)),
                       key=lambda k: int(k[5:]))
        if not names:
            raise RequestError("no frames: send the images as multipart/form-data fields frame0, frame1, ...")
        if names != [f"frame{i}" for i in range(len(names))]:
            raise RequestError(f"frame fields must be numbered frame0..frame{len(names) - 1} without gaps, got {names}")
        if len(names) > s.max_frames:
            raise RequestError(f"{len(names)} frames in one request: at most {s.max_frames}", 413)
        dtype = parse_token_dtype(request.get("dtype") or request_header(context, idx, "X-Eden-Token-Dtype"),
                                  s.token_dtype)
        for n in names:
            check_binary(context, idx, n)
        frames = [images.decode_image(self.value(request[n], n, context, idx), s.max_pixels, s.min_side, n)
                  for n in names]
        h, w = frames[0].shape[:2]
        for name, f in zip(names[1:], frames[1:]):
            if f.shape[:2] != (h, w):
                raise RequestError(f"{name} is {f.shape[1]}x{f.shape[0]} but frame0 is {w}x{h}: "
                                   "all frames of a request must have one size")
        size = wire.expected_nbytes(len(frames), h, w, self.cfg.hidden_dim, dtype, self.cfg.pad_multiple,
                                    self.cfg.patch_size) + wire.MAX_HEADER_BYTES
        to_shm = self.wants_shm(context, idx)
        if size > s.max_response_bytes and not to_shm:  # a shared-memory reply is a reference, not the bytes
            raise RequestError(f"the tokens of {len(frames)} frames of {w}x{h} would be {size} bytes, over the "
                               f"response limit of {s.max_response_bytes}: send fewer frames per request", 413)
        on_device = to_shm and self.handoff and (request_header(context, idx, "X-Eden-Handoff") or "") == "device"
        return (h, w, dtype), (np.stack(frames), dtype, "device" if on_device else "shm" if to_shm else "")

    def run(self, items):
        with self.stage("encode"):
            frames = np.concatenate([f for f, _, _ in items])  # [K, H, W, C] uint8
            x = torch.from_numpy(frames).to(self.device).permute(0, 3, 1, 2).float().div_(255)  # [K, C, H, W]
            encoded, differences = pipeline.encode_frames(self.encoder, x, [len(f) for f, _, _ in items])
        with self.stage("serialize"):
            geo = pipeline.Geometry.for_size(x.shape[-2], x.shape[-1], self.cfg)
            dtype = items[0][1]
            gpu = tokens.wire_tensor(encoded, dtype)  # [K, 2, N, D] (int8: [K, 2, N, D + 4])
            finite = tokens.finite(gpu)
            metas = tokens.blob_metas(encoded, differences, geo, dtype, self.cfg.encoder_fingerprint)
            bodies, start = [], 0
            try:
                with self.timed("transfer"):
                    for meta, (_, _, reply) in zip(metas, items):
                        part = gpu[start:start + meta.num_frames]
                        start += meta.num_frames
                        if reply == "device" and (segment := self.hand_off(  # held: its own memory, not the batch's
                                meta, part if len(items) == 1 else part.clone())):
                            bodies.append(segment)
                        elif reply:
                            bodies.append(self.write_tokens(meta, part))
                        else:
                            bodies.append([meta.header_bytes(), memoryview(part.cpu().numpy()).cast("B")])
                tokens.check_finite(gpu, bool(finite))  # (a synchronisation: the handed-off tokens are final)
            except BaseException as e:  # nothing written for this batch outlives it
                for body in bodies:
                    if isinstance(body, shm.Segment):
                        self.store.unlink(body.name)
                        self.drop(body.name)
                if isinstance(e, shm.ShmFull):
                    raise RequestError(str(e), 507) from None
                if isinstance(e, OSError):  # e.g. the shared-memory folder is full: worth a retry later
                    raise RequestError(f"cannot write the tokens to shared memory: {shm._reason(e)}", 507) from None
                if isinstance(e, OverflowError):
                    raise RequestError(str(e)) from None
                raise
            return [(body, wire.CONTENT_TYPE, {}) for body in bodies]

    def can_hand_off(self) -> bool:
        return self.handoff

    def hand_off(self, meta: wire.TokenBlob, part: torch.Tensor) -> shm.Segment | None:
        """Keep ``part`` on the GPU and write a device segment naming it; None if it must go to the host instead
        (the held memory is at its limit, or this GPU memory cannot be exported)."""
        nbytes = part.numel() * part.element_size()
        if self.held_bytes() + nbytes > self.settings.handoff_max_bytes:
            self.reap()
            if self.held_bytes() + nbytes > self.settings.handoff_max_bytes:
                log.info("handed-off tokens at the %d-byte limit: these go through host memory",
                         self.settings.handoff_max_bytes)
                return None
        try:
            desc = handoff.export(part)
        except handoff.HandoffError as e:
            log.warning("device handoff off for this worker, tokens go through host memory: %s", e)
            self.handoff = False
            return None
        body = shm.device_segment(meta, desc)
        name, fd = self.store.write_held(body)
        with self.held_lock:
            self.held[name] = (part, nbytes, time.monotonic(), fd)
        return shm.Segment(name, len(body))

    def held_bytes(self) -> int:
        with self.held_lock:
            return sum(entry[1] for entry in self.held.values())

    def drop(self, name: str) -> None:
        """Free a handed-off segment's tokens now (no reader can be using them)."""
        with self.held_lock:
            entry = self.held.pop(name, None)
        if entry is not None:
            os.close(entry[3])

    def reap(self) -> int:
        """Free the handed-off tokens whose segment was released (unlinked) or is older than the TTL (then removed);
        returns how many. Each is freed under the segment's exclusive lock after emptying the file, so a reader
        holding a lease (``ShmStore.lease``) finishes first, and a later one finds the file empty: nobody reads
        memory the allocator has given to something else."""
        cutoff = time.monotonic() - self.store.ttl_s
        with self.held_lock:
            entries = list(self.held.items())
        freed = 0
        for name, (_, _, created, fd) in entries:
            if created < cutoff:
                self.store.unlink(name)
            elif (self.store.root / name).exists():
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a DiT+decoder is copying from it: next round
            os.ftruncate(fd, 0)
            self.drop(name)
            freed += 1
        return freed

    def _reaper(self, period_s: float = 0.5) -> None:
        while True:
            time.sleep(period_s)
            try:
                self.reap()
            except Exception:  # noqa: BLE001 - keep reaping
                log.warning("handoff reaper failed", exc_info=True)

    def write_tokens(self, meta: wire.TokenBlob, part: torch.Tensor) -> shm.Segment:
        """A blob straight into a new shared-memory segment: the device copies the tokens into it (no host
        buffer in between)."""
        head = meta.header_bytes()
        nbytes = len(head) + part.numel() * part.element_size()
        with self.store.allocate(nbytes) as (name, view):
            view[:len(head)] = head
            dst = np.frombuffer(view, dtype=wire.DTYPES[meta.dtype], offset=len(head)).reshape(meta.tokens.shape)
            torch.from_numpy(dst).copy_(part)
            del dst
        return shm.Segment(name, nbytes)


class DitDecService(BatchService):
    """A pair's token blob -> the middle frame.

    Body: the blob, or a shared-memory reference to one (``{"segment": NAME}``) or to two frames of blobs
    (``{"pair": [...], "difference": d}``, see eden_serve/shm.py). Headers: X-Eden-Seed (the noise seed; without it a
    fresh one is drawn, and the answer's X-Eden-Seed says which), X-Eden-Format: png (default) or raw.
    """

    def load(self):
        self.generator = checkpoint.load_generator(self.model_dir, self.device)
        self.frames: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()  # (segment, frame) -> [2, N, D]
        # frames received in pair bodies (eden_serve/framerefs.py), by hash: (one-frame blob whose tokens are only a
        # shape, tokens on the device [2, N, D]); least recently used first, at most http_frame_cache_bytes
        self.http_frames: OrderedDict[str, tuple[wire.TokenBlob, torch.Tensor]] = OrderedDict()
        self.http_frames_bytes = 0
        self.accel = self.accelerate()

    def accelerate(self) -> acceleration.Accelerator:
        """The GPU kernels of the settings, compiled and warmed for the configured sizes now, before any request;
        if that fails, the worker serves without them (and says why in its log)."""
        kernels = acceleration.KernelSettings.from_mapping(self.settings)  # (a bad value stops the worker)
        try:
            accel = acceleration.Accelerator(self.generator, kernels, self.device, self.compute_dtype)
            if not accel.active:
                return accel
            self.warmup = accel.warm_up(kernels.warmup_sizes, kernels.warmup_batches or sorted({1, self.batch_size}))
            log.info("kernels warmed in %.1f s: %s", self.warmup.total_s, self.warmup.seconds)
            return accel
        except Exception:  # noqa: BLE001 - a worker without the fast kernels beats no worker
            log.exception("warming the GPU kernels failed: serving without them")
            self.generator = checkpoint.load_generator(self.model_dir, self.device)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return acceleration.Accelerator(self.generator, acceleration.KernelSettings(), self.device,
                                            self.compute_dtype)

    def can_hand_off(self) -> bool:
        return self.device.type == "cuda" and self.store is not None

    def frame_tensor(self, segment: str, k: int, blob: wire.TokenBlob, cuda: dict | None,
                     source: tuple | None = None) -> torch.Tensor:
        """Frame k of a segment's blob on the device, from the cache when a previous pair brought it (a segment's
        bytes never change: it is written once under a fresh name). A device segment comes over whole on first use
        (one mapping of the encoder's memory for all its frames: mapping costs more than copying)."""
        key = (segment, k)
        if key in self.frames:
            self.frames.move_to_end(key)
            return self.frames[key]
        with self.timed("transfer"):
            if cuda:
                first = 0 if self.settings.frame_cache >= blob.num_frames else k
                count = min(blob.num_frames - first, max(self.settings.frame_cache, 1))
                frames = self.device_frames(blob, cuda, first, count)
                # each its own copy (device to device, fast), so the cache holds what it counts and no more
                got = {first + i: f.clone() if count > 1 else f for i, f in enumerate(frames)}
            elif source is not None:  # (open segment, payload offset): frame k alone, copied from the file
                got = {k: tokens.array_tensor(shm.read_frame(source[0], blob, source[1], k), self.device)}
            else:
                got = {k: tokens.array_tensor(blob.tokens[k], self.device)}
        if self.settings.frame_cache > 0:
            for i in sorted(got, key=lambda i: i == k):  # frame k last: the most recently used
                self.frames[(segment, i)] = got[i]
            while len(self.frames) > self.settings.frame_cache:
                self.frames.popitem(last=False)
        return got[k]

    def parse(self, request, context, idx):
        key = "body" if request.get("body") is not None else "data"
        check_binary(context, idx, key)
        body = _as_bytes(request.get(key))
        if not body:
            raise RequestError("empty body: send the encoder's token blob as the request body")
        seed = parse_seed(request_header(context, idx, "X-Eden-Seed"))
        fmt = (request_header(context, idx, "X-Eden-Format") or "png").lower()
        if fmt not in ("png", "raw"):
            raise RequestError(f"X-Eden-Format must be png or raw, got {fmt[:20]!r}")
        blob, geo, t = self.pair_tokens(body, context, idx)
        return (geo, blob.dtype), (blob, t, seed, fmt)

    def device_frames(self, blob: wire.TokenBlob, cuda: dict, first: int, count: int) -> torch.Tensor:
        """Frames first..first+count-1 of a device segment's blob, copied from the encoder's GPU [count, 2, N, D]."""
        if self.device.type != "cuda":
            raise RequestError("these tokens were handed off on a GPU, which this CPU worker cannot read: ask the "
                               "encoder for host tokens (client --handoff host)", kind=shm.HANDOFF_UNAVAILABLE)
        if cuda.get("nbytes") != blob.tokens.nbytes:
            raise RequestError(f"device segment: the descriptor hands off {cuda.get('nbytes')} bytes but the blob's "
                               f"tokens are {blob.tokens.nbytes}")
        frame_bytes = blob.tokens[0].nbytes
        try:
            t = handoff.import_copy(cuda, first * frame_bytes, (count, *blob.tokens.shape[1:]),
                                    getattr(torch, blob.dtype), self.device)
        except handoff.TokensGone as e:
            raise RequestError(f"{e}: encode the frames again", 410) from None
        except handoff.HandoffError as e:
            raise RequestError(f"cannot use the handed-off tokens: {e}", kind=shm.HANDOFF_UNAVAILABLE) from None
        if not tokens.finite(t):
            raise RequestError("tokens contain NaN or infinite values (or int8 scales out of range)")
        return t

    def pair_tokens(self, body, context=None, idx: int = 0) -> tuple[wire.TokenBlob, pipeline.Geometry,
                                                                     torch.Tensor]:
        """The pair a body names (a blob, or a reference) -> its blob (checked against the model), geometry and
        tokens on the device [2, 2, N, D]."""
        if framerefs.is_pair_body(body):  # frames inline or named by hash (over HTTP, across hosts)
            return self.http_pair(body)
        ref = self.ref(body, context, idx) if shm.is_ref(body) else None
        if ref is None:  # the blob itself (device segments only come from this host's shared memory)
            blob = wire.from_bytes(body)
            geo = tokens.check_fits(blob, self.cfg, self.settings.max_pixels)
            with self.timed("transfer"):
                return blob, geo, tokens.tokens_tensor(blob, self.device)
        with contextlib.ExitStack() as leases:  # segments locked until their tokens are on this device
            try:
                return self.segment_pair(ref, leases)
            except shm.SegmentGone as e:
                raise RequestError(f"{e}: encode the frames again", 410) from None

    def handle(self, data: list[dict], context) -> list:
        """As BatchService.handle, after keeping the inline frames of every pair body of the batch: a pair sent at
        the same time as the one carrying a frame it names finds that frame whatever their order in the batch."""
        self._inline_frames = {}
        for request in data:
            body = request.get("body") if request.get("body") is not None else request.get("data")
            if isinstance(body, (bytes, bytearray)) and framerefs.is_pair_body(body):
                try:
                    self._inline_frames[id(body)] = self.inline_frames(body)
                except Exception:  # noqa: BLE001 - refused with its reason when its turn comes (parse)
                    pass
        try:
            return super().handle(data, context)
        finally:
            self._inline_frames = {}

    def inline_frames(self, body) -> tuple[list, float]:
        """Parse a pair body and keep its inline frames (checked) -> ([(hash, (meta, tokens) or None)], difference)."""
        frames, difference = framerefs.parse(body)
        got = []
        for f in frames:
            if f.blob is None:
                got.append((f.hash, None))
                continue
            meta = f.blob.frame(0)
            tokens.check_fits(wire.TokenBlob.pair(meta, meta, difference, copy=False), self.cfg,
                              self.settings.max_pixels)  # (the frame alone, as half of a pair)
            t = tokens.array_tensor(f.blob.tokens[0], self.device)  # (before the batch's stages are timed)
            meta.tokens = wire.shape_only(meta.tokens.shape, meta.dtype)  # (keeps no view of the body)
            self.http_frame(f.hash, meta, t)
            got.append((f.hash, (meta, t)))
        return got, difference

    def http_pair(self, body) -> tuple[wire.TokenBlob, pipeline.Geometry, torch.Tensor]:
        """A pair body (eden_serve/framerefs.py) -> the pair's blob, geometry and tokens on the device. Inline frames
        are checked and kept (``http_frame``; ``handle`` has kept those of the whole batch first); a frame named by
        hash that this worker does not hold answers 409 FrameNotCached."""
        pre = getattr(self, "_inline_frames", {}).pop(id(body), None)
        parsed, difference = pre if pre is not None else self.inline_frames(body)
        got = [entry if entry is not None else self.http_frame(h) for h, entry in parsed]
        missing = [h for (h, _), g in zip(parsed, got) if g is None]
        if missing:
            raise RequestError(f"frame(s) {', '.join(missing)} are not in this worker's frame cache: send the pair "
                               "again with both frames inline", 409, framerefs.FRAME_NOT_CACHED)
        (m0, t0), (m1, t1) = got
        blob = wire.TokenBlob.pair(m0, m1, difference, copy=False)
        geo = tokens.check_fits(blob, self.cfg, self.settings.max_pixels)
        return blob, geo, torch.stack([t0, t1])

    def http_frame(self, key: str, meta: wire.TokenBlob | None = None, t: torch.Tensor | None = None):
        """With ``meta`` and ``t``: keep a frame received over HTTP under its hash (least recently used frames
        dropped past http_frame_cache_bytes; a frame larger than that is not kept). Without: the frame kept under
        ``key`` as (meta, tokens), or None."""
        if meta is None:
            entry = self.http_frames.get(key)
            if entry is not None:
                self.http_frames.move_to_end(key)
            return entry
        nbytes = t.numel() * t.element_size()
        if key in self.http_frames:
            self.http_frames.move_to_end(key)
            return None
        if nbytes > self.settings.http_frame_cache_bytes:
            return None
        self.http_frames[key] = (meta, t)
        self.http_frames_bytes += nbytes
        while self.http_frames_bytes > self.settings.http_frame_cache_bytes:
            _, (_, old) = self.http_frames.popitem(last=False)
            self.http_frames_bytes -= old.numel() * old.element_size()
        return None

    def segment_pair(self, ref: dict, leases: contextlib.ExitStack):
        if "segment" in ref:
            blob, cuda = shm.read_blob(leases.enter_context(self.store.lease(self.segment_of(ref, "body"))).read())
            geo = tokens.check_fits(blob, self.cfg, self.settings.max_pixels)
            with self.timed("transfer"):
                t = self.device_frames(blob, cuda, 0, 2) if cuda else tokens.tokens_tensor(blob, self.device)
            return blob, geo, t
        frames, difference = shm.pair_frames(ref)
        files = [leases.enter_context(self.store.lease(seg)) for seg, _ in frames]
        read = [shm.read_blob_head(f) for f in files]  # headers only: frames are read when not in the cache
        for (seg, k), (blob, _, _) in zip(frames, read):
            if k >= blob.num_frames:
                raise RequestError(f"frame {k} of segment {seg} does not exist (it holds {blob.num_frames})")
        (seg0, k0), (seg1, k1) = frames
        if seg0 == seg1 and k1 == k0 + 1:  # consecutive frames of one blob
            blob = read[0][0].window(k0, difference)
        else:  # the tokens come from frame_tensor, the blob is only checked
            blob = wire.TokenBlob.pair(read[0][0].frame(k0), read[1][0].frame(k1), difference, copy=False)
        geo = tokens.check_fits(blob, self.cfg, self.settings.max_pixels)
        t = torch.stack([self.frame_tensor(seg, k, b, cuda, (f, start))
                         for (seg, k), (b, cuda, start), f in zip(frames, read, files)])
        return blob, geo, t

    def run(self, items):
        blobs, tensors, seeds, formats = zip(*items)
        geo = tokens.check_fits(blobs[0], self.cfg)
        pairs = tokens.pair_batch(list(blobs), list(tensors), geo)
        seeds = [s if s is not None else secrets.randbelow(pipeline.MAX_SEED) for s in seeds]
        noise = torch.cat([pipeline.make_noise(geo, self.cfg.latent_dim, s, self.device) for s in seeds])
        with self.stage("denoise"):
            latents = self.accel.sample_latents(pairs, noise)
        with self.stage("decode"):
            frames = pipeline.to_uint8(self.accel.decode_frames(pairs, latents))
        with self.stage("png"):
            out = []
            for f, seed, fmt in zip(frames.numpy(), seeds, formats):
                if fmt == "raw":
                    out.append((images.encode_raw(f), images.RAW_CONTENT_TYPE, {"X-Eden-Seed": str(seed)}))
                else:
                    out.append((images.encode_png(f, self.settings.png_compress_level), "image/png",
                                {"X-Eden-Seed": str(seed)}))
            return out

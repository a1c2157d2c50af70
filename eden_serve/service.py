"""The common frame of the two TorchServe services (eden_serve/encoder_service.py, eden_serve/ditdec_service.py):
settings, request parsing helpers, the handler metrics, and BatchService (parse and check each request, batch
same-size work, answer).

A TorchServe batch is a list of requests (one dict of name -> value each: multipart fields, query parameters, or
``body`` for a raw body). Every request gets its own answer, in order: a bad request gets a 4xx with a JSON message
and does not disturb the others; the worker keeps serving.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import logging
import re
import socket
import time
from collections import defaultdict
from dataclasses import dataclass, fields
from typing import Any

import torch

from . import checkpoint, gpu_wait, images, limits, protocol, shm, ts_patches, wire
from .worker_profile import WorkerProfile

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
REMOTE_HEADER = protocol.REMOTE


@dataclass(frozen=True)
class Settings:
    """Handler settings: the ``eden`` section of the archive's model-config.yaml."""
    max_pixels: int = 0  # per frame; 0: 4K where the GPU has the memory, else 2560x1440 (eden_serve/limits.py)
    workers_on_gpu: int = 1  # workers of both models sharing this worker's GPU (build_archives.py writes it)
    min_side: int = 32  # one latent cell: anything smaller is not a video frame
    max_frames: int = 16  # frames per encoder request
    max_response_bytes: int = protocol.MAX_BODY_BYTES  # TorchServe's max_response_size
    token_dtype: str = "float16"  # default wire dtype; a request may ask for float32 or int8
    png_compress_level: int = 1
    torch_threads: int = 0  # CPU threads per worker (0: torch's default)
    gpu_wait: str = "block"  # how a worker waits for its GPU: block (asleep), spin, yield, auto (eden_serve/gpu_wait.py)
    compute_dtype: str = "auto"  # DiT+decoder matrix precision: auto (bfloat16 on GPU, float32 on CPU), float32, ...
    shm_dir: str = shm.DEFAULT_DIR  # same-host transport (eden_serve/shm.py); "" turns it off
    shm_ttl_s: float = 600.0  # segments older than this are swept
    shm_quota_bytes: int = 4 << 30  # what the shm folder may hold before answers through it are refused (507)
    shm_group: str = ""  # a group that shares the shm folder with this user (folder 0770); "": this user only
    fast_socket_reads: bool = True  # eden_serve/ts_patches.py: read request bodies without repeated copies
    frame_cache: int = 16  # DiT+decoder: frames of shared-memory segments kept on the device (each uploaded once)
    http_frame_cache_bytes: int = 1 << 30  # DiT+decoder: frames received over HTTP kept for pairs that name them
    http_frame_share: bool = True  # ... and also kept under their hash in "<shm_dir>-frames" for this host's other workers
    device_handoff: bool = True  # encoder on a GPU: keep tokens there for shm requests that ask (eden_serve/handoff.py)
    handoff_max_bytes: int = 8 << 30  # encoder: GPU memory held for handed-off tokens; past it, tokens go to host
    # DiT+decoder GPU kernels (eden_serve/acceleration.py; nothing changes on a CPU): off here, turned on by the
    # archives of a GPU deployment (build_archives.py --kernels auto)
    compile_mode: str = "off"  # off | default | max-autotune-no-cudagraphs: torch.compile of the blocks
    attention_backend: str = "auto"  # auto | cudnn | flash | efficient | math: SDPA backend tried first
    cuda_graphs: bool = False  # the Euler steps and the decoder replayed as CUDA graphs per (size, batch)
    fused_ops: bool = False  # with compile: the temporal attention without its concatenation
    cast_weights: bool = False  # matrix weights stored in the compute dtype (same numbers as autocast's casts)
    float8: bool = False  # experimental: the blocks' linear layers in float8 (changes the numbers: measure quality)
    warmup_sizes: tuple = ()  # "HxW" sizes compiled and captured at worker start, e.g. [480x854, 1080x1920]
    warmup_batches: tuple = ()  # batch sizes warmed per size (default: 1 .. the model's batchSize)
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
    try:
        return protocol.parse_seed(_text(value))
    except ValueError as e:
        raise RequestError(str(e)) from None


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
METRIC_FRAME_REF_HITS = "eden_frame_ref_hits_total"  # counter, DiT+decoder: frames named by hash it held (or its host)
METRIC_FRAME_REF_MISSES = "eden_frame_ref_misses_total"  # counter, DiT+decoder: ... that it did not (answered 409)


def unexpected(e: BaseException, during: str) -> RequestError:
    """An exception no check expected, as one request's answer: bad input if it is the kind that parsing hostile
    values raises (400), a server fault otherwise (500, logged with its traceback)."""
    text = str(e)[:200] or type(e).__name__
    if isinstance(e, (ValueError, OverflowError, RecursionError, TypeError, KeyError, IndexError, UnicodeError)):
        return RequestError(f"bad request ({type(e).__name__} while {during}): {text}")
    log.error("unexpected %s while %s", type(e).__name__, during, exc_info=e)
    return RequestError(f"server error while {during} ({type(e).__name__}: {text}); see the server's log", 500,
                        protocol.INTERNAL_ERROR)


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
        log.info(gpu_wait.set_gpu_wait(self.device, self.settings.gpu_wait))  # before the first CUDA call
        pixels, self.limit_note = limits.resolve_max_pixels(
            self.settings.max_pixels, self.device, int(context.system_properties.get("batch_size") or 1),
            workers_on_gpu=self.settings.workers_on_gpu)
        self.settings = dataclasses.replace(self.settings, max_pixels=pixels)
        self.model_dir = context.system_properties["model_dir"]
        self.batch_size = int(context.system_properties.get("batch_size") or 1)
        self.cfg = checkpoint.load_config(self.model_dir)
        self.store = self.open_store()
        self._last_sweep = 0.0
        self.compute_dtype = resolve_dtype(self.settings.compute_dtype, self.device)
        self.load()
        self.profile = WorkerProfile.from_env(type(self).__name__)  # EDEN_WORKER_PROFILE: a diagnostic, off
        self.initialized = True
        log.info("%s ready on %s (%s)", type(self).__name__, self.device, self.cfg)

    def load(self):
        raise NotImplementedError

    def open_store(self, folder: str | None = None) -> shm.ShmStore | None:
        """The shared-memory store (of ``folder``, default shm_dir), its folder created (0700, or 0770 with
        shm_group) or checked; a folder that is not private is logged and refused (requests that need it are
        answered 500 ShmFolderUnsafe) until fixed."""
        s = self.settings
        folder = s.shm_dir if folder is None else folder
        if not folder:
            return None
        store = shm.ShmStore(folder, s.shm_ttl_s, quota_bytes=s.shm_quota_bytes, group=s.shm_group or None)
        try:
            store.ensure_dir()
        except shm.ShmUnsafe as e:
            log.error("shared-memory folder refused: %s", e)
        except OSError as e:
            log.error("shared-memory folder %s cannot be created: %s", folder, e)
        return store

    def stores(self) -> list[shm.ShmStore]:
        """The shared-memory stores this worker writes to (swept of expired segments)."""
        return [self.store] if self.store is not None else []

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
            raise RequestError(str(e), 500, protocol.SHM_FOLDER_UNSAFE) from None
        except OSError as e:
            raise RequestError(f"the shared-memory folder cannot be created: {shm._reason(e)}", 500,
                               protocol.SHM_FOLDER_UNSAFE) from None
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
        if self.store is None or (request_header(context, idx, protocol.REPLY) or "").lower() != protocol.REPLY_SHM:
            return False
        self.shm_store(context, idx)
        return True

    def reply(self, context, idx: int, body, content_type: str, headers: dict):
        """Answer one request, in the body or, if it asked (X-Eden-Reply: shm), through a shared-memory segment
        (``body`` may be one already: a ``shm.Segment``)."""
        if isinstance(body, shm.Segment):
            headers = {**headers, protocol.REPLY_CONTENT_TYPE: content_type}
            body, content_type = shm.make_ref(segment=body.name, bytes=body.nbytes), protocol.REFERENCE_CONTENT_TYPE
        elif self.wants_shm(context, idx):
            name = self.store.write(body)
            nbytes = sum(memoryview(b).nbytes for b in body) if isinstance(body, list) else len(body)
            headers = {**headers, protocol.REPLY_CONTENT_TYPE: content_type}
            body, content_type = shm.make_ref(segment=name, bytes=nbytes), protocol.REFERENCE_CONTENT_TYPE
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
            for store in self.stores():
                try:
                    removed = store.sweep()
                except Exception:  # noqa: BLE001 - housekeeping never costs a batch its answers
                    log.warning("sweeping %s failed", store.root, exc_info=True)
                    continue
                if removed:
                    log.info("swept %d expired shared-memory segments in %s", removed, store.root)

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
                       bytes_out: int, counts: dict[str, int] | None = None) -> None:
        """Called once per batch with the stage times (seconds), the batch size, body bytes in and out, and the
        batch's event counters (``count``).

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
            for name, value in self.token_metrics(bytes_in, bytes_out).items():
                send(name, value, "B", MetricTypes.COUNTER)
            for name, value in (counts or {}).items():
                send(name, value, "count", MetricTypes.COUNTER)
        except Exception:  # noqa: BLE001 - metrics must never cost an answer
            log.warning("could not record handler metrics", exc_info=True)

    def token_metrics(self, bytes_in: int, bytes_out: int) -> dict[str, int]:
        """The service's own token-byte counters for a batch (name -> bytes); none here."""
        return {}

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the batch's counter ``name`` (a METRIC_* name; sent as a Prometheus counter)."""
        self._counts[name] = self._counts.get(name, 0) + n

    def handle(self, data: list[dict], context) -> list:
        profile = getattr(self, "profile", None)
        if profile is None:
            return self._handle(data, context)
        profile.before(len(data))
        try:
            return self._handle(data, context)
        finally:
            profile.after()

    def _handle(self, data: list[dict], context) -> list:
        self._stages: dict[str, float] = {}
        self._counts: dict[str, int] = {}  # the batch's event counters (``count``), sent with its metrics
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
        parsed = dict(self._stages)  # the parse stage, shared by every group of the batch
        totals: dict[str, float] = {}  # every group's stages, for the metrics
        for items in groups.values():
            indices = [i for i, _ in items]
            self._stages = dict(parsed)  # each group reports its own stages (not those of the groups before it)
            results = self.run_isolated([item for _, item in items])
            for k, v in self._stages.items():
                totals[k] = totals.get(k, 0.0) + (v - parsed.get(k, 0.0))
            stages = ",".join(f"{k}={1000 * v:.2f}" for k, v in self._stages.items())
            for idx, result in zip(indices, results):
                if isinstance(result, RequestError):
                    answers[idx] = self._error(context, idx, result)
                    continue
                body, content_type, headers = result
                headers = {**headers, protocol.DEVICE: str(self.device), protocol.STAGES: stages,
                           protocol.BATCH: str(len(items))}
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
        self._stages = {k: parsed.get(k, 0.0) + totals.get(k, 0.0) for k in {*parsed, *totals}}
        self.record_metrics(context, self._stages, len(data), bytes_in, bytes_out, self._counts)
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
            with store.open(name) as segment:
                if segment.size > 4096:  # (checked before anything is copied)
                    raise RequestError("a probe segment holds at most 4096 bytes")
                data = segment.read()
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
        kind = error.kind or (protocol.BAD_INPUT if error.status < 500 else protocol.UNAVAILABLE)
        return json.dumps({"code": error.status, "type": kind, "message": str(error)}).encode()

"""HTTP calls to the two served models, with TorchServe's token authorization.

TorchServe writes the keys to ``key_file.json`` in the folder it was started from; a key can also come from the
environment (EDEN_INFERENCE_KEY). Keys expire (60 minutes by default): on a refused key the client reads the key
file again and retries once, so a long run survives a restart or a key rotation; given the management URL
(EDEN_MANAGEMENT_URL), KeySource also renews an expired key itself with the key file's API key.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import requests
import urllib3

from eden_serve import framerefs, protocol, wire
from eden_serve.images import decode_image, decode_raw, encode_png, encode_raw
from eden_serve.protocol import (FORMAT, FORMAT_RAW, HANDOFF, HANDOFF_DEVICE, HANDOFF_HOST, HANDOFF_UNAVAILABLE,
                                 REFERENCE_CONTENT_TYPE, REPLY, REPLY_SHM, SEED, TOKENS_CONTENT_TYPE)
from eden_serve.shm import DEFAULT_DIR, ShmError, ShmStore, make_ref, parse_ref, read_blob
from eden_serve.wire import TokenBlob

DEFAULT_URL = "http://127.0.0.1:8080"
KEY_FILE_ENV = "EDEN_KEY_FILE"
KEY_ENV = "EDEN_INFERENCE_KEY"
MANAGEMENT_URL_ENV = "EDEN_MANAGEMENT_URL"  # lets KeySource renew expired keys (see KeySource)

log = logging.getLogger(__name__)


class ServeError(RuntimeError):
    """A request the server refused or could not answer; ``status`` is the HTTP code (0: no answer)."""

    def __init__(self, message: str, status: int = 0, kind: str | None = None):
        super().__init__(message)
        self.status = status
        self.kind = kind  # the server's error "type", if it said


class TokensLost(ServeError):
    """The DiT+decoder could not use tokens the encoder handed off on its GPU: they are gone (410: that encoder
    worker stopped), or handed-off tokens cannot work in this deployment (then the client has switched itself to
    host tokens). Either way the frames must be encoded again."""


@dataclass
class KeySource:
    """Where a TorchServe key comes from: an explicit key, or a key file read (again) on every use.

    Keys expire (``token_expiration_min``, 60 minutes by default) and TorchServe does not renew them by itself: a new
    key is made by ``GET <management>/token?type=inference|management`` with the file's API key, which rewrites
    key_file.json. With ``management_url`` set (or ``$EDEN_MANAGEMENT_URL``), :meth:`read` does that when the file
    says the key has expired (or expires within ``renew_margin_s``), so a long batch keeps going past minute 60. This
    needs the server's own key file (same host or a shared volume): TorchServe answers the renewal with an empty body.
    Without a management URL an expired key is only re-read, which helps when something else renews it.
    """
    key: str | None = None
    key_file: Path | None = None
    management_url: str | None = None
    renew_margin_s: float = 30.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def default(cls, key_file: str | os.PathLike | None = None,
                management_url: str | None = None) -> "KeySource":
        url = management_url or os.environ.get(MANAGEMENT_URL_ENV) or None
        if key_file:
            return cls(key_file=Path(key_file), management_url=url)
        if os.environ.get(KEY_ENV):
            return cls(key=os.environ[KEY_ENV])
        return cls(key_file=Path(os.environ.get(KEY_FILE_ENV, "key_file.json")), management_url=url)

    def entries(self) -> dict | None:
        """The parsed key file (None if there is none); ServeError if it is not a TorchServe key file."""
        if self.key_file is None or not self.key_file.is_file():
            return None
        for attempt in range(2):  # TorchServe rewrites the file in place on renewal: a read may catch it half-done
            try:
                data = json.loads(self.key_file.read_text())
                if isinstance(data, dict):
                    return data
            except ValueError:
                pass
            time.sleep(0.2)
        raise ServeError(f"{self.key_file} is not a TorchServe key file (expected JSON like "
                         "{'inference': {'key': ...}, 'management': {'key': ...}})")

    def read(self, kind: str = "inference") -> str | None:
        """The current ``kind`` key ("inference" or "management"), renewed first if it has expired (see above)."""
        if self.key:
            return self.key
        data = self.entries()
        if data is None:
            return None
        if self.management_url and self.expired(data, kind):
            with self._lock:  # one renewal for all threads: each renewal invalidates the previous key
                data = self.entries() or data
                if self.expired(data, kind) and self.renew(kind, data):
                    data = self.entries() or data
        try:
            return data[kind]["key"]
        except (KeyError, TypeError):
            raise ServeError(f"{self.key_file} is not a TorchServe key file (expected {{'{kind}': {{'key': ...}}}})")

    def expired(self, data: dict, kind: str) -> bool:
        """Whether the file says the ``kind`` key has expired or expires within ``renew_margin_s``."""
        when = expiry_time(data.get(kind, {}).get("expiration time") if isinstance(data.get(kind), dict) else None)
        return when is not None and when.timestamp() - time.time() < self.renew_margin_s

    def renew(self, kind: str, data: dict | None = None) -> bool:
        """Ask TorchServe for a new ``kind`` key with the API key (it rewrites the key file). True on success."""
        data = data if data is not None else (self.entries() or {})
        api_key = (data.get("API") or {}).get("key") if isinstance(data.get("API"), dict) else None
        if not (self.management_url and api_key):
            return False
        try:
            r = requests.get(f"{self.management_url.rstrip('/')}/token", params={"type": kind},
                             headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
        except requests.RequestException as e:
            log.warning("could not renew the %s key at %s: %s", kind, self.management_url, e)
            return False
        if not r.ok:
            log.warning("TorchServe refused to renew the %s key (HTTP %d): %s", kind, r.status_code, r.text[:200])
            return False
        log.info("renewed the expired %s key through %s", kind, self.management_url)
        return True

    def describe(self) -> str:
        return "the key in $" + KEY_ENV if self.key else f"the key file {self.key_file}"


def expiry_time(text) -> datetime | None:
    """TorchServe's "expiration time" (ISO 8601 in UTC with up to nanoseconds, e.g. 2026-11-25T17:56:31.344341680Z)."""
    if not isinstance(text, str):
        return None
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z?", text.strip())
    if not m:
        return None
    micros = int(((m.group(2) or "") + "000000")[:6])
    return datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").replace(microsecond=micros, tzinfo=timezone.utc)


# Answers worth another try: 502/504 (a proxy lost TorchServe), 503 (job queue full, no worker ready, out of GPU
# memory) and 507 (TorchServe's "Worker died."). Other 5xx are retried unless they are a JSON error of our handler.
RETRY_STATUSES = frozenset({502, 503, 504, 507})
KEY_REREAD_WAITS = (0.0, 1.0, 2.0)  # seconds before each re-read of a key file whose key was refused
HANDLER_ERROR_TYPES = protocol.NOT_RETRIED  # the handlers' error types that a retry cannot fix


@dataclass(frozen=True)
class RetryPolicy:
    """When and how :meth:`ModelClient.predict` tries a request again.

    Tried again: no answer (connection refused, reset or dropped: TorchServe restarting or stopped), no answer
    within the client's timeout (TorchServe 0.12 loses a request that a worker was collecting into a batch when that
    worker dies: it never answers it), 502/503/504 (503: the job queue is full or no worker is ready), 507
    (TorchServe's "Worker died.": the worker running the request was killed) and other 5xx answers that are not a
    JSON error of our handler. Never tried again: 4xx answers (bad input, too large, unknown model; the same request
    would be refused again), except that a refused key is re-read from the key file once, at once.

    Before try n+1 the client waits ``min(max_backoff, backoff * 2**(n-1))`` seconds times a random factor in
    [1 - jitter, 1] (many clients refused together do not come back together), or longer if the answer says
    Retry-After. It stops after ``max_attempts`` tries, or when less than ``min_attempt_s`` of ``max_elapsed`` (the
    budget of the whole call, tries and waits included) is left; each try's timeout is cut to what is left, so a
    call never takes longer than ``max_elapsed``. Retrying is safe: a prediction changes nothing on the server, and
    with a seed it gives the same answer.
    """
    max_attempts: int = 8
    backoff: float = 0.5
    max_backoff: float = 10.0
    jitter: float = 0.5
    max_elapsed: float = 1800.0
    min_attempt_s: float = 1.0
    retry_timeouts: bool = True

    def __post_init__(self):
        if self.max_attempts < 1 or self.backoff < 0 or self.max_backoff < 0 or not 0 <= self.jitter <= 1 \
                or self.max_elapsed <= 0:
            raise ValueError(f"invalid retry policy {self}")

    @classmethod
    def never(cls) -> "RetryPolicy":
        """One try only (the behaviour before retries existed)."""
        return cls(max_attempts=1)

    def wait(self, retry: int, rng: random.Random, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1 = the second try)."""
        base = min(self.max_backoff, self.backoff * 2 ** (retry - 1))
        wait = base * (1 - self.jitter * rng.random())
        return max(wait, min(retry_after, self.max_backoff)) if retry_after else wait


class ModelClient:
    """One served model: POST {url}/predictions/{model}, tried again under ``retry`` (see :class:`RetryPolicy`).

    ``timeout`` bounds each try (seconds without an answer); ``retries`` counts the retries made, by reason.
    """

    def __init__(self, url: str = DEFAULT_URL, model: str = "", keys: KeySource | None = None, timeout: float = 600,
                 session: requests.Session | None = None, retry: RetryPolicy | None = None):
        self.url = url.rstrip("/")
        self.model = model
        self.keys = keys or KeySource.default()
        self.timeout = timeout
        self.session = session or requests.Session()
        self.retry = retry or RetryPolicy()
        self.retries: Counter = Counter()
        self.reached = False  # set by the first answer: only a server that was up is waited for when refused
        self._retries_lock = threading.Lock()
        self._rng = random.Random()
        self._sleep, self._clock = time.sleep, time.monotonic  # replaced by tests

    @property
    def endpoint(self) -> str:
        return f"{self.url}/predictions/{self.model}"

    def predict(self, *, data: bytes | None = None, files: dict | None = None,
                headers: dict | None = None) -> requests.Response:
        """POST the request; the answer on success (2xx), else ServeError (``status``: the last HTTP code, 0 if none).

        ``data`` and ``files`` must be bytes (not open files): a retry sends them again.
        """
        policy = self.retry
        start = self._clock()
        attempt = 0
        key_rereads = 0
        while True:
            attempt += 1
            left = policy.max_elapsed - (self._clock() - start)
            timeout = max(min(self.timeout, left), 0.001)
            key = self.keys.read("inference")
            sent = dict(headers or {})
            if key:
                sent["Authorization"] = f"Bearer {key}"
            status, retry_after = 0, None
            try:
                r = self.session.post(self.endpoint, data=data, files=files, headers=sent, timeout=timeout,
                                      stream=True)
                _read_body(r)
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ContentDecodingError) as e:
                reason = "connection"
                problem = f"no answer from TorchServe at {self.url} ({_cause(e)})"
                if not self.reached and _nobody_there(e):
                    # refused (or no such host) before this server ever answered: a wrong address or a server
                    # that is not running, not one restarting; waiting would only delay the same message
                    raise self._give_up(reason, problem, 0, attempt, self._clock() - start)
            except requests.Timeout:
                if not policy.retry_timeouts:
                    raise ServeError(f"{self.endpoint} did not answer within {timeout:.0f} s") from None
                reason = "timeout"
                problem = f"no answer from {self.endpoint} within {timeout:.0f} s"
            else:
                self.reached = True
                if r.ok:
                    return r
                error = _error_of(r)
                if error.get("type") == "InvalidKeyException":
                    if key_rereads < len(KEY_REREAD_WAITS) and not self.keys.key:
                        # the key may have been rotated or renewed: read the file again, now, then after short
                        # waits (a restarting TorchServe may answer before it has rewritten its key file)
                        self._sleep(KEY_REREAD_WAITS[key_rereads])
                        key_rereads += 1
                        attempt -= 1
                        continue
                    where = self.keys.describe()
                    problem = (f"no key: {self.keys.key_file} does not exist" if key is None
                               else f"TorchServe refused {where}")
                    hint = (f"{problem}. TorchServe writes key_file.json in the folder it was started from: pass it "
                            f"with --key-file or ${KEY_FILE_ENV}, or the key itself in ${KEY_ENV}")
                    raise ServeError(hint, r.status_code)
                message = error.get("message") or r.reason
                if not _retryable(r.status_code, error):
                    raise ServeError(f"{self.model}: HTTP {r.status_code}: {message}", r.status_code,
                                     error.get("type"))
                status, reason = r.status_code, f"HTTP {r.status_code}"
                problem = f"HTTP {r.status_code}: {message}"
                retry_after = _retry_after(r)
            elapsed = self._clock() - start
            wait = policy.wait(attempt, self._rng, retry_after)
            if attempt >= policy.max_attempts or elapsed + wait + policy.min_attempt_s > policy.max_elapsed:
                raise self._give_up(reason, problem, status, attempt, elapsed)
            with self._retries_lock:
                self.retries[reason] += 1
            log.warning("%s: %s; try %d of %d in %.1f s", self.model, problem, attempt + 1, policy.max_attempts, wait)
            self._sleep(wait)

    def _give_up(self, reason: str, problem: str, status: int, attempts: int, elapsed: float) -> ServeError:
        tries = f"{attempts} {'try' if attempts == 1 else 'tries'} in {elapsed:.1f} s"
        if reason == "connection":
            advice = "Is TorchServe running, and is the address right?"
        elif reason == "timeout":
            advice = ("The request may need more than --timeout, or TorchServe lost it (a worker died while "
                      "collecting its batch); raise --timeout or see the server's logs")
        else:
            advice = ("TorchServe is overloaded (its job queue is full) or its workers keep failing: lower the "
                      "number of concurrent requests, try again later, or see the server's logs/model_log.log")
        error = ServeError(f"{self.model}: gave up after {tries}: {problem}. {advice}", status)
        error.attempts = attempts
        return error


def _retryable(status: int, error: dict) -> bool:
    """Whether an error answer may go away if the same request is sent again (see RetryPolicy)."""
    if status in RETRY_STATUSES:
        return True
    return status >= 500 and error.get("type") not in HANDLER_ERROR_TYPES


def _retry_after(r: requests.Response) -> float | None:
    try:
        return max(0.0, float(r.headers.get("Retry-After", "")))
    except ValueError:
        return None


def _cause(e: Exception) -> str:
    """The innermost reason of a requests exception, short (e.g. 'Connection refused')."""
    text = str(e)
    for marker in ("Connection refused", "Connection reset by peer", "Connection aborted", "RemoteDisconnected",
                   "Broken pipe", "Read timed out"):
        if marker in text:
            return marker
    return type(e).__name__


def _nobody_there(e: Exception) -> bool:
    """Whether a connection error means nothing listens at the address (refused, or a host name that does not
    resolve), rather than a connection that was cut."""
    text = str(e)
    return any(marker in text for marker in ("Connection refused", "Name or service not known",
                                             "nodename nor servname", "Failed to resolve",
                                             "Temporary failure in name resolution", "NameResolutionError"))


def _read_body(r: requests.Response) -> None:
    """Read the whole body of a streamed answer in one call, then ``r.content`` is it. requests itself reads 10 KB
    at a time, which costs 5x more client time for a 20 MB token blob (52 against 9 ms here), and a client thread
    reading holds the interpreter that the other requests' threads need."""
    if r._content is not False or r.raw is None:  # already read (or nothing to read)
        return
    try:
        r._content = r.raw.read(decode_content=True)  # what r.content returns from now on
        r._content_consumed = True
    except urllib3.exceptions.ReadTimeoutError as e:
        raise requests.exceptions.ReadTimeout(e, response=r) from None
    except (urllib3.exceptions.HTTPError, OSError) as e:
        raise requests.ConnectionError(e, response=r) from None
    finally:
        r.close()  # the connection goes back to the session's pool (or is dropped if the read failed)


def _error_of(r: requests.Response) -> dict:
    try:
        body = r.json()
        return body if isinstance(body, dict) else {}
    except ValueError:
        return {"message": r.text[:500]}


def _generate_headers(content_type: str, seed: int | None, raw: bool = False) -> dict:
    """The headers of a DiT+decoder request: its body's type, the seed if given, raw frames back if asked."""
    headers = {"Content-Type": content_type}
    if seed is not None:
        headers[SEED] = str(seed)
    if raw:
        headers[FORMAT] = FORMAT_RAW
    return headers


# ---------------------------------------------------------------------- the two models
@dataclass
class EncoderAnswer:
    """What one encoder call returned: the tokens of its frames, parsed, and where they live."""
    blob: TokenBlob  # for the shm transport, views of the segment (no copy)
    segment: str | None = None  # the shared-memory segment holding them; released by EdenClient.release
    hashes: dict = field(default_factory=dict)  # frame index -> its hash once sent inline over HTTP (framerefs)

    @property
    def num_frames(self) -> int:
        return self.blob.num_frames


class EdenClient:
    """The split deployment: encoder and DiT+decoder, possibly on two different TorchServe instances.

    ``transport="http"`` sends every byte in the requests (PNG frames in and out, tokens in bodies);
    ``transport="shm"`` (client and both servers on one host) puts raw frames and tokens in shared memory and sends
    references, which skips TorchServe's copies of large bodies and every PNG encode and decode. With it,
    ``handoff="device"`` lets an encoder on a GPU keep the tokens there (the DiT+decoder copies them GPU to GPU);
    ``"host"`` always puts their bytes in shared memory.
    """

    def __init__(self, encoder: ModelClient, ditdec: ModelClient, transport: str = "http",
                 store: ShmStore | None = None, handoff: str = HANDOFF_DEVICE, reason: str = ""):
        if transport not in ("http", "shm"):
            raise ValueError(f"transport must be http or shm, got {transport!r}")
        if handoff not in (HANDOFF_DEVICE, HANDOFF_HOST):
            raise ValueError(f"handoff must be device or host, got {handoff!r}")
        self.handoff = handoff
        self.encoder = encoder
        self.ditdec = ditdec
        self.transport = transport
        self.store = store or ShmStore()
        self.reason = reason or f"asked for with transport={transport}"  # why this transport (eden_client/transport.py)
        if transport == "shm":  # a folder another user owns or can write is never used (eden_serve/shm.py)
            try:
                self.store.ensure_dir()
            except (ShmError, OSError) as e:
                raise ServeError(f"cannot use the shared-memory transport: {e}") from None
        self.observe: Callable[[str, float, requests.Response], None] | None = None  # (kind, seconds, response)
        # over HTTP, a frame's tokens go to the DiT+decoder once and are named by hash afterwards (eden_serve/
        # framerefs.py); off by itself when the references mostly miss (several workers or replicas, each with its
        # own cache) or the server does not know them
        self.frame_refs = transport == "http"
        self.wire = Counter()  # request body bytes sent: "encode", "generate"; "ref_hits", "ref_misses" (frames)
        self._sent: OrderedDict[str, None] = OrderedDict()  # hashes of frames sent inline, most recent last
        self._wire_lock = threading.Lock()

    def _post(self, kind: str, model: ModelClient, **kw) -> requests.Response:
        start = time.perf_counter()
        data, files = kw.get("data"), kw.get("files") or {}
        nbytes = len(data) if data is not None else sum(  # (multipart framing not counted: ~150 bytes a part)
            len(v[1]) if isinstance(v, tuple) and isinstance(v[1], (bytes, str)) else 0 for v in files.values())
        with self._wire_lock:
            self.wire[kind] += nbytes
        r = model.predict(**kw)
        for other in (self.encoder, self.ditdec):  # the same TorchServe is up for the other model too
            if other.url == model.url:
                other.reached = True
        if self.observe is not None:
            self.observe(kind, time.perf_counter() - start, r)
        return r

    @classmethod
    def connect(cls, encoder_url: str = DEFAULT_URL, ditdec_url: str | None = None,
                encoder_keys: KeySource | None = None, ditdec_keys: KeySource | None = None,
                timeout: float = 600, transport: str = "http", shm_dir: str | None = None,
                handoff: str = HANDOFF_DEVICE, shm_group: str | None = None) -> "EdenClient":
        """``transport``: "http", "shm" (taken as said) or "auto": shared memory if both models prove, by a probe
        segment, that they share a folder with this client, else HTTP (eden_client/transport.py; ``reason`` says
        why)."""
        encoder_keys = encoder_keys or KeySource.default()
        encoder = ModelClient(encoder_url, "eden_encoder", encoder_keys, timeout)
        ditdec = ModelClient(ditdec_url or encoder_url, "eden_ditdec", ditdec_keys or encoder_keys, timeout)
        reason = ""
        if transport == "auto":
            from .transport import choose
            choice = choose(encoder, ditdec, "auto", handoff, shm_dir, shm_group)
            transport, handoff, reason, shm_dir = choice.transport, choice.handoff, choice.reason, choice.shm_dir
        store = ShmStore(shm_dir or DEFAULT_DIR, group=shm_group) if shm_dir or shm_group else None
        return cls(encoder, ditdec, transport, store, handoff, reason)

    def models(self) -> tuple[ModelClient, ModelClient]:
        return self.encoder, self.ditdec

    def describe_transport(self) -> str:
        """E.g. "shm, device handoff (the servers read and wrote probe segments in /dev/shm/eden)"."""
        how = self.transport + (f", {self.handoff} handoff" if self.transport == "shm" else "")
        return f"{how} ({self.reason})"

    # ------------------------------------------------------------------ frames -> tokens -> frames
    def encode_frames(self, frames: list, dtype: str = "float16") -> EncoderAnswer:
        """[H, W, 3] uint8 frames of one size (at most the server's max_frames) -> their tokens, each frame encoded
        once. Release the result (``release``) when no pair needs its frames any more."""
        if self.transport == "http":
            return EncoderAnswer(wire.from_bytes(self.encode_arrays(frames, dtype)))
        inputs = [self.store.write(encode_raw(f)) for f in frames]
        try:
            files = {f"frame{i}": (f"frame{i}", make_ref(segment=name), REFERENCE_CONTENT_TYPE)
                     for i, name in enumerate(inputs)}
            files["dtype"] = (None, dtype)
            r = self._post("encode", self.encoder, files=files,
                           headers={REPLY: REPLY_SHM, HANDOFF: self.handoff})
        finally:
            for name in inputs:
                self.store.unlink(name)
        segment = self._segment_of(r)
        try:
            return EncoderAnswer(read_blob(self.store.read(segment))[0], segment)  # (tokens maybe on the GPU)
        except Exception:
            self.store.unlink(segment)
            raise

    def generate_pair(self, first: EncoderAnswer, i: int, second: EncoderAnswer, j: int,
                      difference: float | None = None, seed: int | None = None):
        """The middle frame between frame i of ``first`` and frame j of ``second`` -> ([H, W, 3] uint8, seed).

        ``difference`` is the DiT's frame-difference input; it may be left out only for consecutive frames of one
        encoder call (the blob has it)."""
        if difference is None:
            if first is not second or j != i + 1:
                raise ValueError("the difference of frames from different encoder calls must be given")
            difference = first.blob.differences[i]
        if self.transport == "http":
            if self.frame_refs:
                return self._generate_by_refs([(first, i), (second, j)], difference, seed)
            pair = (first.blob.window(i, difference) if first is second and j == i + 1
                    else TokenBlob.pair(first.blob.frame(i), second.blob.frame(j), difference))
            return self.generate_array(pair.to_bytes(), seed)
        ref = make_ref(pair=[{"segment": first.segment, "frame": i}, {"segment": second.segment, "frame": j}],
                       difference=float(difference))
        try:
            r = self._post("generate", self.ditdec, data=ref,
                           headers={**_generate_headers(REFERENCE_CONTENT_TYPE, seed, raw=True), REPLY: REPLY_SHM})
        except ServeError as e:
            if e.status == 410:
                raise TokensLost(str(e), e.status, e.kind) from None
            if e.kind == HANDOFF_UNAVAILABLE and self.handoff == HANDOFF_DEVICE:
                log.warning("%s; asking the encoder for host tokens from now on", e)
                self.handoff = HANDOFF_HOST
                raise TokensLost(str(e), e.status, e.kind) from None
            raise
        segment = self._segment_of(r)
        try:
            frame = decode_raw(self.store.read(segment), max_pixels=1 << 40)  # (read: already a private copy)
        finally:
            self.store.unlink(segment)
        return frame, int(r.headers.get(SEED, -1))

    def _generate_by_refs(self, frames: list[tuple[EncoderAnswer, int]], difference: float, seed: int | None):
        """A pair over HTTP as a pair body: each frame inline the first time, by hash after; a miss (the worker
        that took the request does not hold the frame: 409 FrameNotCached) sends the pair again, both inline."""
        items = []
        for enc, k in frames:
            # each frame inline in exactly one request (the first to claim it), named by hash in every other, also
            # in those sent while that one is still on its way: the DiT+decoder keeps a batch's inline frames
            # before it looks up the names (DitDecService.handle), and a miss costs one resend
            data = None if k in enc.hashes else self._frame_bytes(enc, k)
            with self._wire_lock:
                h = enc.hashes[k]
                named = h in self._sent
                if not named:
                    self._sent[h] = None
                    while len(self._sent) > self.SENT_HASHES:
                        self._sent.popitem(last=False)
                self._sent.move_to_end(h)
            items.append(h if named else data if data is not None else self._frame_bytes(enc, k))
        body = framerefs.build(items, difference)
        headers = _generate_headers(framerefs.CONTENT_TYPE, seed, raw=True)
        refs = sum(isinstance(x, str) for x in items)
        try:
            r = self._post("generate", self.ditdec, data=body, headers=headers)
        except ServeError as e:
            if e.kind == framerefs.FRAME_NOT_CACHED:
                self._count_refs(0, refs)
                body = framerefs.build([x if not isinstance(x, str) else self._frame_bytes(enc, k)
                                        for x, (enc, k) in zip(items, frames)], difference)
                r = self._post("generate", self.ditdec, data=body, headers=headers)
            elif e.status == 400 and "EDENPAIR" in str(e):  # a server from before pair bodies
                log.warning("the DiT+decoder does not read pair bodies (an older server): sending whole pairs")
                self.frame_refs = False
                (a, i), (b, j) = frames
                return self.generate_pair(a, i, b, j, difference, seed)
            else:
                raise
        else:
            self._count_refs(refs, 0)
        return decode_image(r.content, max_pixels=1 << 40), int(r.headers.get(SEED, -1))

    SENT_HASHES = 4096  # frames remembered as sent (their hashes): far more than a video's window of open pairs
    REF_SAMPLE = 16  # frames named by hash before judging whether naming pays

    @staticmethod
    def _frame_bytes(enc: EncoderAnswer, k: int) -> bytes:
        """Frame k of ``enc`` as a one-frame blob (its hash noted in ``enc.hashes``)."""
        data = enc.blob.frame(k).to_bytes()
        enc.hashes[k] = framerefs.frame_hash(data)
        return data

    def _count_refs(self, hits: int, misses: int) -> None:
        """Count frames named by hash that the worker held (hits) or not; when most miss (each of several workers
        or replicas has its own cache, and a miss costs a resend), stop naming frames: whole pairs cost less."""
        with self._wire_lock:
            self.wire["ref_hits"] += hits
            self.wire["ref_misses"] += misses
            tried = self.wire["ref_hits"] + self.wire["ref_misses"]
            if self.frame_refs and tried >= self.REF_SAMPLE and self.wire["ref_misses"] > self.wire["ref_hits"]:
                self.frame_refs = False
                log.warning("the DiT+decoder's frame cache missed %d of %d frames named by hash (several workers "
                            "or replicas: each has its own cache): sending whole pairs from now on",
                            self.wire["ref_misses"], tried)

    def release(self, encoded: EncoderAnswer) -> None:
        if encoded.segment:
            self.store.unlink(encoded.segment)
            encoded.segment = None

    @staticmethod
    def _segment_of(r: requests.Response) -> str:
        if r.headers.get("Content-Type", "").split(";")[0] != REFERENCE_CONTENT_TYPE:
            raise ServeError(f"{r.url}: asked for a shared-memory reply but got {r.headers.get('Content-Type')}: "
                             "is the server's shm_dir off, or on another host?")
        return parse_ref(r.content)["segment"]

    def encode(self, frames: list[bytes], dtype: str = "float16") -> bytes:
        """Encoded image files (PNG/JPEG) -> one token blob of all of them."""
        files = {f"frame{i}": (f"frame{i}", f, "application/octet-stream") for i, f in enumerate(frames)}
        files["dtype"] = (None, dtype)
        return self._post("encode", self.encoder, files=files).content

    def generate(self, pair_blob: bytes, seed: int | None = None) -> tuple[bytes, int]:
        """A pair's token blob -> (PNG bytes of the middle frame, the seed used)."""
        r = self._post("generate", self.ditdec, data=pair_blob, headers=_generate_headers(TOKENS_CONTENT_TYPE, seed))
        return r.content, int(r.headers.get(SEED, -1))

    def encode_arrays(self, frames: list, dtype: str = "float16") -> bytes:
        """[H, W, 3] uint8 arrays (one size) -> one token blob of all of them. How the pixels travel is this
        method's business (PNG today), so callers holding decoded frames should use it."""
        return self.encode([encode_png(f) for f in frames], dtype)

    def generate_array(self, pair_blob: bytes, seed: int | None = None):
        """A pair's token blob -> (the middle frame as [H, W, 3] uint8, the seed used). The frame comes back raw:
        a PNG encode costs the worker more than the bytes cost the wire."""
        r = self._post("generate", self.ditdec, data=pair_blob,
                       headers=_generate_headers(TOKENS_CONTENT_TYPE, seed, raw=True))
        return decode_image(r.content, max_pixels=1 << 40), int(r.headers.get(SEED, -1))

    def interpolate(self, frame0: bytes, frame1: bytes, seed: int | None = None, dtype: str = "float16") -> bytes:
        png, _ = self.generate(self.encode([frame0, frame1], dtype), seed)
        return png

"""HTTP calls to the two served models, with TorchServe's token authorization.

TorchServe writes the keys to ``key_file.json`` in the folder it was started from; a key can also come from the
environment (EDEN_INFERENCE_KEY). Keys expire (60 minutes by default): on a refused key the client reads the key
file again and retries once, so a long run survives a restart or a key rotation.
"""
from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import requests

from eden_serve.images import decode_image, encode_png

DEFAULT_URL = "http://127.0.0.1:8080"
KEY_FILE_ENV = "EDEN_KEY_FILE"
KEY_ENV = "EDEN_INFERENCE_KEY"

log = logging.getLogger(__name__)


class ServeError(RuntimeError):
    """A request the server refused or could not answer; ``status`` is the HTTP code (0: no answer)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


@dataclass
class KeySource:
    """Where the inference key comes from: an explicit key, or a key file read (again) on demand."""
    key: str | None = None
    key_file: Path | None = None

    @classmethod
    def default(cls, key_file: str | os.PathLike | None = None) -> "KeySource":
        if key_file:
            return cls(key_file=Path(key_file))
        if os.environ.get(KEY_ENV):
            return cls(key=os.environ[KEY_ENV])
        return cls(key_file=Path(os.environ.get(KEY_FILE_ENV, "key_file.json")))

    def read(self, kind: str = "inference") -> str | None:
        if self.key:
            return self.key
        if self.key_file is None or not self.key_file.is_file():
            return None
        try:
            return json.loads(self.key_file.read_text())[kind]["key"]
        except (ValueError, KeyError, TypeError):
            raise ServeError(f"{self.key_file} is not a TorchServe key file (expected {{'{kind}': {{'key': ...}}}})")

    def describe(self) -> str:
        return "the key in $" + KEY_ENV if self.key else f"the key file {self.key_file}"


# Answers worth another try: 502/504 (a proxy lost TorchServe), 503 (job queue full, no worker ready, out of GPU
# memory) and 507 (TorchServe's "Worker died."). Other 5xx are retried unless they are a JSON error of our handler.
RETRY_STATUSES = frozenset({502, 503, 504, 507})
HANDLER_ERROR_TYPES = frozenset({"BadInput"})  # eden_serve.serving's error types that a retry cannot fix


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
        self._retries_lock = threading.Lock()
        self._rng = random.Random()
        self._sleep = time.sleep  # replaced by tests

    @property
    def endpoint(self) -> str:
        return f"{self.url}/predictions/{self.model}"

    def predict(self, *, data: bytes | None = None, files: dict | None = None,
                headers: dict | None = None) -> requests.Response:
        """POST the request; the answer on success (2xx), else ServeError (``status``: the last HTTP code, 0 if none).

        ``data`` and ``files`` must be bytes (not open files): a retry sends them again.
        """
        policy = self.retry
        start = time.monotonic()
        attempt = 0
        key_reread = False
        while True:
            attempt += 1
            left = policy.max_elapsed - (time.monotonic() - start)
            timeout = max(min(self.timeout, left), 0.001)
            key = self.keys.read("inference")
            sent = dict(headers or {})
            if key:
                sent["Authorization"] = f"Bearer {key}"
            status, retry_after = 0, None
            try:
                r = self.session.post(self.endpoint, data=data, files=files, headers=sent, timeout=timeout)
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ContentDecodingError) as e:
                reason = "connection"
                problem = f"no answer from TorchServe at {self.url} ({_cause(e)})"
            except requests.Timeout:
                if not policy.retry_timeouts:
                    raise ServeError(f"{self.endpoint} did not answer within {timeout:.0f} s") from None
                reason = "timeout"
                problem = f"no answer from {self.endpoint} within {timeout:.0f} s"
            else:
                if r.ok:
                    return r
                error = _error_of(r)
                if error.get("type") == "InvalidKeyException":
                    if not key_reread and not self.keys.key:
                        key_reread = True  # the key may have been rotated or renewed: read the file again, now
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
                    raise ServeError(f"{self.model}: HTTP {r.status_code}: {message}", r.status_code)
                status, reason = r.status_code, f"HTTP {r.status_code}"
                problem = f"HTTP {r.status_code}: {message}"
                retry_after = _retry_after(r)
            elapsed = time.monotonic() - start
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


def _error_of(r: requests.Response) -> dict:
    try:
        body = r.json()
        return body if isinstance(body, dict) else {}
    except ValueError:
        return {"message": r.text[:500]}


# ---------------------------------------------------------------------- the two models
class EdenClient:
    """The split deployment: encoder and DiT+decoder, possibly on two different TorchServe instances."""

    def __init__(self, encoder: ModelClient, ditdec: ModelClient):
        self.encoder = encoder
        self.ditdec = ditdec

    @classmethod
    def connect(cls, encoder_url: str = DEFAULT_URL, ditdec_url: str | None = None,
                encoder_keys: KeySource | None = None, ditdec_keys: KeySource | None = None,
                timeout: float = 600) -> "EdenClient":
        encoder_keys = encoder_keys or KeySource.default()
        return cls(ModelClient(encoder_url, "eden_encoder", encoder_keys, timeout),
                   ModelClient(ditdec_url or encoder_url, "eden_ditdec", ditdec_keys or encoder_keys, timeout))

    def encode(self, frames: list[bytes], dtype: str = "float16") -> bytes:
        """Encoded image files (PNG/JPEG) -> one token blob of all of them."""
        files = {f"frame{i}": (f"frame{i}", f, "application/octet-stream") for i, f in enumerate(frames)}
        files["dtype"] = (None, dtype)
        return self.encoder.predict(files=files).content

    def generate(self, pair_blob: bytes, seed: int | None = None) -> tuple[bytes, int]:
        """A pair's token blob -> (PNG bytes of the middle frame, the seed used)."""
        headers = {"Content-Type": "application/x-eden-tokens"}
        if seed is not None:
            headers["X-Eden-Seed"] = str(seed)
        r = self.ditdec.predict(data=pair_blob, headers=headers)
        return r.content, int(r.headers.get("X-Eden-Seed", -1))

    def encode_arrays(self, frames: list, dtype: str = "float16") -> bytes:
        """[H, W, 3] uint8 arrays (one size) -> one token blob of all of them. How the pixels travel is this
        method's business (PNG today), so callers holding decoded frames should use it."""
        return self.encode([encode_png(f) for f in frames], dtype)

    def generate_array(self, pair_blob: bytes, seed: int | None = None):
        """A pair's token blob -> (the middle frame as [H, W, 3] uint8, the seed used)."""
        png, seed = self.generate(pair_blob, seed)
        return decode_image(png, max_pixels=1 << 40), seed

    def interpolate(self, frame0: bytes, frame1: bytes, seed: int | None = None, dtype: str = "float16") -> bytes:
        png, _ = self.generate(self.encode([frame0, frame1], dtype), seed)
        return png

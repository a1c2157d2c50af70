"""One served model over HTTP: :class:`ModelClient` POSTs a prediction with the current key of a
:class:`~eden_client.keys.KeySource` and tries it again under a :class:`RetryPolicy` (a refused key is read again
from the key file first)."""
from __future__ import annotations

import functools
import http.client
import logging
import random
import select
import socket
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass

import requests
import urllib3

from eden_serve import protocol

from .errors import ServeError
from .keys import KEY_ENV, KEY_FILE_ENV, KeySource

DEFAULT_URL = "http://127.0.0.1:8080"

log = logging.getLogger(__name__)


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
        self.session = session or default_session(self.url)
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
            key = self.keys.read("inference", fresh=key_rereads > 0)
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


def default_session(url: str):
    """What posts to ``url``: a :class:`DirectSession` for a plain http:// address that no proxy of the environment
    applies to (servers on this host or the local network: every request of a run), else requests' session with the
    environment's settings read once (proxies, TLS: :func:`settled_session`)."""
    session = settled_session(url)
    if url.startswith("http://") and requests.utils.select_proxy(url, session.proxies) is None \
            and urllib3.util.parse_url(url).auth is None:  # (credentials in the URL: requests sends them)
        session.close()
        return DirectSession()
    return session


class DirectSession:
    """``post`` as requests.Session's, over one kept-alive http.client connection per thread and server, without
    requests' or urllib3's layers.

    For each request requests merges its settings, prepares and checks the URL and headers, runs hooks and moves
    cookies into and out of a jar; urllib3 under it parses the URL again, picks a pool and a connection and wraps
    the answer. That was most of the interpreter time a POST took, and at 300-650 requests a second (480p on one
    H200) the client's other threads (the reader, the writer, the scheduler) wait for it: 316 against 201 us of
    client CPU a request through urllib3 and through http.client here (bench/NOTES.md session 13). This keeps what
    the client uses: the body or the multipart files as requests encodes them, the timeout of each try, a
    ``requests.Response`` with the whole body read, and requests' exceptions (so the retry policy reads them alike).
    A kept connection the server has closed is noticed before it is used (as urllib3 does), and a connection whose
    thread has ended is closed when the next one is made. No proxies, no TLS: ``default_session`` gives those URLs
    to requests; an answer that redirects (a proxy in front of the servers) is sent again through requests, which
    follows it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._connections: dict[threading.Thread, dict[tuple[str, int], http.client.HTTPConnection]] = {}
        self._redirected: requests.Session | None = None  # for answers that redirect (made when one comes)

    def post(self, url: str, data: bytes | None = None, files: dict | None = None, headers: dict | None = None,
             timeout: float | None = None, stream: bool = False) -> requests.Response:
        sent = headers
        headers = dict(headers or {})
        if files:
            if data:
                raise ValueError("DirectSession.post takes data or files, not both")
            data, headers["Content-Type"] = _multipart(files)
        host, port, path = _target(url)
        conn = self._connection(host, port)
        conn.timeout = timeout
        if conn.sock is None:
            try:
                conn.connect()
                conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # (as urllib3 does)
            except TimeoutError as e:
                conn.close()
                raise requests.ConnectTimeout(f"connecting to {host}:{port}: {e}") from None
            except socket.gaierror as e:  # (worded as urllib3 words it: a name nothing answers to, not a cut)
                conn.close()
                raise requests.ConnectionError(f"Failed to resolve {host!r} ({e})") from None
            except OSError as e:  # refused, unreachable
                conn.close()
                raise requests.ConnectionError(f"connecting to {host}:{port}: {e}") from None
        else:
            conn.sock.settimeout(timeout)
        cut = False  # the server closed while the body was being sent
        try:
            try:
                conn.request("POST", path, body=data, headers=headers)
            except (BrokenPipeError, ConnectionResetError) as e:
                # the server may have answered before reading the whole body (a refused key, a 413) and closed:
                # that answer is the one to act on, if it came (the connection is done with either way)
                cut = True
                try:
                    answer = conn.getresponse()
                except (http.client.HTTPException, OSError):
                    raise e from None
            else:
                answer = conn.getresponse()
            content = answer.read()
        except TimeoutError as e:
            conn.close()
            raise requests.ReadTimeout(f"{url}: no answer in {timeout} s ({e})") from None
        except (http.client.HTTPException, OSError) as e:  # reset, cut, closed before or while answering
            conn.close()
            raise requests.ConnectionError(f"{url}: {type(e).__name__}: {e}") from None
        except BaseException:  # (e.g. a header http.client refuses): the connection is half used, not reusable
            conn.close()
            raise
        if answer.will_close or cut:
            conn.close()
        if answer.status in REDIRECTS and answer.getheader("Location"):
            if self._redirected is None:
                self._redirected = settled_session(url)
            return self._redirected.post(url, data=None if files else data, files=files, headers=sent,
                                         timeout=timeout)
        r = requests.Response()
        r.status_code, r.url, r.reason = answer.status, url, answer.reason
        r.headers = requests.structures.CaseInsensitiveDict()
        for name, value in answer.getheaders():  # (a repeated header's values joined, as urllib3 does)
            r.headers[name] = f"{r.headers[name]}, {value}" if name in r.headers else value
        r._content, r._content_consumed = content, True
        r.encoding = requests.utils.get_encoding_from_headers(r.headers)
        return r

    def _connection(self, host: str, port: int) -> http.client.HTTPConnection:
        """This thread's connection to host:port: the kept one unless the server has closed it, else a new one (and
        the connections of threads that have ended are closed)."""
        thread = threading.current_thread()
        mine = self._connections.get(thread)
        if mine is None:
            with self._lock:
                for gone in [t for t in self._connections if not t.is_alive()]:
                    for c in self._connections.pop(gone).values():
                        c.close()
                mine = self._connections[thread] = {}
        conn = mine.get((host, port))
        if conn is None:
            conn = mine[(host, port)] = http.client.HTTPConnection(host, port)
        elif conn.sock is not None and _closed_by_peer(conn.sock):
            conn.close()
        return conn

    def close(self) -> None:
        with self._lock:
            for mine in self._connections.values():
                for c in mine.values():
                    c.close()
            self._connections.clear()
        if self._redirected is not None:
            self._redirected.close()


REDIRECTS = (301, 302, 303, 307, 308)


@functools.lru_cache(maxsize=64)
def _target(url: str) -> tuple[str, int, str]:
    """http://host[:port]/path?query -> (host, port, path?query); requests' InvalidURL for one that cannot be."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or 80
    except ValueError as e:  # e.g. a port out of range
        raise requests.exceptions.InvalidURL(f"{url}: {e}") from None
    if parts.scheme != "http" or not parts.hostname:
        raise requests.exceptions.InvalidURL(f"{url}: not an http://host/ address")
    return parts.hostname, port, (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether an idle kept-alive connection can be read from: the server closed it (or sent what nobody asked
    for); either way it cannot carry the next request."""
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except AttributeError:  # no poll (Windows)
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


def _multipart(files: dict) -> tuple[bytes, str]:
    """requests' ``files`` -> (body, Content-Type), the parts as requests writes them: each value bytes, a string
    or a file (named after its field), or a tuple (filename[, data[, content type[, headers]]]) with filename None
    for a plain field; a None value is left out."""
    fields = []
    for name, value in files.items():
        filename, content_type, part_headers = name, None, None
        if isinstance(value, (tuple, list)):
            filename, value, *rest = value
            content_type = rest[0] if rest else None
            part_headers = rest[1] if len(rest) > 1 else None
        if value is None:
            continue
        if hasattr(value, "read"):
            value = value.read()
        field = urllib3.fields.RequestField(name=name, data=value, filename=filename, headers=part_headers)
        field.make_multipart(content_type=content_type)
        fields.append(field)
    return urllib3.encode_multipart_formdata(fields)


def settled_session(url: str) -> requests.Session:
    """A session for ``url`` that reads the environment's proxy and CA-bundle settings once, here: requests reads
    them again for every request (its ``trust_env``), 0.2 of its 0.8 ms of interpreter time a request, time the
    client's other threads wait for (bench/NOTES.md, session 8)."""
    session = requests.Session()
    env = session.merge_environment_settings(url, {}, None, None, None)  # proxies (no_proxy applied), verify
    session.proxies.update(env["proxies"])
    session.verify = env["verify"]
    session.trust_env = False
    return session


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

"""Operating the deployment through TorchServe's management API: status, scaling, model versions.

:class:`ManagementClient` talks to one TorchServe's management port with the management key (key_file.json, renewed
when it expires, see :class:`eden_client.keys.KeySource`). :func:`collect_status` gathers what an operator looks at
(every version of every model, each worker's state, GPU and memory, the queue, requests served, the server's health)
from the management, inference and metrics ports of one or two servers, as plain dicts; :func:`format_status` makes
the table ``python -m eden_client status`` prints.

Nothing here sends or accepts pickled data: JSON and Prometheus text only.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from urllib.parse import quote, urlparse

import requests

from .errors import ServeError
from .keys import KEY_FILE_ENV, KeySource
from .model_client import _error_of

DEFAULT_MANAGEMENT_URL = "http://127.0.0.1:8081"
DEFAULT_INFERENCE_URL = "http://127.0.0.1:8080"
DEFAULT_METRICS_URL = "http://127.0.0.1:8082"
MANAGEMENT_KEY_ENV = "EDEN_MANAGEMENT_KEY"
MODELS = ("eden_encoder", "eden_ditdec")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Worker counts: TorchServe takes any number (min_worker=-1 answers 500 and leaves the model without workers; 1000
# starts 1000 processes), so the client refuses what makes no sense before it reaches the server.
MAX_WORKERS = 64  # per model version, whatever the host
WORKERS_PER_DEVICE = 4  # per GPU of the archive (or per CPU model); --max-per-device changes it
MEMORY_HEADROOM = 0.8  # share of the host's available memory new workers may take (same host only)


def _local(url: str) -> bool:
    return (urlparse(url).hostname or "") in ("127.0.0.1", "localhost", "::1")


def available_memory() -> int | None:
    """MemAvailable of this host in bytes (None where /proc/meminfo does not say)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def worker_limit(desc: dict, per_device: int = WORKERS_PER_DEVICE, local: bool = False) -> tuple[int, str]:
    """The most workers a model version may be given, and why: ``per_device`` per GPU of the archive (its
    deviceIds, else the GPUs its workers are on; one device for a CPU model), at most MAX_WORKERS, and on the
    same host no more than the available memory holds at the current workers' size (with MEMORY_HEADROOM)."""
    workers = desc.get("workers") or []
    gpus = desc.get("deviceIds") or sorted({g for g in map(gpu_of, workers) if g is not None})
    devices = max(1, len(gpus))
    limit = per_device * devices
    reason = f"{per_device} per device x {devices} {'GPU' if gpus else 'CPU model'}{'s' * (len(gpus) > 1)}"
    sizes = [int(w.get("memoryUsage") or 0) for w in workers]
    available = available_memory() if local else None
    if available and max(sizes, default=0) > 0:
        fits = len(workers) + int(MEMORY_HEADROOM * available // max(sizes))
        if fits < limit:
            limit, reason = fits, (f"host memory: {available / 2**30:.1f} GiB available, "
                                   f"{max(sizes) / 2**20:.0f} MiB per worker")
    if limit > MAX_WORKERS:
        limit, reason = MAX_WORKERS, f"at most {MAX_WORKERS} per model"
    return max(limit, 1), reason


def management_keys(key_file=None, management_url: str | None = None) -> KeySource:
    """The management key: ``$EDEN_MANAGEMENT_KEY`` if set (and no key file is named), else the key file
    (``key_file``, ``$EDEN_KEY_FILE``, ./key_file.json), renewed through ``management_url`` when it expires."""
    if not key_file and os.environ.get(MANAGEMENT_KEY_ENV):
        return KeySource(key=os.environ[MANAGEMENT_KEY_ENV])
    path = key_file or os.environ.get(KEY_FILE_ENV) or "key_file.json"
    return KeySource.default(path, management_url=management_url)


def check_name(value: str, what: str = "model name") -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ServeError(f"{what} {value!r} is not valid: letters, digits, '_', '.', '-' only")
    return value


class ManagementClient:
    """One TorchServe's management API (``GET/PUT/POST/DELETE /models...``)."""

    def __init__(self, url: str = DEFAULT_MANAGEMENT_URL, keys: KeySource | None = None, timeout: float = 60,
                 session: requests.Session | None = None):
        self.url = url.rstrip("/")
        self.keys = keys or management_keys(management_url=self.url)
        self.timeout = timeout
        self.session = session or requests.Session()

    # ------------------------------------------------------------------ transport
    def request(self, method: str, path: str, params: dict | None = None, timeout: float | None = None,
                expect_json: bool = True):
        """One call; JSON answer. On a refused key the key file is read again once (keys rotate and expire)."""
        for attempt in range(2):
            key = self.keys.read("management", fresh=attempt > 0)
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            try:
                r = self.session.request(method, f"{self.url}{path}", params=params, headers=headers,
                                         timeout=timeout or self.timeout)
            except requests.ConnectionError:
                raise ServeError(f"cannot reach TorchServe's management API at {self.url}: is it running, and is "
                                 "the address right? (it listens on localhost only by default)") from None
            except requests.Timeout:
                raise ServeError(f"{self.url}{path} did not answer within {timeout or self.timeout:.0f} s") from None
            if r.ok:
                if not expect_json:
                    return r.text
                try:
                    return r.json()
                except ValueError:
                    return {"status": r.text}
            error = _error_of(r)
            if error.get("type") == "InvalidKeyException":
                if attempt == 0 and not self.keys.key:
                    continue
                raise ServeError(self._key_hint(key), r.status_code)
            raise ServeError(f"{method} {path}: HTTP {r.status_code}: {error.get('message') or r.reason}",
                             r.status_code)
        raise AssertionError("unreachable")

    def _key_hint(self, key: str | None) -> str:
        if key is None:
            problem = f"no management key: {self.keys.key_file} does not exist"
        elif self.keys.key:
            problem = f"TorchServe at {self.url} refused the management key in ${MANAGEMENT_KEY_ENV}"
        else:
            problem = (f"TorchServe at {self.url} refused the management key of {self.keys.key_file} (wrong server, "
                       "or expired: keys last token_expiration_min minutes)")
        return (f"{problem}. TorchServe writes key_file.json in the folder it was started from: pass it with "
                f"--key-file or ${KEY_FILE_ENV}, or the key itself in ${MANAGEMENT_KEY_ENV}; with the server's own "
                "key file an expired key is renewed automatically")

    # ------------------------------------------------------------------ reading
    def models(self) -> list[str]:
        """Names of the registered models."""
        names, token = [], None
        while True:
            body = self.request("GET", "/models", params={"limit": 100, **({"next_page_token": token} if token else {})})
            names += [m["modelName"] for m in body.get("models", [])]
            token = body.get("nextPageToken")
            if not token:
                return sorted(names)

    def model_request(self, method: str, path: str, model: str, version: str | None = None):
        """``request`` on a model's path; a 404 becomes the ServeError saying which model or version is unknown."""
        try:
            return self.request(method, path)
        except ServeError as e:
            if e.status == 404:
                raise self._unknown(model, version) from None
            raise

    def describe(self, model: str, version: str | None = None) -> list[dict]:
        """Every version of ``model`` (or just ``version``), as TorchServe describes them; ServeError if unknown."""
        check_name(model)
        path = f"/models/{quote(model)}/{quote(check_name(version, 'version'))}" if version else \
            f"/models/{quote(model)}/all"
        return self.model_request("GET", path, model, version)

    def default_version(self, model: str) -> str:
        """The version /predictions/MODEL goes to."""
        return self._version_of(model, None)["modelVersion"]

    def _unknown(self, model: str, version: str | None) -> ServeError:
        try:
            known = ", ".join(self.models()) or "none"
        except ServeError:
            known = "?"
        what = f"version {version} of model {model}" if version else f"model {model}"
        return ServeError(f"{what} is not registered on {self.url} (registered models: {known})", 404)

    # ------------------------------------------------------------------ changing
    def scale(self, model: str, workers: int | None = None, min_workers: int | None = None,
              max_workers: int | None = None, version: str | None = None, timeout: float = 300,
              per_device: int = WORKERS_PER_DEVICE) -> dict:
        """Set a model version's worker counts and wait until exactly ``min_workers`` workers are READY.

        ``workers`` sets both; otherwise the ones not given keep their current value. Returns the new description;
        ServeError when a count makes no sense (negative, over MAX_WORKERS, or over ``worker_limit``), the model is
        unknown, or the workers do not come up in ``timeout`` seconds (the message carries the worker states and
        where the log is).
        """
        for name, value in (("--workers", workers), ("--min", min_workers), ("--max", max_workers)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ServeError(f"{name} must be a whole number >= 0, got {value!r}")
            if value is not None and value > MAX_WORKERS:
                raise ServeError(f"{name} {value} is over the limit of {MAX_WORKERS} workers per model")
        if not isinstance(per_device, int) or not 1 <= per_device <= MAX_WORKERS:
            raise ServeError(f"--max-per-device must be between 1 and {MAX_WORKERS}, got {per_device!r}")
        if workers is not None and (min_workers is not None or max_workers is not None):
            raise ServeError("give either --workers N or --min/--max, not both")
        if workers is None and min_workers is None and max_workers is None:
            raise ServeError("nothing to do: give --workers N, or --min and/or --max")
        current = self._version_of(model, version)
        lo = workers if workers is not None else (min_workers if min_workers is not None else current["minWorkers"])
        hi = workers if workers is not None else (max_workers if max_workers is not None else
                                                   max(current["maxWorkers"], lo))
        if lo > hi:
            raise ServeError(f"--min ({lo}) is above --max ({hi})")
        limit, reason = worker_limit(current, per_device, _local(self.url))
        if hi > limit:
            raise ServeError(f"{hi} workers is over the limit of {limit} for {model} {current['modelVersion']} "
                             f"({reason}): ask for fewer, or raise --max-per-device if the devices can hold more")
        path = f"/models/{quote(model)}" + (f"/{quote(version)}" if version else "")
        self.request("PUT", path, params={"min_worker": lo, "max_worker": hi, "synchronous": "true",
                                          "timeout": int(timeout)}, timeout=timeout + 30)
        return self.wait_for_workers(model, current["modelVersion"], lo, timeout)

    def _version_of(self, model: str, version: str | None) -> dict:
        """The description of ``version`` of ``model`` (default: its default version); ServeError if unknown."""
        if version:
            return self.describe(model, version)[0]
        return self.model_request("GET", f"/models/{quote(check_name(model))}", model)[0]

    def wait_for_workers(self, model: str, version: str, count: int, timeout: float = 300) -> dict:
        """Until ``model`` ``version`` has ``count`` workers, all READY; ServeError with their states if not."""
        deadline = time.monotonic() + timeout
        while True:
            desc = self.describe(model, version)[0]
            workers = desc.get("workers", [])
            if len(workers) == count and all(w.get("status") == "READY" for w in workers):
                return desc
            if time.monotonic() > deadline:
                states = ", ".join(f"{w.get('id')}:{w.get('status')}" for w in workers) or "no workers"
                raise ServeError(f"{model} {version}: expected {count} READY worker(s) after {timeout:.0f} s, have "
                                 f"{states}. Look at logs/model_log.log where TorchServe runs (a worker that cannot "
                                 "load its model, e.g. out of GPU memory, is restarted again and again)")
            time.sleep(0.5)

    def register(self, url: str, model_name: str | None = None, initial_workers: int = 1,
                 timeout: float = 300) -> dict:
        """Register an archive (a .mar in the server's model store, by file name or file:// URL).

        Works only where the operator turned on ``enable_model_api`` and the URL matches ``allowed_urls``; the
        refusal says so."""
        if not isinstance(initial_workers, int) or not 0 <= initial_workers <= MAX_WORKERS:
            raise ServeError(f"--workers must be between 0 and {MAX_WORKERS}, got {initial_workers}")
        params = {"url": url, "initial_workers": initial_workers, "synchronous": "true"}
        if model_name:
            params["model_name"] = check_name(model_name)
        try:
            return self.request("POST", "/models", params=params, timeout=timeout + 30)
        except ServeError as e:
            if e.status == 405:
                raise ServeError("registration through the management API is off on this server (enable_model_api="
                                 "false, the safe default): for a rollout set enable_model_api=true in its "
                                 "config.properties and restart, or add the archive to load_models", 405) from None
            if "allowed url" in str(e).lower() or "not allowed in url" in str(e).lower():
                raise ServeError(f"TorchServe refused {url}: only archives in its model store are allowed "
                                 f"(allowed_urls). {e}", e.status) from None
            raise

    def unregister(self, model: str, version: str | None = None, drain_timeout: float = 60.0, quiet_s: float = 5.0,
                   metrics_url: str | None = None) -> dict:
        """Remove a model version once it is idle.

        TorchServe 0.12 has no drain: DELETE stops the version's workers at once, so a request being computed is
        answered 500 and those still queued or being batched are never answered. So the default version is
        refused while other versions exist (make another the default first: new requests then stop coming), and
        the version is removed only after ``quiet_s`` seconds without a queued request, and, with ``metrics_url``,
        without a request arriving or finishing (``ts_inference_requests_total`` / ``ts_inference_latency_
        microseconds``); ServeError if it is not idle within ``drain_timeout`` seconds (nothing is removed)."""
        check_name(model)
        target = check_name(version, "version") if version else self.default_version(model)
        versions = [d["modelVersion"] for d in self.describe(model)]
        if target not in versions:
            raise self._unknown(model, target)
        if target == self.default_version(model) and len(versions) > 1:
            others = ", ".join(v for v in versions if v != target)
            raise ServeError(f"{model} {target} is the default version: make another one the default first "
                             f"(models set-default {model} VERSION; registered: {others}), so that new requests "
                             "stop coming to it, then unregister it")
        self.wait_idle(model, target, drain_timeout, quiet_s, metrics_url)
        path = f"/models/{quote(model)}/{quote(target)}"
        return self.model_request("DELETE", path, model, target)

    def wait_idle(self, model: str, version: str, timeout: float = 60.0, quiet_s: float = 5.0,
                  metrics_url: str | None = None) -> None:
        """Until ``model`` ``version`` has had nothing queued (and, with ``metrics_url``, no request of ``model``
        arriving or finishing) for ``quiet_s`` seconds; ServeError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        last, quiet_since = None, time.monotonic()
        while True:
            queue = (self.describe(model, version)[0].get("jobQueueStatus") or {}).get("pendingRequests") or 0
            state = (queue, self._activity(model, metrics_url))
            now = time.monotonic()
            if state != last or queue:
                last, quiet_since = state, now
            if now - quiet_since >= quiet_s:
                return
            if now > deadline:
                raise ServeError(f"{model} {version} is still busy after {timeout:.0f} s ({queue} request(s) queued, "
                                 "others arriving or finishing): nothing was removed. Stop sending requests to it "
                                 "(set another default version) and try again, or raise --drain-timeout", 409)
            time.sleep(0.2)

    @staticmethod
    def _activity(model: str, metrics_url: str | None) -> tuple | None:
        """Counters that move when a request of ``model`` arrives or is answered (None without metrics)."""
        if not metrics_url:
            return None
        try:
            metrics = parse_prometheus(requests.get(f"{metrics_url.rstrip('/')}/metrics", timeout=10).text)
        except requests.RequestException:
            return None
        return tuple(sum(v for labels, v in metrics.get(name, []) if labels.get("model_name") == model)
                     for name in ("ts_inference_requests_total", "ts_inference_latency_microseconds"))

    def set_default(self, model: str, version: str) -> dict:
        path = f"/models/{quote(check_name(model))}/{quote(check_name(version, 'version'))}/set-default"
        return self.model_request("PUT", path, model, version)


# ---------------------------------------------------------------------- status
@dataclass
class Server:
    """The addresses of one TorchServe instance and its key file (None: $EDEN_KEY_FILE, else ./key_file.json;
    $EDEN_MANAGEMENT_KEY / $EDEN_INFERENCE_KEY give keys directly)."""
    management_url: str = DEFAULT_MANAGEMENT_URL
    inference_url: str | None = DEFAULT_INFERENCE_URL
    metrics_url: str | None = DEFAULT_METRICS_URL
    key_file: str | os.PathLike | None = None
    label: str = ""

    def management(self) -> ManagementClient:
        return ManagementClient(self.management_url, management_keys(self.key_file, self.management_url))

    def inference_keys(self) -> KeySource:
        return KeySource.default(self.key_file, management_url=self.management_url)


def gpu_of(worker: dict) -> int | None:
    """The GPU id of a worker from its ``gpuUsage`` ("gpuId::1 utilization.gpu [%]::..."), None on CPU."""
    m = re.search(r"gpuId::(\d+)", str(worker.get("gpuUsage") or ""))
    return int(m.group(1)) if m else None


def parse_prometheus(text: str) -> dict[str, list[tuple[dict, float]]]:
    """Prometheus text format -> metric name -> [(labels, value)]."""
    out: dict[str, list[tuple[dict, float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)", line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        try:
            out.setdefault(m.group(1), []).append((labels, float(m.group(3))))
        except ValueError:
            continue
    return out


def requests_served(metrics: dict, model: str) -> int | None:
    """Requests a model answered since the server started (``ts_inference_requests_total``, all versions)."""
    rows = metrics.get("ts_inference_requests_total")
    if rows is None:
        return None
    return int(sum(v for labels, v in rows if labels.get("model_name") == model))


def health(server: Server) -> str:
    """``/ping`` on the inference port (it needs the inference key): Healthy, Unhealthy, or why it is unknown."""
    if not server.inference_url:
        return "not checked"
    try:
        key = server.inference_keys().read("inference")
        r = requests.get(f"{server.inference_url.rstrip('/')}/ping", timeout=10,
                         headers={"Authorization": f"Bearer {key}"} if key else {})
    except requests.RequestException:
        return "unreachable"
    except ServeError as e:
        return f"unknown ({e})"
    if r.status_code == 400 and _error_of(r).get("type") == "InvalidKeyException":
        return "unknown (inference key refused)"
    try:
        return str(r.json().get("status", r.status_code))
    except ValueError:
        return f"HTTP {r.status_code}"


def collect_status(servers: list[Server]) -> dict:
    """Everything ``status`` shows, as JSON-ready dicts straight from the management API (plus health and
    requests served from the inference and metrics ports)."""
    out = []
    for server in servers:
        client = server.management()
        metrics: dict = {}
        if server.metrics_url:
            try:
                metrics = parse_prometheus(requests.get(f"{server.metrics_url.rstrip('/')}/metrics",
                                                        timeout=10).text)
            except requests.RequestException:
                metrics = {}
        entry = {"label": server.label, "management_url": client.url, "inference_url": server.inference_url,
                 "metrics_url": server.metrics_url, "health": health(server), "models": []}
        for name in client.models():
            default = client.default_version(name)
            served = requests_served(metrics, name)
            for desc in client.describe(name):
                queue = desc.get("jobQueueStatus") or {}
                entry["models"].append({
                    "model": name, "version": desc["modelVersion"], "default": desc["modelVersion"] == default,
                    "minWorkers": desc.get("minWorkers"), "maxWorkers": desc.get("maxWorkers"),
                    "batchSize": desc.get("batchSize"), "maxBatchDelay": desc.get("maxBatchDelay"),
                    "deviceType": desc.get("deviceType"), "deviceIds": desc.get("deviceIds"),
                    "pendingRequests": queue.get("pendingRequests"),
                    "remainingCapacity": queue.get("remainingCapacity"),
                    "requestsServed": served,
                    "workers": [{"id": w.get("id"), "status": w.get("status"), "pid": w.get("pid"),
                                 "gpu": bool(w.get("gpu")), "gpuId": gpu_of(w), "gpuUsage": w.get("gpuUsage"),
                                 "memoryUsage": w.get("memoryUsage"), "startTime": w.get("startTime")}
                                for w in desc.get("workers", [])]})
        out.append(entry)
    return {"servers": out}


def _table(rows: list[list[str]], indent: str = "") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _mb(value) -> str:
    try:
        return f"{int(value) / 2**20:.0f} MiB" if value else "-"
    except (TypeError, ValueError):
        return str(value)


def _gpu_usage(worker: dict) -> str:
    """TorchServe's "gpuId::1 utilization.gpu [%]::37 % memory.used [MiB]::10240 MiB" -> "37% 10240 MiB"."""
    usage = str(worker.get("gpuUsage") or "N/A")
    if usage == "N/A":
        return "-"
    util = re.search(r"utilization\.gpu \[%\]::\s*(\d+)", usage)
    mem = re.search(r"memory\.used \[MiB\]::\s*(\d+)", usage)
    if not (util or mem):
        return usage
    return " ".join(x for x in ((util and f"{util.group(1)}%"), (mem and f"{mem.group(1)} MiB")) if x)


def format_status(status: dict) -> str:
    """The readable table: one block per server, one line per model version, one per worker under it."""
    lines = []
    for s in status["servers"]:
        title = f"TorchServe {s['management_url']}" + (f" ({s['label']})" if s.get("label") else "")
        lines.append(f"{title}   health: {s['health']}")
        if not s["models"]:
            lines.append("  no models registered")
        rows = [["MODEL", "VERSION", "WORKERS", "MIN/MAX", "BATCH", "DEVICES", "QUEUE", "SERVED"]]
        for m in s["models"]:
            ready = sum(w["status"] == "READY" for w in m["workers"])
            devices = (f"gpu {','.join(map(str, m['deviceIds']))}" if m.get("deviceIds") else
                       "gpu" if m.get("deviceType") == "gpu" else "cpu")
            rows.append([m["model"], m["version"] + (" (default)" if m["default"] else ""),
                         f"{ready}/{len(m['workers'])} ready", f"{m['minWorkers']}/{m['maxWorkers']}",
                         f"{m['batchSize']} / {m['maxBatchDelay']} ms", devices, str(m["pendingRequests"]),
                         "-" if m["requestsServed"] is None else str(m["requestsServed"])])
        if len(rows) > 1:
            lines += _table(rows, "  ")
        wrows = [["MODEL", "VERSION", "WORKER", "STATUS", "PID", "GPU", "GPU USAGE", "MEMORY", "STARTED"]]
        for m in s["models"]:
            for w in m["workers"]:
                wrows.append([m["model"], m["version"], str(w["id"]), str(w["status"]), str(w["pid"]),
                              "cpu" if w["gpuId"] is None and not w["gpu"] else
                              f"cuda:{w['gpuId']}" if w["gpuId"] is not None else "gpu",
                              _gpu_usage(w), _mb(w["memoryUsage"]), str(w["startTime"])])
        if len(wrows) > 1:
            lines.append("")
            lines += _table(wrows, "  ")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"

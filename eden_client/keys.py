"""TorchServe's keys for the HTTP calls to the two served models.

TorchServe writes the keys to ``key_file.json`` in the folder it was started from; a key can also come from the
environment (EDEN_INFERENCE_KEY). Keys expire (60 minutes by default): on a refused key the client reads the key
file again and retries once, so a long run survives a restart or a key rotation; given the management URL
(EDEN_MANAGEMENT_URL), KeySource also renews an expired key itself with the key file's API key.
"""
from __future__ import annotations

import json
import logging
import os
import re
import stat
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import requests

from .errors import ServeError

KEY_FILE_ENV = "EDEN_KEY_FILE"
KEY_ENV = "EDEN_INFERENCE_KEY"
MANAGEMENT_URL_ENV = "EDEN_MANAGEMENT_URL"  # lets KeySource renew expired keys (see KeySource)
RESTAT_S = 0.25  # the key file looked at again at most this often (a refused key reads it at once: read(fresh=True))

log = logging.getLogger(__name__)


@dataclass
class KeySource:
    """Where a TorchServe key comes from: an explicit key, or a key file read again whenever it changes.

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
    _parsed: tuple | None = field(default=None, repr=False, compare=False)  # (the file's stat, its entries, when)

    @classmethod
    def default(cls, key_file: str | os.PathLike | None = None,
                management_url: str | None = None) -> "KeySource":
        url = management_url or os.environ.get(MANAGEMENT_URL_ENV) or None
        if key_file:
            return cls(key_file=Path(key_file), management_url=url)
        if os.environ.get(KEY_ENV):
            return cls(key=os.environ[KEY_ENV])
        return cls(key_file=Path(os.environ.get(KEY_FILE_ENV, "key_file.json")), management_url=url)

    def entries(self, fresh: bool = False) -> dict | None:
        """The parsed key file (None if there is none); ServeError if it is not a TorchServe key file. Parsed again
        only when the file's stat changes, which is looked at most every RESTAT_S (a video run asks for the key
        hundreds of times a second, and each system call waits for the interpreter lock again), or ``fresh``."""
        if self.key_file is None:
            return None
        parsed, now = self._parsed, time.monotonic()
        if not fresh and parsed is not None and now - parsed[2] < RESTAT_S:
            return parsed[1]
        try:
            st = os.stat(self.key_file)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if not fresh and parsed is not None and parsed[0] == stamp:
            self._parsed = (stamp, parsed[1], now)
            return parsed[1]
        for attempt in range(2):  # TorchServe rewrites the file in place on renewal: a read may catch it half-done
            try:
                data = json.loads(self.key_file.read_text())
                if isinstance(data, dict):
                    self._parsed = (stamp, data, now)  # (the stat from before the read: a later rewrite changes it)
                    return data
            except ValueError:
                pass
            time.sleep(0.2)
        raise ServeError(f"{self.key_file} is not a TorchServe key file (expected JSON like "
                         "{'inference': {'key': ...}, 'management': {'key': ...}})")

    def read(self, kind: str = "inference", fresh: bool = False) -> str | None:
        """The current ``kind`` key ("inference" or "management"), renewed first if it has expired (see above);
        ``fresh``: the file read again even if its stat did not change (after the server refused the key)."""
        if self.key:
            return self.key
        data = self.entries(fresh)
        if data is None:
            return None
        if self.management_url and self.expired(data, kind):
            with self._lock:  # one renewal for all threads: each renewal invalidates the previous key
                data = self.entries(fresh=True) or data
                if self.expired(data, kind) and self.renew(kind, data):
                    data = self.entries(fresh=True) or data
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


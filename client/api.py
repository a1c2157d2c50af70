"""HTTP calls to the two served models, with TorchServe's token authorization.

TorchServe writes the keys to ``key_file.json`` in the folder it was started from; a key can also come from the
environment (EDEN_INFERENCE_KEY). Keys expire (60 minutes by default): on a refused key the client reads the key
file again and retries once, so a long run survives a restart or a key rotation.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import requests

from eden_serve.images import decode_image, encode_png

DEFAULT_URL = "http://127.0.0.1:8080"
KEY_FILE_ENV = "EDEN_KEY_FILE"
KEY_ENV = "EDEN_INFERENCE_KEY"


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


class ModelClient:
    """One served model: POST {url}/predictions/{model}."""

    def __init__(self, url: str = DEFAULT_URL, model: str = "", keys: KeySource | None = None, timeout: float = 600,
                 session: requests.Session | None = None):
        self.url = url.rstrip("/")
        self.model = model
        self.keys = keys or KeySource.default()
        self.timeout = timeout
        self.session = session or requests.Session()

    @property
    def endpoint(self) -> str:
        return f"{self.url}/predictions/{self.model}"

    def predict(self, *, data: bytes | None = None, files: dict | None = None,
                headers: dict | None = None) -> requests.Response:
        for attempt in range(2):
            key = self.keys.read("inference")
            sent = dict(headers or {})
            if key:
                sent["Authorization"] = f"Bearer {key}"
            try:
                r = self.session.post(self.endpoint, data=data, files=files, headers=sent, timeout=self.timeout)
            except requests.ConnectionError:
                raise ServeError(f"cannot reach TorchServe at {self.url}: is it running, and is the address right?")
            except requests.Timeout:
                raise ServeError(f"{self.endpoint} did not answer within {self.timeout:.0f} s")
            if r.ok:
                return r
            error = _error_of(r)
            if error.get("type") == "InvalidKeyException":
                if attempt == 0 and not self.keys.key:
                    continue  # the key may have been rotated or renewed: read the file again
                where = self.keys.describe()
                problem = f"no key: {self.keys.key_file} does not exist" if key is None else f"TorchServe refused {where}"
                hint = (f"{problem}. TorchServe writes key_file.json in the folder it was started from: pass it "
                        f"with --key-file or ${KEY_FILE_ENV}, or the key itself in ${KEY_ENV}")
                raise ServeError(hint, r.status_code)
            raise ServeError(f"{self.model}: HTTP {r.status_code}: {error.get('message') or r.reason}", r.status_code)
        raise AssertionError("unreachable")


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

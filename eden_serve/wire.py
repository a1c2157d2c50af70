"""The token wire format: what the encoder returns and the DiT+decoder reads. NumPy only, no pickle.

A blob holds K frames of one size (K >= 1) with everything the DiT+decoder needs besides the noise::

    offset 0   magic  b"EDENTOKS"                       8 bytes
           8   version                                 uint32 little-endian: 1, or 2 for int8 tokens (below)
          12   header length in bytes                  uint32 little-endian (at most 64 KiB)
          16   header: UTF-8 JSON object, padded with spaces so the payload starts at a multiple of 64
        then   payload: tokens [K, 2, N, D] in C order, little-endian float16 or float32;
               [k, 0] are frame k's DiT tokens, [k, 1] its decoder tokens, N = grid_h * grid_w

Version 2 adds dtype "int8" (8-bit tokens, docs/tokens-across-hosts.md): each token is a row of D + 4 bytes, its D
values as int8 then its scale as a little-endian float32, and value = int8 x scale (absmax per token: the largest
|value| of the token is 127 x scale). The payload is then [K, 2, N, D + 4] bytes; ``shape`` still says D. A scale
belongs to its token, so frames and pairs are sliced out of a blob exactly as with float tokens. Scales must be
finite, >= 0 and at most MAX_SCALE (refused otherwise). A writer writes version 1 for float blobs (readers of
version 1 read them) and version 2 for int8 ones; this module reads both.

Header fields (all required)::

    dtype         "float16" | "float32"
    shape         [K, 2, N, D]
    patch_size    pixels per patch side
    grid          [grid_h, grid_w] patch grid of the padded frame
    size          [height, width] of the original frame
    padding       [left, right, top, bottom] replicate padding that made the padded frame
    mean, std     K floats: each frame's normalisation statistics (over the padded frame)
    differences   K-1 floats: the DiT's difference input between frames k and k+1
    encoder       fingerprint of the encoder weights that made the tokens ("" if unknown)
    lead_difference  (only in an answer to a request with a lead frame) the difference input between the lead frame,
                  sent before the K for this alone, and frame 0

Everything per frame is independent of the other frames, so frames of a video can be encoded once each and any
two assembled into a pair later (``TokenBlob.pair``); the pair's difference comes from the blob that held both,
or from ``differences`` computed where both frames' pixels are. The bytes are the same over HTTP or shared memory.
"""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field

import numpy as np

from .protocol import TOKENS_CONTENT_TYPE

MAGIC = b"EDENTOKS"
VERSION = 2  # the newest this module reads and writes (a float blob is still written as version 1)
VERSIONS = (1, 2)
INT8 = "int8"
SCALE_BYTES = 4  # an int8 token's float32 scale, after its D values
PREFIX = struct.Struct("<8sII")
ALIGN = 64
MAX_HEADER_BYTES = 64 * 1024
MAX_FRAMES = 256
# Bounds checked before anything is built from a header: no dimension of a real frame comes near them, and every
# product of them fits in 64 bits.
MAX_SIDE = 1 << 20  # pixels of a frame's side (and of its padding)
MAX_GRID = 1 << 16  # patches along a side
MAX_PATCH = 1 << 10  # pixels of a patch's side
MAX_TOKENS = 1 << 32  # tokens of a frame
MAX_HIDDEN = 1 << 16  # values of a token
MAX_STATISTIC = 1e6  # |mean|, std, |difference|: statistics of frames in [0, 1] are far below (and float32 holds it)
# What JSON read from a request may cost before it is parsed (headers, references, device segments): nesting depth
# (Python's parser recurses once per level) and digits of one number (int() of thousands of digits is quadratic,
# and 10**400 does not fit a float).
MAX_JSON_DEPTH = 8
MAX_JSON_DIGITS = 40
DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4"), INT8: np.dtype("i1")}
MAX_SCALE = MAX_STATISTIC / 127  # an int8 token's scale: its values stay within +-MAX_STATISTIC
CONTENT_TYPE = TOKENS_CONTENT_TYPE  # eden_serve/protocol.py


class WireError(ValueError):
    """A blob that is not a valid token blob; the message says what is wrong."""


@dataclass
class TokenBlob:
    tokens: np.ndarray  # [K, 2, N, D] float16 or float32, or int8 [K, 2, N, D + 4] (values and scale per token)
    size: tuple[int, int]  # original (height, width)
    padding: tuple[int, int, int, int]  # left, right, top, bottom
    patch_size: int
    mean: list[float]
    std: list[float]
    differences: list[float] = field(default_factory=list)
    encoder: str = ""
    lead_difference: float | None = None  # the lead frame's (sent only for this) with frame 0: see the module's doc

    # ------------------------------------------------------------------ derived
    @property
    def num_frames(self) -> int:
        return self.tokens.shape[0]

    @property
    def hidden_dim(self) -> int:
        return self.tokens.shape[3] - (SCALE_BYTES if self.dtype == INT8 else 0)

    @property
    def shape(self) -> list[int]:
        """[K, 2, N, D] (the header's): the int8 rows' scale bytes are not values."""
        return [*self.tokens.shape[:3], self.hidden_dim]

    @property
    def version(self) -> int:
        return 2 if self.dtype == INT8 else 1

    @property
    def dtype(self) -> str:
        return self.tokens.dtype.name

    @property
    def padded_size(self) -> tuple[int, int]:
        left, right, top, bottom = self.padding
        return self.size[0] + top + bottom, self.size[1] + left + right

    @property
    def grid(self) -> tuple[int, int]:
        return self.padded_size[0] // self.patch_size, self.padded_size[1] // self.patch_size

    def header(self) -> dict:
        return {"dtype": self.dtype, "shape": self.shape, "patch_size": self.patch_size,
                "grid": list(self.grid), "size": list(self.size), "padding": list(self.padding),
                "mean": [float(m) for m in self.mean], "std": [float(s) for s in self.std],
                "differences": [float(d) for d in self.differences], "encoder": self.encoder,
                **({} if self.lead_difference is None else {"lead_difference": float(self.lead_difference)})}

    # ------------------------------------------------------------------ assembling pairs
    def frame(self, k: int) -> "TokenBlob":
        """Frame k alone (no differences); its tokens are a view, not a copy."""
        return TokenBlob(self.tokens[k:k + 1], self.size, self.padding, self.patch_size, [self.mean[k]],
                         [self.std[k]], [], self.encoder)

    def window(self, k: int, difference: float | None = None) -> "TokenBlob":
        """Frames k and k+1 as a pair (a view, no copy); the difference is the blob's own unless given."""
        if not 0 <= k < self.num_frames - 1:
            raise WireError(f"no frames {k} and {k + 1} in a blob of {self.num_frames}")
        diff = self.differences[k] if difference is None else float(difference)
        return TokenBlob(self.tokens[k:k + 2], self.size, self.padding, self.patch_size, self.mean[k:k + 2],
                         self.std[k:k + 2], [diff], self.encoder)

    @staticmethod
    def pair(first: "TokenBlob", second: "TokenBlob", difference: float, copy: bool = True) -> "TokenBlob":
        """Two single frames (``frame(k)`` of any blobs of the same size and encoder) -> a pair blob; with
        ``copy=False`` its tokens are only a shape (for a reader that takes the tokens from elsewhere)."""
        for name in ("size", "padding", "patch_size", "encoder"):
            if getattr(first, name) != getattr(second, name):
                raise WireError(f"cannot pair frames with different {name}: {getattr(first, name)} vs "
                                f"{getattr(second, name)}")
        if first.tokens.dtype != second.tokens.dtype or first.tokens.shape[1:] != second.tokens.shape[1:]:
            raise WireError("cannot pair frames with different token dtype or shape")
        tokens = (np.concatenate([first.tokens[-1:], second.tokens[:1]]) if copy
                  else shape_only((2, *first.tokens.shape[1:]), first.dtype))
        return TokenBlob(tokens, first.size, first.padding,
                         first.patch_size, [first.mean[-1], second.mean[0]], [first.std[-1], second.std[0]],
                         [float(difference)], first.encoder)

    # ------------------------------------------------------------------ bytes
    def to_bytes(self) -> bytes:
        return b"".join(self.to_buffers())

    def header_bytes(self) -> bytes:
        """Prefix and padded header: the payload follows at ``len(header_bytes())`` (a multiple of 64)."""
        head = json.dumps(self.header(), separators=(",", ":")).encode()
        head += b" " * (-(PREFIX.size + len(head)) % ALIGN)
        return PREFIX.pack(MAGIC, self.version, len(head)) + head

    def to_buffers(self) -> list:
        """The blob as [prefix+header bytes, payload memoryview]: write them in order, no copy of the tokens."""
        tokens = np.ascontiguousarray(self.tokens, dtype=DTYPES[self.dtype])
        return [self.header_bytes(), memoryview(tokens).cast("B")]

    @property
    def nbytes(self) -> int:
        return len(self.header_bytes()) + self.tokens.nbytes


def shape_only(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """An array of ``shape`` and ``dtype`` that owns no memory (every element is the same zero): for a blob's
    header before its tokens exist (``TokenBlob.header_bytes``)."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, DTYPES[dtype]), shape, (0,) * len(shape), writeable=False)


def expected_nbytes(num_frames: int, height: int, width: int, hidden_dim: int, dtype: str = "float16",
                    pad_multiple: int = 32, patch_size: int = 16) -> int:
    """Payload size of a blob of ``num_frames`` frames of height x width (the header is at most 64 KiB more)."""
    ph, pw = math.ceil(height / pad_multiple) * pad_multiple, math.ceil(width / pad_multiple) * pad_multiple
    row = hidden_dim + SCALE_BYTES if dtype == INT8 else hidden_dim * DTYPES[dtype].itemsize
    return num_frames * 2 * (ph // patch_size) * (pw // patch_size) * row


# ---------------------------------------------------------------------- 8-bit tokens (version 2)
def quantize(tokens: np.ndarray) -> np.ndarray:
    """Float tokens [..., D] -> int8 rows [..., D + 4]: round(value / scale) then the float32 scale, with scale =
    absmax / 127 per token (0 for a token of zeros). NumPy twin of ``eden_serve.tokens.quantize``."""
    x = np.asarray(tokens, np.float32)
    scale = np.abs(x).max(axis=-1, keepdims=True) / 127
    q = np.rint(np.divide(x, scale, out=np.zeros_like(x), where=scale > 0)).clip(-127, 127).astype(np.int8)
    return np.concatenate([q, scale.astype("<f4").view(np.int8)], axis=-1)


def scales(rows: np.ndarray) -> np.ndarray:
    """The float32 scales [...] of int8 rows [..., D + 4] (a copy)."""
    return np.ascontiguousarray(rows[..., -SCALE_BYTES:]).view("<f4")[..., 0]


def dequantize(rows: np.ndarray) -> np.ndarray:
    """int8 rows [..., D + 4] -> float32 tokens [..., D]."""
    return rows[..., :-SCALE_BYTES].astype(np.float32) * scales(rows)[..., None]


def check_scales(values: np.ndarray) -> None:
    """Refuse scales that are not finite, negative or over MAX_SCALE (WireError)."""
    if not np.isfinite(values).all():
        raise WireError("int8 tokens have scales that are not finite")
    if values.size and (values.min() < 0 or values.max() > MAX_SCALE):
        raise WireError(f"int8 tokens have scales outside [0, {MAX_SCALE:g}]")


# ---------------------------------------------------------------------- parsing
_JSON_STRING = re.compile(rb'"(?:[^"\\\x00-\x1f]|\\.)*"')
_NOT_BRACKET = re.compile(rb"[^\[\]{}]")
_DIGITS = re.compile(rb"[0-9]+")


def load_json(data, what: str, error: type[Exception] = None):
    """JSON from a request (bytes), refused with ``error`` (default WireError) naming ``what`` if it is not UTF-8
    JSON, or nests deeper than MAX_JSON_DEPTH, or has a number of more than MAX_JSON_DIGITS digits: both are
    checked on the text, before the parser sees it."""
    error = error or WireError
    text = bytes(data)
    bare = _JSON_STRING.sub(b'""', text)  # strings hold neither structure nor numbers
    brackets = np.frombuffer(_NOT_BRACKET.sub(b"", bare), np.uint8)
    if len(brackets):
        opens = (brackets == ord("[")) | (brackets == ord("{"))
        depth = int(np.cumsum(opens.astype(np.int64) * 2 - 1).max())
        if depth > MAX_JSON_DEPTH:
            raise error(f"{what} nests {depth} levels deep: at most {MAX_JSON_DEPTH}")
    longest = max((len(m) for m in _DIGITS.findall(bare)), default=0)
    if longest > MAX_JSON_DIGITS:
        raise error(f"{what} has a number of {longest} digits: at most {MAX_JSON_DIGITS}")
    try:
        return json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise error(f"{what} is not valid JSON: {e}") from None


def _int_list(h: dict, key: str, n: int, minimum: int = 0, maximum: int = MAX_SIDE) -> list[int]:
    v = h.get(key)
    if not isinstance(v, list) or len(v) != n or not all(type(x) is int and minimum <= x <= maximum for x in v):
        raise WireError(f"header field '{key}' must be a list of {n} integers >= {minimum} and <= {maximum}, "
                        f"got {v!r:.80}")
    return v


def _float_list(h: dict, key: str, n: int, positive: bool = False) -> list[float]:
    v = h.get(key)
    if not isinstance(v, list) or len(v) != n or not all(type(x) in (int, float) for x in v):
        raise WireError(f"header field '{key}' must be a list of {n} numbers, got {v!r:.80}")
    if not all(math.isfinite(x) and (x > 0 or not positive) for x in v):
        raise WireError(f"header field '{key}' has values that are not finite{' and positive' if positive else ''}")
    if not all(abs(x) <= MAX_STATISTIC for x in v):
        raise WireError(f"header field '{key}' has values beyond +-{MAX_STATISTIC:g} (statistics of frames in [0, 1])")
    return [float(x) for x in v]


def from_bytes(buf) -> TokenBlob:
    """Parse and check a blob (bytes, bytearray or memoryview). The tokens are a read-only view of ``buf``.

    Checks structure only (every length and field); whether the token values are finite is checked where they are
    used, on the device.
    """
    buf = memoryview(buf).cast("B")
    blob, start = parse_head(buf)
    blob.tokens = np.frombuffer(buf[start:], dtype=blob.tokens.dtype).reshape(blob.tokens.shape)
    if blob.dtype == INT8:
        check_scales(scales(blob.tokens))
    return blob


def parse_head(buf, total: int | None = None) -> tuple[TokenBlob, int]:
    """Check the prefix and header at the start of a blob of ``total`` bytes (default: ``len(buf)``; ``buf`` needs
    to hold only the prefix and header) -> (blob whose tokens are only a shape, offset of the payload)."""
    buf = memoryview(buf).cast("B")
    total = len(buf) if total is None else total
    if total < PREFIX.size or len(buf) < PREFIX.size:
        raise WireError(f"not a token blob: {total} bytes is shorter than the {PREFIX.size}-byte prefix")
    magic, version, head_len = PREFIX.unpack_from(buf)
    if magic != MAGIC:
        raise WireError(f"not a token blob: bad magic {bytes(magic)!r} (expected {MAGIC!r})")
    if version not in VERSIONS:
        raise WireError(f"unsupported token format version {version}: this server reads versions "
                        f"{', '.join(map(str, VERSIONS))}")
    if head_len > MAX_HEADER_BYTES or PREFIX.size + head_len > min(total, len(buf)):
        raise WireError(f"header length {head_len} is larger than the blob ({total} bytes) "
                        f"or the {MAX_HEADER_BYTES}-byte limit")
    blob = from_header(load_json(buf[PREFIX.size:PREFIX.size + head_len], "header"), version)
    K, _, N, D = blob.shape
    start = PREFIX.size + head_len
    expected = blob.tokens.nbytes
    got = total - start
    if got < expected:
        raise WireError(f"truncated token blob: {got} payload bytes, expected {expected} for shape {[K, 2, N, D]}")
    if got > expected:
        raise WireError(f"{got - expected} unexpected trailing bytes after the {expected}-byte token payload")
    return blob, start


def from_header(h, version: int = VERSION) -> TokenBlob:
    """Check a decoded header (every field) of a blob of format ``version`` -> a blob whose tokens are only a shape
    (``shape_only``)."""
    if not isinstance(h, dict):
        raise WireError("header is not a JSON object")
    dtype = h.get("dtype")
    known = sorted(d for d in DTYPES if version >= 2 or d != INT8)
    if dtype not in known:
        raise WireError(f"header field 'dtype' must be one of {known} in format version {version}, "
                        f"got {dtype!r:.40}")
    K, two, N, D = _int_list(h, "shape", 4, minimum=1, maximum=MAX_TOKENS)
    if two != 2 or K > MAX_FRAMES or D > MAX_HIDDEN:
        raise WireError(f"shape must be [K <= {MAX_FRAMES}, 2, N, D <= {MAX_HIDDEN}], got {[K, two, N, D]}")
    patch = h.get("patch_size")
    if type(patch) is not int or not 1 <= patch <= MAX_PATCH:
        raise WireError(f"header field 'patch_size' must be an integer from 1 to {MAX_PATCH}, got {patch!r:.40}")
    gh, gw = _int_list(h, "grid", 2, minimum=1, maximum=MAX_GRID)
    height, width = _int_list(h, "size", 2, minimum=1)
    left, right, top, bottom = _int_list(h, "padding", 4)
    if (height + top + bottom, width + left + right) != (gh * patch, gw * patch):
        raise WireError(f"size {height}x{width} with padding {[left, right, top, bottom]} is not the "
                        f"{gh}x{gw} grid of {patch}-pixel patches")
    if gh % 2 or gw % 2 or N != gh * gw:
        raise WireError(f"grid {gh}x{gw} must be even and hold the shape's {N} tokens")
    mean = _float_list(h, "mean", K)
    std = _float_list(h, "std", K, positive=True)
    differences = _float_list(h, "differences", K - 1)
    encoder = h.get("encoder")
    if not isinstance(encoder, str) or len(encoder) > 128:
        raise WireError("header field 'encoder' must be a string")
    lead = _float_list({"lead_difference": [h["lead_difference"]]}, "lead_difference", 1)[0] \
        if "lead_difference" in h else None
    row = D + SCALE_BYTES if dtype == INT8 else D
    return TokenBlob(shape_only((K, 2, N, row), dtype), (height, width), (left, right, top, bottom), patch, mean, std,
                     differences, encoder, lead)

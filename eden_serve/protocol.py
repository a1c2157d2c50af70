"""The HTTP protocol between the client and the two handlers, in one place: header names and values, content types,
error types, the body limit and seed parsing. The handlers (eden_serve/service.py and the two services, eden_serve/shm.py), the client
(eden_client/api.py, eden_client/model_client.py, eden_client/transport.py) and the forwarder (deploy/keyproxy.py) all take them from here.

Imports nothing but the standard library (no torch, no NumPy): the client and the forwarder read it cheaply.
The wire format of the token blobs themselves is eden_serve/wire.py; shared-memory references are eden_serve/shm.py.
"""
from __future__ import annotations

# ---------------------------------------------------------------------- headers
# TorchServe does not pass query parameters to /predictions handlers, hence headers. Names are matched whatever
# their case (eden_serve/service.py, request_header).
CONTENT_TYPE = "Content-Type"
SEED = "X-Eden-Seed"  # request: the noise seed (0 <= N <= MAX_SEED); answer: the seed that made the frame
FORMAT = "X-Eden-Format"  # DiT+decoder request: FORMAT_PNG (default) or FORMAT_RAW
TOKEN_DTYPE = "X-Eden-Token-Dtype"  # encoder request: float16 (default) or float32 (or the form field "dtype")
REPLY = "X-Eden-Reply"  # request: REPLY_SHM asks for the answer as a shared-memory reference (same host only)
HANDOFF = "X-Eden-Handoff"  # encoder request with REPLY_SHM: HANDOFF_DEVICE keeps the tokens on its GPU
# Set by deploy/keyproxy.py on everything it forwards: such a request came from another host, so it may neither
# name shared-memory segments nor ask for its answer in one (the handlers refuse it).
REMOTE = "X-Eden-Remote"
REPLY_CONTENT_TYPE = "X-Eden-Content-Type"  # answer through shared memory: the content type of the referenced bytes
DEVICE = "X-Eden-Device"  # answer: the worker's device
BATCH = "X-Eden-Batch"  # answer: requests in the worker's batch
STAGES = "X-Eden-Stages"  # answer: "name:milliseconds,..." per handler stage of the batch

# The headers a client sends; those that only make sense on the server's own host; those that may cross hosts
# (what deploy/keyproxy.py forwards).
CLIENT_REQUEST_HEADERS = (CONTENT_TYPE, SEED, FORMAT, TOKEN_DTYPE, REPLY, HANDOFF)
SAME_HOST_HEADERS = (REPLY, HANDOFF)
REMOTE_REQUEST_HEADERS = tuple(h for h in CLIENT_REQUEST_HEADERS if h not in SAME_HOST_HEADERS)

FORMAT_PNG, FORMAT_RAW = "png", "raw"
FORMATS = (FORMAT_PNG, FORMAT_RAW)
REPLY_SHM = "shm"
HANDOFF_DEVICE, HANDOFF_HOST = "device", "host"

# ---------------------------------------------------------------------- content types
TOKENS_CONTENT_TYPE = "application/x-eden-tokens"  # a token blob (eden_serve/wire.py)
RAW_FRAME_CONTENT_TYPE = "application/x-eden-rgb24"  # a raw RGB frame (eden_serve/images.py, encode_raw)
REFERENCE_CONTENT_TYPE = "application/x-eden-ref"  # a shared-memory reference (eden_serve/shm.py, make_ref)
PAIR_CONTENT_TYPE = "application/x-eden-pair"  # a pair's frames inline or named by hash (eden_serve/framerefs.py)
PNG_CONTENT_TYPE = "image/png"

# ---------------------------------------------------------------------- errors
# Errors are JSON {"code", "type", "message"}; "type" is one of these for the handlers' own errors.
BAD_INPUT = "BadInput"  # the default under 500: the request itself is wrong
UNAVAILABLE = "Unavailable"  # the default from 500
HANDOFF_UNAVAILABLE = "HandoffUnavailable"  # a DiT+decoder that cannot use handed-off tokens at all (400)
FRAME_NOT_CACHED = "FrameNotCached"  # a frame named by hash is not in this worker's cache (409: send it inline)
SHM_FOLDER_UNSAFE = "ShmFolderUnsafe"  # a server that refuses its shared-memory folder (500, no retry helps)
INTERNAL_ERROR = "InternalError"  # a fault of the server (500), logged with its traceback
NOT_RETRIED = frozenset({BAD_INPUT, SHM_FOLDER_UNSAFE})  # handler error types a retry cannot fix, even as a 5xx

# ---------------------------------------------------------------------- limits
# TorchServe's request and response body limit: config.properties and deploy/*/config.properties keep the literal
# number in max_request_size / max_response_size (tests/test_deploy.py checks they equal this).
MAX_BODY_BYTES = 256 * 1024 * 1024
MAX_SEED = 2**63 - 1  # X-Eden-Seed: 0 <= seed <= MAX_SEED


def parse_seed(text: str | None) -> int | None:
    """An X-Eden-Seed value -> the seed, or None where none was given; ValueError saying why otherwise."""
    if text is None:
        return None
    text = text.strip()
    if text == "":
        return None
    try:
        seed = int(text)
    except ValueError:
        raise ValueError(f"seed must be an integer, got {text[:40]!r}") from None
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be between 0 and {MAX_SEED}")
    return seed

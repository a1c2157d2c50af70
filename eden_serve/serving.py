"""What the two TorchServe handlers do, over the core: parse and check each request, batch same-size work, answer.

A TorchServe batch is a list of requests (one dict of name -> value each: multipart fields, query parameters, or
``body`` for a raw body). Every request gets its own answer, in order: a bad request gets a 4xx with a JSON message
and does not disturb the others; the worker keeps serving.

This module gathers the names the handlers, tests and benchmarks import; the code lives by concept:

- eden_serve/service.py: settings, request parsing helpers, the handler metrics (METRIC_*), BatchService;
- eden_serve/encoder_service.py: EncoderService (frames in, token blobs out);
- eden_serve/held_tokens.py: HeldTokens, the tokens an encoder keeps on its GPU for the device handoff;
- eden_serve/ditdec_service.py: DitDecService (a pair's tokens in, the middle frame out);
- eden_serve/frame_cache.py: DeviceFrameCache, the token frames the DiT+decoder keeps on its device.
"""
from __future__ import annotations

from .ditdec_service import DitDecService
from .encoder_service import EncoderService
from .frame_cache import DeviceFrameCache
from .held_tokens import HeldTokens
from .service import (FRAME_FIELD, METRIC_BATCH_SIZE, METRIC_BATCHED_REQUESTS, METRIC_BATCHES,
                      METRIC_FRAME_REF_HITS, METRIC_FRAME_REF_MISSES, METRIC_REQUEST_BYTES, METRIC_RESPONSE_BYTES, METRIC_STAGE_SECONDS, METRIC_TOKEN_BYTES_IN,
                      METRIC_TOKEN_BYTES_OUT, REASONS, REMOTE_HEADER, BatchService, RequestError, Settings,
                      check_binary, parse_seed, parse_token_dtype, request_header, resolve_dtype, select_device,
                      unexpected)

__all__ = ["BatchService", "DeviceFrameCache", "DitDecService", "EncoderService", "FRAME_FIELD", "HeldTokens",
           "METRIC_BATCHED_REQUESTS", "METRIC_BATCHES", "METRIC_BATCH_SIZE", "METRIC_FRAME_REF_HITS",
           "METRIC_FRAME_REF_MISSES", "METRIC_REQUEST_BYTES",
           "METRIC_RESPONSE_BYTES", "METRIC_STAGE_SECONDS", "METRIC_TOKEN_BYTES_IN", "METRIC_TOKEN_BYTES_OUT",
           "REASONS", "REMOTE_HEADER", "RequestError", "Settings", "check_binary", "parse_seed",
           "parse_token_dtype", "request_header", "resolve_dtype", "select_device", "unexpected"]

"""The split deployment's client: :class:`EdenClient` calls the encoder and the DiT+decoder (each a
:class:`~eden_client.model_client.ModelClient`, eden_client/model_client.py, with its keys from
eden_client/keys.py) and moves frames and tokens over HTTP or shared memory."""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import requests

from eden_serve import framerefs, wire
from eden_serve.images import decode_image, decode_raw, encode_png, encode_raw
from eden_serve.protocol import (FORMAT, FORMAT_RAW, HANDOFF, HANDOFF_DEVICE, HANDOFF_HOST, HANDOFF_UNAVAILABLE,
                                 REFERENCE_CONTENT_TYPE, REPLY, REPLY_SHM, SEED, TOKENS_CONTENT_TYPE)
from eden_serve.shm import DEFAULT_DIR, ShmError, ShmStore, make_ref, parse_ref, read_blob
from eden_serve.wire import TokenBlob

from .errors import ServeError
from .keys import KeySource
from .model_client import DEFAULT_URL, ModelClient

log = logging.getLogger(__name__)


class TokensLost(ServeError):
    """The DiT+decoder could not use tokens the encoder handed off on its GPU: they are gone (410: that encoder
    worker stopped), or handed-off tokens cannot work in this deployment (then the client has switched itself to
    host tokens). Either way the frames must be encoded again."""


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
    # frame index -> set once the request claimed to carry it (EdenClient.claim) was answered or failed
    claims: dict = field(default_factory=dict)

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
        # request body bytes sent: "encode", "generate"; frames named by hash: "ref_hits", "ref_misses", and
        # "ref_races" (misses of frames whose carrier was not answered yet)
        self.wire = Counter()
        # hashes of frames sent inline, most recent last -> whether the request that carried it was answered
        self._sent: OrderedDict[str, bool] = OrderedDict()
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
    def encode_frames(self, frames: list, dtype: str = "float16", lead: bool = False) -> EncoderAnswer:
        """[H, W, 3] uint8 frames of one size (at most the server's max_frames) -> their tokens, each frame encoded
        once. With ``lead`` (shared memory only) the first frame is sent only for the difference input between it
        and the next (the blob's ``lead_difference``) and gets no tokens. Release the result (``release``) when no
        pair needs its frames any more."""
        if self.transport == "http":
            if lead:
                raise ValueError("lead frames go over shared memory only")
            return EncoderAnswer(wire.from_bytes(self.encode_arrays(frames, dtype)))
        inputs = [self.store.write(encode_raw(f)) for f in frames]
        try:
            files = {f"frame{i}": (f"frame{i}", make_ref(segment=name), REFERENCE_CONTENT_TYPE)
                     for i, name in enumerate(inputs)}
            files["dtype"] = (None, dtype)
            if lead:
                files["lead"] = (None, "1")
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
                      difference: float | None = None, seed: int | None = None, carry: bool | None = None):
        """The middle frame between frame i of ``first`` and frame j of ``second`` -> ([H, W, 3] uint8, seed).

        ``difference`` is the DiT's frame-difference input; it may be left out only for consecutive frames of one
        encoder call (the blob has it). ``carry`` (HTTP with frame references; see ``_generate_by_refs``): True
        sends both frames inline (claim them first: ``claim``), False names frames other requests carry, waiting for
        their answers."""
        try:
            return self._generate_pair(first, i, second, j, difference, seed, carry)
        finally:
            if carry:  # answered or failed: whoever waits for these frames goes on (EdenClient._generate_by_refs)
                for enc, k in ((first, i), (second, j)):
                    if k in enc.claims:
                        enc.claims[k].set()

    def claim(self, frames: list[tuple[EncoderAnswer, int]]) -> None:
        """Say, before it is sent, that a request with ``carry=True`` will carry these frames, so that requests
        naming them wait for its answer whichever thread runs first."""
        with self._wire_lock:
            for enc, k in frames:
                enc.claims.setdefault(k, threading.Event())

    def _generate_pair(self, first: EncoderAnswer, i: int, second: EncoderAnswer, j: int,
                       difference: float | None, seed: int | None, carry: bool | None):
        if difference is None:
            if first is not second or j != i + 1:
                raise ValueError("the difference of frames from different encoder calls must be given")
            difference = first.blob.differences[i]
        if self.transport == "http":
            if self.frame_refs:
                return self._generate_by_refs([(first, i), (second, j)], difference, seed, carry)
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

    def _generate_by_refs(self, frames: list[tuple[EncoderAnswer, int]], difference: float, seed: int | None,
                          carry: bool | None = None):
        """A pair over HTTP as a pair body: each frame inline once (the request that claims it carries it), by hash
        in the others; a miss (the worker that took the request does not hold the frame: 409 FrameNotCached) sends
        the pair again, both inline.

        ``carry`` None: a frame claimed by another request is named at once, also while that request is on its way
        (the DiT+decoder keeps a batch's inline frames before it looks names up; with several workers the frame may
        reach another worker later: a "racing" miss). The scheduler can do better, since it knows which requests
        come: True carries both frames (the scheduler claims them before sending: ``claim``), False waits for the
        answers of the requests claimed to carry its frames, then names them (a frame nobody claimed, or whose
        carrier failed or is slower than ``CARRIER_WAIT_S``, goes inline): no race, each frame inline once, and no
        request waits on one that waits (``eden_client/video.py`` gives True to even input pairs, False to odd
        ones)."""
        items, carried, racing = [], [], 0
        for enc, k in frames:
            if carry is False and k in enc.claims:  # its carrier is on its way: wait for its answer
                enc.claims[k].wait(self.CARRIER_WAIT_S)
            data = None if k in enc.hashes else self._frame_bytes(enc, k)
            with self._wire_lock:
                h = enc.hashes[k]
                if carry:
                    named = False  # this request carries its frames
                elif carry is None:
                    named = h in self._sent  # claimed: named, answered or not
                else:
                    named = self._sent.get(h) is True  # named only once its carrier was answered
                if h not in self._sent:
                    self._sent[h] = False
                    carried.append(h)
                    while len(self._sent) > self.SENT_HASHES:
                        self._sent.popitem(last=False)
                elif named:
                    racing += not self._sent[h]  # its carrier not answered yet: it may reach another worker later
                self._sent.move_to_end(h)
            items.append(h if named else data if data is not None else self._frame_bytes(enc, k))
        body = framerefs.build(items, difference)
        headers = _generate_headers(framerefs.CONTENT_TYPE, seed, raw=True)
        refs = sum(isinstance(x, str) for x in items)
        try:
            r = self._post_pair(body, items, frames, difference, headers, refs, racing)
        except BaseException:
            self._settle(carried, answered=False)
            raise
        if r is None:  # a server from before pair bodies: whole pairs from now on
            self._settle(carried, answered=False)
            (a, i), (b, j) = frames
            return self.generate_pair(a, i, b, j, difference, seed)
        self._settle(carried, answered=True)
        return decode_image(r.content, max_pixels=1 << 40), int(r.headers.get(SEED, -1))

    def _post_pair(self, body: bytes, items: list, frames: list, difference: float, headers: dict, refs: int,
                   racing: int) -> requests.Response | None:
        """Post a pair body; after a miss, again with both frames inline. None: the server reads no pair bodies."""
        try:
            r = self._post("generate", self.ditdec, data=body, headers=headers)
        except ServeError as e:
            if e.status == 400 and "EDENPAIR" in str(e):
                log.warning("the DiT+decoder does not read pair bodies (an older server): sending whole pairs")
                self.frame_refs = False
                return None
            if e.kind != framerefs.FRAME_NOT_CACHED:
                raise
            self._count_refs(0, refs, racing=bool(racing))
            body = framerefs.build([x if not isinstance(x, str) else self._frame_bytes(enc, k)
                                    for x, (enc, k) in zip(items, frames)], difference)
            return self._post("generate", self.ditdec, data=body, headers=headers)
        self._count_refs(refs, 0)
        return r

    def _settle(self, carried: list[str], answered: bool) -> None:
        """The request that carried these frames was answered (the DiT+decoder, or its host's share, now holds
        them) or failed (then they are forgotten: a request waiting for them sends them itself)."""
        with self._wire_lock:
            for h in carried:
                if h in self._sent:
                    if answered:
                        self._sent[h] = True
                    elif self._sent[h] is False:
                        del self._sent[h]

    SENT_HASHES = 4096  # frames remembered as sent (their hashes): far more than a video's window of open pairs
    CARRIER_WAIT_S = 60.0  # the longest a request waits for the answer of one carrying its frame (then: inline)
    REF_SAMPLE = 16  # frames named by hash before judging whether naming pays

    @staticmethod
    def _frame_bytes(enc: EncoderAnswer, k: int) -> bytes:
        """Frame k of ``enc`` as a one-frame blob (its hash noted in ``enc.hashes``)."""
        data = enc.blob.frame(k).to_bytes()
        enc.hashes[k] = framerefs.frame_hash(data)
        return data

    def _count_refs(self, hits: int, misses: int, racing: bool = False) -> None:
        """Count frames named by hash that the worker held (hits) or not; when most miss (each of several workers
        or replicas has its own cache, and a miss costs a resend), stop naming frames: whole pairs cost less.
        ``racing``: the missed request named a frame whose carrier was not answered yet (with several workers on
        one host it may simply have been taken later, then shared): counted as a miss, not judged."""
        with self._wire_lock:
            self.wire["ref_hits"] += hits
            self.wire["ref_misses"] += misses
            self.wire["ref_races"] += misses if racing else 0
            settled = self.wire["ref_misses"] - self.wire["ref_races"]
            tried = self.wire["ref_hits"] + settled
            if self.frame_refs and tried >= self.REF_SAMPLE and settled > self.wire["ref_hits"]:
                self.frame_refs = False
                log.warning("the DiT+decoder's frame cache missed %d of %d frames named by hash after the request "
                            "carrying them was answered (several workers or replicas, each with its own cache): "
                            "sending whole pairs from now on", settled, tried)

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
